"""pass@1 (n = k = 1) of a run's samples: glue between the results records and the sandboxed
HumanEval harness in humaneval.py."""

from __future__ import annotations

import re

from specsweep.errors import SpecsweepError

from . import humaneval

SCORABLE = ("humaneval",)  # datasets whose records carry tests to execute
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def enabled(evaluate, dataset_name: str) -> bool:
    """The top-level `evaluate` setting: auto = score the datasets that can be scored."""
    if evaluate == "auto":
        return dataset_name in SCORABLE
    if evaluate not in (True, False):
        raise SpecsweepError(f"evaluate={evaluate}: choose auto, true or false")
    if evaluate and dataset_name not in SCORABLE:
        raise SpecsweepError(f"evaluate=true: dataset={dataset_name} has no tests to run "
                             f"(scorable: {', '.join(SCORABLE)}); use evaluate=auto or false")
    return bool(evaluate)


def completion_of(text: str, prompt_format: str) -> str:
    """The code to append to the HumanEval prompt.

    plain: the continuation of the prompt, cut at the first stop sequence (human-eval's setup).
    chat: a reply that usually repeats the whole function, often in a markdown fence; it is
    appended as a redefinition after the prompt (whose function body is its docstring, so the
    program stays valid and the last definition is the one the tests call).
    """
    if prompt_format != "chat":
        return humaneval.extract_completion(text)
    fenced = _FENCE.search(text)
    return "\n" + (fenced.group(1) if fenced else text)


def score_samples(samples: list[dict], prompts: list[dict], cfg_eval,
                  prompt_format: str = "plain") -> tuple[list[dict], dict]:
    """Score each sample against its prompt record's tests in the sandbox.

    Returns per-sample fields {"passed", "result", "completion"} (in sample order, to merge into
    the samples) and a run summary {"pass_at_1", "evaluated", "isolation"}.
    """
    problems = {p["task_id"]: p for p in prompts}
    missing = [s["task_id"] for s in samples if s["task_id"] not in problems or "test" not in problems[s["task_id"]]]
    if missing:
        raise SpecsweepError(f"pass@1: no HumanEval tests for task ids {missing[:5]}")
    completions = [(s["task_id"], completion_of(s["text"], prompt_format)) for s in samples]
    results = humaneval.score_all(problems, completions, workers=int(cfg_eval.workers),
                                  timeout_s=float(cfg_eval.timeout_s), memory_mb=int(cfg_eval.memory_mb))
    fields = [{"passed": r["passed"], "result": r["result"], "completion": c}
              for r, (_, c) in zip(results, completions)]
    passed = sum(f["passed"] for f in fields)
    summary = {"pass_at_1": passed / len(fields) if fields else None, "evaluated": len(fields),
               "isolation": results[0]["isolation"] if results else None}
    return fields, summary
