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
        **position_metrics([s.depth_per_step for s in stats], [s.accepted_per_step for s in stats],
                           sum(s.off_top_steps for s in stats)),
    }


def position_counts(depths: list[list[int]], accepted: list[list[int]]) -> tuple[list[int], list[int]]:
    """Per draft position k = 1..K (a tree's depth): (offered_k, accepted_k) over the given steps.

    ``depths[s][t]``, ``accepted[s][t]``: sample s, step t: the draft's depth (a chain's length) and
    the tokens accepted. Position k was offered when the draft reached depth k and positions 1..k-1
    were accepted; it was accepted when the step accepted k or more. (A step that ended at EOS counts
    up to the EOS.) sum_k accepted_k = all accepted tokens."""
    offered_k: list[int] = []
    accepted_k: list[int] = []
    for sample_depths, sample_accepted in zip(depths, accepted):
        for depth, n in zip(sample_depths, sample_accepted):
            seen = min(n + 1, depth)
            if len(offered_k) < depth:
                offered_k.extend([0] * (depth - len(offered_k)))
                accepted_k.extend([0] * (depth - len(accepted_k)))
            for k in range(seen):
                offered_k[k] += 1
            for k in range(n):
                accepted_k[k] += 1
    return offered_k, accepted_k


def position_metrics(depths: list[list[int]], accepted: list[list[int]], off_top_steps: int) -> dict:
    """metrics.json's per-position acceptance: alpha_k = accepted_k / offered_k (`position_counts`),
    and for trees the share of steps with an accepted token whose path leaves the top-ranked branch.
    Empty without per-step depths (autoregressive runs, older results)."""
    offered_k, accepted_k = position_counts(depths, accepted)
    if not offered_k:
        return {}
    out = {"alpha_by_position": [a / o if o else None for a, o in zip(accepted_k, offered_k)],
           "offered_by_position": offered_k, "accepted_by_position": accepted_k}
    with_path = sum(1 for steps in accepted for n in steps if n)
    out["off_top_share"] = off_top_steps / with_path if with_path else None
    return out


def expected_tokens(alpha: float, gamma: float) -> float:
    """Tokens per step with gamma drafted tokens, each accepted with probability alpha (i.i.d.;
    Leviathan et al. 2023)."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def curve_speedup(drafted: list[list[int]], accepted: list[list[int]], ratios: dict[int, float],
                  draft_steps: float = 0.0) -> float | None:
    """The speedup a run's measured acceptance predicts on a verify-cost curve: tokens per step
    (accepted + 1) over the step's verify cost t(n + 1)/t(1) (``ratios[m]`` for m rows, root
    included), summed over every step: sum (a_s + 1) / (sum r(n_s + 1) + draft_steps). 1 for an
    autoregressive run; ``draft_steps``: drafting time in autoregressive steps (0: drafting free).
    None where the curve lacks a row count the run used."""
    tokens = cost = 0.0
    for sample_drafted, sample_accepted in zip(drafted, accepted):
        for n, a in zip(sample_drafted, sample_accepted):
            if n + 1 not in ratios:
                return None
            tokens += a + 1
            cost += ratios[n + 1]
    return tokens / (cost + draft_steps) if cost else None


def predicted_speedup(alpha: float, gamma: float, step_cost: float) -> float:
    """Leviathan et al.'s speedup: `expected_tokens` per step over the step's cost in autoregressive
    steps (gamma c + 1 in the paper, c a drafted token's cost; measured costs may stand in for it)."""
    return expected_tokens(alpha, gamma) / step_cost
