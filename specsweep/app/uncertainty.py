"""How sure a sweep's numbers are: bootstrap intervals over prompts, speedups paired prompt by prompt,
and the run-to-run spread of repeats (`repeats=N`), from the samples.jsonl records alone.

The unit resampled is the prompt: a job's samples are folded per task id (its repeats summed), then
`DRAWS` resamples of the prompts with replacement, the same for every job with that many prompts
(seeded: the same files give the same intervals), recompute each number the way the README defines
it over a run, a ratio of totals (tokens/s = new tokens / seconds; a speedup = the two runs' tokens/s
on the *same* resampled prompts). The interval is the 2.5 and 97.5 percentiles of the resamples.
Two jobs against one baseline are `distinguishable` when the interval of their speedups' difference,
paired the same way, leaves out 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specsweep.core.stats import position_counts

from specsweep.errors import SpecsweepError

DRAWS = 2000  # bootstrap resamples
SEED = 0
LEVEL = 0.95


def repeats_setting(cfg) -> int:
    """``repeats``: how many times a job decodes every prompt (>= 1; absent: 1)."""
    repeats = cfg.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise SpecsweepError(f"repeats={repeats}: must be an integer >= 1")
    return repeats


def schedule(prompts: int, repeats: int) -> list[tuple[int, int]]:
    """(repeat, prompt index) in decode order: pass r over every prompt, then pass r + 1, so that a
    drift of the machine's speed shows as run-to-run spread, not as a difference between prompts.
    (Jobs of a sweep run one after another under the local launcher, in parallel on SLURM: repeats
    interleave within a job; `specsweep.tools.bench --repeats` interleaves strategies too.)"""
    return [(r, i) for r in range(repeats) for i in range(prompts)]


@dataclass
class Prompts:
    """A job's samples folded per prompt (task id, in first-seen order), repeats summed.

    Arrays are [P]; ``*_by_repeat`` [P, R] (R = the most repeats any prompt has; missing ones 0);
    ``offered_k`` / ``accepted_k`` [P, K]: per-position counts (`specsweep.core.stats.position_counts`)."""

    tasks: list
    new: np.ndarray
    wall: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray
    steps: np.ndarray
    passed: np.ndarray  # 1.0 / 0.0, NaN where not scored
    offered_k: np.ndarray
    accepted_k: np.ndarray
    new_by_repeat: np.ndarray
    wall_by_repeat: np.ndarray

    def subset(self, tasks: list) -> Prompts:
        """These prompts only, in this order (each must be present)."""
        where = {t: i for i, t in enumerate(self.tasks)}
        rows = np.array([where[t] for t in tasks], dtype=int)
        return Prompts(list(tasks), *(getattr(self, f)[rows] for f in _ARRAYS))


_ARRAYS = ("new", "wall", "drafted", "accepted", "steps", "passed", "offered_k", "accepted_k", "new_by_repeat",
           "wall_by_repeat")


def fold(samples: list[dict]) -> Prompts:
    """samples.jsonl records (a ``repeat`` field from `repeats=N`, 0 when absent) -> `Prompts`."""
    order: dict = {}
    for s in samples:
        order.setdefault(_key(s.get("task_id")), []).append(s)
    tasks = list(order)
    repeats = max((int(s.get("repeat", 0)) + 1 for s in samples), default=1)
    counts = [position_counts([s.get("depth_per_step") or [] for s in group],
                              [s.get("accepted_per_step") or [] for s in group]) for group in order.values()]
    depth = max((len(o) for o, _ in counts), default=0)
    offered_k, accepted_k = np.zeros((len(tasks), depth)), np.zeros((len(tasks), depth))
    for i, (o, a) in enumerate(counts):
        offered_k[i, :len(o)], accepted_k[i, :len(a)] = o, a
    new_r, wall_r = np.zeros((len(tasks), repeats)), np.zeros((len(tasks), repeats))
    for i, group in enumerate(order.values()):
        for s in group:
            r = int(s.get("repeat", 0))
            new_r[i, r] += s.get("new_tokens", 0)
            wall_r[i, r] += s.get("wall_s", 0.0)

    def total(key):
        return np.array([sum(s.get(key) or 0 for s in group) for group in order.values()], dtype=float)

    passed = np.array([next((float(s["passed"]) for s in g if s.get("passed") is not None), np.nan)
                       for g in order.values()])
    return Prompts(tasks, total("new_tokens"), total("wall_s"), total("draft_tokens"), total("accepted_tokens"),
                   total("verify_steps"), passed, offered_k, accepted_k, new_r, wall_r)


def _key(task_id):
    return task_id if isinstance(task_id, (str, int)) else str(task_id)


def resamples(n: int, draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """[draws, n] prompt indices drawn with replacement; the same for the same n, draws and seed."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def _interval(point, draws: np.ndarray) -> dict:
    draws = draws[np.isfinite(draws)]
    if point is None or not np.isfinite(point) or not draws.size:
        return {"value": None if point is None or not np.isfinite(point) else float(point), "lo": None, "hi": None}
    lo, hi = np.percentile(draws, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
    return {"value": float(point), "lo": float(lo), "hi": float(hi)}


def _ratio(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> dict:
    """sum(num) / sum(den) and its interval over the resamples ``idx``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        point = num.sum() / den.sum() if den.sum() else np.nan
        return _interval(point, num[idx].sum(-1) / den[idx].sum(-1))


def job_intervals(p: Prompts, idx: np.ndarray | None = None) -> dict:
    """Intervals of tokens/s, acceptance rate and length, pass@1 and each alpha_k of one job."""
    idx = resamples(len(p.tasks)) if idx is None else idx
    out = {"prompts": len(p.tasks), "tokens_per_s": _ratio(p.new, p.wall, idx)}
    if p.drafted.sum():
        out["acceptance_rate"] = _ratio(p.accepted, p.drafted, idx)
        out["acceptance_length"] = _ratio(p.accepted, p.steps, idx)
    scored = ~np.isnan(p.passed)
    if scored.any():  # over the scored prompts only
        passed = p.passed[scored]
        out["pass_at_1"] = _ratio(passed, np.ones_like(passed), resamples(len(passed)))
    if p.offered_k.size:
        out["alpha"] = [_ratio(p.accepted_k[:, k], p.offered_k[:, k], idx) for k in range(p.offered_k.shape[1])]
    return out


def common_tasks(*jobs: Prompts) -> list:
    """Task ids every job decoded, in the first job's order."""
    shared = set(jobs[0].tasks).intersection(*(j.tasks for j in jobs[1:]))
    return [t for t in jobs[0].tasks if t in shared]


def _speedups(job: Prompts, base: Prompts, idx: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (job.new[idx].sum(-1) / job.wall[idx].sum(-1)) / (base.new[idx].sum(-1) / base.wall[idx].sum(-1))


def paired_speedup(job: Prompts, base: Prompts) -> dict:
    """The job's speedup over ``base`` on their common prompts, its interval resampling those prompts
    for both at once, each prompt's own speedup, and the prompts where the job is slower."""
    tasks = common_tasks(base, job)
    if not tasks:
        return {}
    job, base = job.subset(tasks), base.subset(tasks)
    idx = resamples(len(tasks))
    point = (job.new.sum() / job.wall.sum()) / (base.new.sum() / base.wall.sum())
    per_prompt = (job.new / job.wall) / (base.new / base.wall)
    out = {"speedup": _interval(point, _speedups(job, base, idx)), "paired_prompts": len(tasks),
           "prompt_speedups": [[t, float(x)] for t, x in zip(tasks, per_prompt)],
           "slower_than_baseline": [t for t, x in zip(tasks, per_prompt) if x < 1]}
    repeats = min(job.new_by_repeat.shape[1], base.new_by_repeat.shape[1])
    if repeats > 1:  # one speedup per pass over the prompts
        out["speedup_by_repeat"] = [float((job.new_by_repeat[:, r].sum() / job.wall_by_repeat[:, r].sum())
                                          / (base.new_by_repeat[:, r].sum() / base.wall_by_repeat[:, r].sum()))
                                    for r in range(repeats)]
    return out


def speedup_difference(a: Prompts, b: Prompts, base: Prompts) -> dict:
    """speedup(a) - speedup(b) over the same baseline on the prompts all three decoded, paired."""
    tasks = common_tasks(base, a, b)
    if not tasks:
        return {"value": None, "lo": None, "hi": None}
    a, b, base = a.subset(tasks), b.subset(tasks), base.subset(tasks)
    idx = resamples(len(tasks))
    full = np.arange(len(tasks))[None]
    return _interval(float((_speedups(a, base, full) - _speedups(b, base, full))[0]),
                     _speedups(a, base, idx) - _speedups(b, base, idx))


def distinguishable(difference: dict) -> bool | None:
    """Whether a difference's interval leaves out 0 (None: no interval)."""
    if difference.get("lo") is None:
        return None
    return difference["lo"] > 0 or difference["hi"] < 0


def spread(p: Prompts) -> dict:
    """Run-to-run spread (the coefficient of variation of a whole pass's tokens/s across repeats, and
    the median over prompts of a prompt's tokens/s across repeats) apart from prompt-to-prompt spread
    (of the prompts' tokens/s, repeats summed). Run-to-run needs repeats > 1 (else None)."""
    def cv(x: np.ndarray, axis=None):
        with np.errstate(divide="ignore", invalid="ignore"):
            return x.std(axis=axis, ddof=1) / x.mean(axis=axis)

    repeats = p.new_by_repeat.shape[1]
    per_prompt = p.new / p.wall
    out = {"repeats": repeats, "prompt_to_prompt_cv": float(cv(per_prompt)) if len(per_prompt) > 1 else None,
           "run_to_run_cv": None, "within_prompt_cv": None}
    if repeats > 1:
        per_pass = p.new_by_repeat.sum(0) / p.wall_by_repeat.sum(0)
        out.update(run_to_run_cv=float(cv(per_pass)), tokens_per_s_by_repeat=[float(x) for x in per_pass],
                   within_prompt_cv=float(np.median(cv(p.new_by_repeat / p.wall_by_repeat, axis=1))))
    return out


def analyse(samples: list[dict], base_samples: list[dict] | None) -> dict:
    """The record a job's metrics.json keeps as ``uncertainty``: `job_intervals`, `paired_speedup`
    against its baseline's samples (None: no baseline) and `spread`."""
    p = fold(samples)
    if not p.tasks or not p.wall.sum():
        return {}
    out = {"draws": DRAWS, "seed": SEED, "level": LEVEL, **job_intervals(p), "spread": spread(p)}
    if base_samples is not None:
        out.update(paired_speedup(p, fold(base_samples)))
    return out
