"""Scoring generated outputs: HumanEval pass@1 with sandboxed execution."""
