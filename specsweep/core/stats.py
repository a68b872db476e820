"""Run-level metrics from per-sample counters, exactly as the README defines them."""

from __future__ import annotations

from specsweep.core.engine import SampleStats


def summarize(stats: list[SampleStats]) -> dict:
    """Totals over a run; rates are ratios of totals (tokens/s = all new tokens / all timed seconds)."""
    new = sum(s.new_tokens for s in stats)
    drafted = sum(s.draft_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    steps = sum(s.verify_steps for s in stats)
    wall = sum(s.wall_s for s in stats)
    draft_s, verify_s, prefill_s = (sum(getattr(s, k) for s in stats) for k in ("draft_s", "verify_s", "prefill_s"))
    acceptance_length = accepted / steps if steps else 0.0
    return {
        "samples": len(stats),
        "new_tokens": new,
        "tokens_per_s": new / wall if wall else 0.0,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,  # undefined without a draft
        "acceptance_length": acceptance_length,
        "tokens_per_target_forward": acceptance_length + 1,
        "verify_steps": steps,
        "target_forwards": steps + len(stats),  # verify steps plus one prefill per sample
        "wall_s": wall,
        "prefill_s": prefill_s,
        "draft_s": draft_s,
        "verify_s": verify_s,
        "other_s": max(wall - prefill_s - draft_s - verify_s, 0.0),
    }


def expected_tokens(alpha: float, gamma: float) -> float:
    """Tokens per step with gamma drafted tokens, each accepted with probability alpha (i.i.d.;
    Leviathan et al. 2023)."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, gamma: float, step_cost: float) -> float:
    """Leviathan et al.'s speedup: `expected_tokens` per step over the step's cost in autoregressive
    steps (gamma c + 1 in the paper, c a drafted token's cost; measured costs may stand in for it)."""
    return expected_tokens(alpha, gamma) / step_cost
