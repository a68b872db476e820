"""``python -m specsweep report SWEEP_DIR [SWEEP_DIR ...]``: results files -> REPORT.md + PNG plots.

Reads only what the jobs left on disk (metrics.json, error.json, .hydra/), so a sweep dir copied
from a cluster reports the same. Per sweep: a target x strategy table in the shape of seed 000's
tables (tokens/s, speedup, acceptance, pass@1) and the time breakdown per run; over all sweeps:
seed 001's acceptance rate and length against the number of draft tokens per tree shape and draft;
and each run's losslessness audit against its draft=none run (`specsweep.app.audit`, from samples.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from specsweep.app import audit, uncertainty
from specsweep.app.results import ERROR, METRICS, SAMPLES, read_jsonl
from specsweep.app.tracking import sweep_group
from specsweep.errors import SpecsweepError

REPORT = "REPORT.md"
TIME_PARTS = ("prefill_s", "draft_s", "verify_s", "other_s")


@dataclass
class Job:
    """One job dir of a sweep, as its results files describe it."""

    sweep: str  # the sweep's label in the report
    sweep_dir: Path
    path: Path  # the job dir (the sweep dir itself for a single run)
    status: str  # ok, failed, or missing (no results yet: running, or killed)
    choices: dict
    config: dict
    metrics: dict = field(default_factory=dict)
    error: str = ""
    speedup: float | None = None
    baseline_sweep: str | None = None  # set when the draft=none run came from another sweep
    baseline: Job | None = field(default=None, repr=False, compare=False)  # that draft=none run (maybe itself)
    audit: dict | None = None  # the losslessness audit (decoding runs; `add_audits`)
    uncertainty: dict | None = None  # bootstrap intervals, paired speedups, spread (`add_uncertainty`)
    indistinct: list[str] = field(default_factory=list)  # jobs whose speedup this one's is not told apart from
    _samples: list | None = field(default=None, repr=False, compare=False)
    _samples_read: bool = field(default=False, repr=False, compare=False)

    def samples(self) -> list[dict] | None:
        """samples.jsonl's records, read once (None without the file)."""
        if not self._samples_read:
            path = self.path / SAMPLES
            self._samples, self._samples_read = (read_jsonl(path) if path.is_file() else None), True
        return self._samples

    @property
    def name(self) -> str:  # the job number in a multirun
        return self.path.name

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def target(self) -> str:
        return self.choices.get("target") or _get(self.config, "target", "name") or "?"

    @property
    def draft(self) -> str:
        return self.choices.get("draft") or _get(self.config, "draft", "name") or "?"

    @property
    def tree(self) -> dict:
        return self.config.get("tree") or {}

    def value(self, key: str):
        return self.metrics.get(key)


def _get(mapping: dict, *keys):
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, dict) else None
    return mapping


# ---- loading ---------------------------------------------------------------------------------

def load_sweeps(sweep_dirs: list[Path], decode_only: bool = True) -> list[Job]:
    """Every job of the sweeps with its speedup; ``decode_only=False`` keeps other job kinds too
    (the sweep summary lists every job, the report tables only decoding runs)."""
    labels = _labels(sweep_dirs)
    jobs = []
    for sweep_dir, label in zip(sweep_dirs, labels):
        found = [job for job in (_load_job(d, label, sweep_dir, decode_only) for d in _job_dirs(sweep_dir)) if job]
        if not found:
            raise SpecsweepError(f"{sweep_dir}: no results here (no job dir with metrics.json, error.json or .hydra/)")
        jobs += found
    add_speedups(jobs)
    add_audits(jobs)
    add_uncertainty(jobs)
    return jobs


def _labels(sweep_dirs: list[Path]) -> list[str]:
    """The dir names; where two sweeps share a name (quick/seed000, full/seed000), parent/name."""
    names = [d.resolve().name for d in sweep_dirs]
    return [sweep_group(d) if names.count(n) > 1 else n for d, n in zip(sweep_dirs, names)]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        raise SpecsweepError(f"{sweep_dir}: no such directory")
    if _has_results(sweep_dir):  # a single run's dir
        return [sweep_dir]
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or _has_results(p))]
    return sorted(dirs, key=lambda p: (len(p.name), p.name))  # 0, 1, ..., 10 in job order


def _has_results(path: Path) -> bool:
    return (path / METRICS).is_file() or (path / ERROR).is_file()


def _load_job(job_dir: Path, label: str, sweep_dir: Path, decode_only: bool) -> Job | None:
    hydra_dir = job_dir / ".hydra"
    config = _read_yaml(hydra_dir / "config.yaml")
    choices = _get(_read_yaml(hydra_dir / "hydra.yaml"), "hydra", "runtime", "choices") or {}
    if (job_dir / METRICS).is_file():
        metrics = json.loads((job_dir / METRICS).read_text())
        if decode_only and "tokens_per_s" not in metrics:  # another job kind (e.g. the tree-attention benchmark)
            return None
        return Job(label, sweep_dir, job_dir, "ok", metrics.get("choices") or choices,
                   metrics.get("config") or config, metrics)
    if decode_only and config.get("job", "decode") != "decode":
        return None
    if (job_dir / ERROR).is_file():
        error = json.loads((job_dir / ERROR).read_text())
        return Job(label, sweep_dir, job_dir, "failed", error.get("choices") or choices, config,
                   error=error.get("error", "?"))
    return Job(label, sweep_dir, job_dir, "missing", choices, config, error="no metrics.json or error.json")


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


# ---- derived numbers ---------------------------------------------------------------------------

def add_speedups(jobs: list[Job]) -> None:
    """speedup = tokens/s / tokens/s of the draft=none run with the same target, prompts, decode
    settings, seed and hardware: from the same sweep if it has one, else from another reported
    sweep run on the same machine (host, or GPU model for cluster nodes), e.g. a tree study next to
    its baseline sweep."""
    def setting(job):
        return json.dumps([job.config.get(k) for k in ("target", "dataset", "decode", "seed")]
                          + [job.choices.get("hardware"), job.value("hardware")], sort_keys=True, default=str)

    baselines: dict[str, list[Job]] = {}
    for job in jobs:
        if job.ok and job.draft == "none" and job.value("tokens_per_s"):
            baselines.setdefault(setting(job), []).append(job)
    for job in jobs:
        if not job.ok:
            continue
        candidates = baselines.get(setting(job), [])
        same = [b for b in candidates if b.sweep_dir == job.sweep_dir]
        near = [b for b in candidates if _machine(b) == _machine(job)]
        base = (same or near or [None])[0]
        if base:
            job.speedup = job.value("tokens_per_s") / base.value("tokens_per_s")
            job.baseline_sweep = None if same else base.sweep
            job.baseline = base


def add_audits(jobs: list[Job]) -> None:
    """Each finished decoding run's greedy outputs against those of its speedup baseline (the
    draft=none run of the same target, prompts, decode settings, seed and hardware), per sample by
    task id: `specsweep.app.audit.compare` on the two samples.jsonl, in the baseline's dtype. Without a
    samples.jsonl, the audit an earlier sweep summary left in metrics.json, if any."""
    for job in jobs:
        if job.ok and "tokens_per_s" in job.metrics:
            job.audit = _audit(job, Job.samples)


def _audit(job: Job, samples) -> dict:
    base = job.baseline
    if base is None:
        return audit.not_audited("no draft=none run with the same target, prompts, decode settings, seed and hardware")
    if base is job:
        return audit.not_audited("the draft=none run the others are compared with", audit.REFERENCE)
    if not audit.greedy(job.config.get("decode")):
        return audit.not_audited("sampling (temperature > 0): outputs are compared under greedy decoding only")
    mine, theirs = samples(job), samples(base)
    if mine is None or theirs is None:
        missing = job if mine is None else base
        return job.value("audit") or audit.not_audited(f"no {SAMPLES} in {missing.path}")
    try:
        record = audit.compare(mine, theirs, _get(base.metrics, "hardware", "dtype") or "?")
    except ValueError as err:  # a dtype without a known ulp
        return audit.not_audited(str(err))
    return {**record, "reference": f"{base.sweep}/{base.name}"}


def add_uncertainty(jobs: list[Job]) -> None:
    """Each decoding run's bootstrap intervals and its speedup paired prompt by prompt with its
    baseline's (`specsweep.app.uncertainty`, from samples.jsonl; without one, what an earlier sweep
    summary left in metrics.json). Then, among the runs sharing a baseline (itself included), each
    pair whose speedups' paired difference has an interval holding 0 is marked not distinguishable."""
    folded: dict[Path, uncertainty.Prompts] = {}

    def prompts(job: Job) -> uncertainty.Prompts | None:
        if job.path not in folded and job.samples():
            folded[job.path] = uncertainty.fold(job.samples())
        return folded.get(job.path)

    decoded = [j for j in jobs if j.ok and "tokens_per_s" in j.metrics]
    for job in decoded:
        if job.samples() is None:
            job.uncertainty = job.value("uncertainty")
            continue
        base = job.baseline.samples() if job.baseline is not None else None
        job.uncertainty = uncertainty.analyse(job.samples(), base)
    groups: dict[int, list[Job]] = {}
    for job in decoded:
        if job.baseline is not None and prompts(job) is not None and prompts(job.baseline) is not None:
            groups.setdefault(id(job.baseline), []).append(job)
    for members in groups.values():
        base = prompts(members[0].baseline)
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if uncertainty.distinguishable(uncertainty.speedup_difference(prompts(a), prompts(b), base)) is False:
                    a.indistinct.append(job_label(b, a))
                    b.indistinct.append(job_label(a, b))


def job_label(job: Job, seen_from: Job) -> str:
    """A job's number, with its sweep where that is not ``seen_from``'s."""
    return job.name if job.sweep == seen_from.sweep else f"{job.sweep}/{job.name}"


def interval(job: Job, key: str) -> dict | None:
    """A number's bootstrap record {value, lo, hi}, or None."""
    record = (job.uncertainty or {}).get(key)
    return record if isinstance(record, dict) and record.get("lo") is not None else None


def with_interval(value, record: dict | None, digits: int = 2, suffix: str = "") -> str:
    """``1.92x [1.81, 2.03]``: the value and its 95% interval where there is one."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}{suffix}"
    return text if record is None else f"{text} [{record['lo']:.{digits}f}, {record['hi']:.{digits}f}]"


def alphas(job: Job, limit: int = 8) -> list:
    """alpha_1..alpha_limit (None where a position was never offered)."""
    return (job.value("alpha_by_position") or [])[:limit]


def alpha_cell(job: Job, limit: int = 4) -> str:
    """alpha_1 .. alpha_limit, space-separated ('-' for a position never offered)."""
    values = alphas(job, limit)
    return " ".join(_fmt(a, 2) for a in values) or "-"


def predicted(job: Job) -> float | None:
    return (job.value("predicted") or {}).get("speedup")


def predicted_cell(job: Job) -> str:
    """``1.74x / 0.45x``: predicted with drafting free / at its measured time (one number where they agree)."""
    record = job.value("predicted") or {}
    free, paid = record.get("speedup"), record.get("speedup_with_draft")
    if free is None or paid is None or f"{free:.2f}" == f"{paid:.2f}":
        return _fmt(free, 2, "x")
    return f"{free:.2f}x / {paid:.2f}x"


def _machine(job: Job) -> str | None:
    return _get(job.metrics, "hardware", "device_name") or job.value("host")


def draft_nodes(job: Job) -> int | None:
    """Draft tokens per step the tree offers: metrics' tree_nodes, else counted from the config."""
    if job.value("tree_nodes") is not None:
        return job.value("tree_nodes")
    tree = job.tree
    if tree.get("shape") == "dynamic":
        return tree.get("budget")
    try:
        from specsweep.core.tree import Tree

        return Tree.from_config(tree).num_nodes
    except Exception:  # results of an older or unknown tree config: fall back to its depth
        return tree.get("depth")


def tree_label(job: Job) -> str:
    tree, shape = job.tree, job.tree.get("shape", "?")
    if shape == "chain":
        return f"chain γ={tree.get('depth')}"
    params = {"kary": f" k={tree.get('k')} depth={tree.get('depth')}", "binary": f" depth={tree.get('depth')}",
              "dynamic": f" budget={tree.get('budget')} depth={tree.get('depth')} k={tree.get('k')}"}
    cut = f" depth≤{tree['depth']}" if tree.get("depth") else ""  # medusa/custom cut at a depth
    label = shape + params.get(shape, cut)
    nodes = draft_nodes(job)
    return label if shape == "dynamic" or nodes is None else f"{label}, {nodes} nodes"


def strategy(job: Job) -> str:
    if job.draft == "none":
        return "autoregressive (draft=none)"
    return f"{job.draft}, {tree_label(job)}"


def finished_at(job: Job) -> datetime | None:
    if job.value("finished_at"):
        when = datetime.fromisoformat(job.value("finished_at"))
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    path = job.path / METRICS  # copies made with cp -p / rsync -a keep its time
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) if path.is_file() else None


def _fmt(value, digits: int = 3, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


# ---- sections ----------------------------------------------------------------------------------

def provenance(jobs: list[Job]) -> list[str]:
    """Machine, software, commit and date of a sweep's finished runs (all distinct values)."""
    ok = [j for j in jobs if j.ok]
    if not ok:
        return ["No finished runs."]

    def distinct(fn):
        return ", ".join(dict.fromkeys(str(fn(j)) for j in ok if fn(j) is not None)) or "unknown"

    def machine(j):
        hw = j.value("hardware") or {}
        device = hw.get("device_name") or hw.get("device")
        return (f"{j.value('host')} ({j.value('cpu')}, {j.value('cpu_count')} CPUs; {device}, {hw.get('dtype')}, "
                f"{hw.get('attn_implementation')}, {hw.get('torch_threads')} torch threads)")

    dates = sorted(d for d in map(finished_at, ok) if d)
    when = (f"{dates[0]:%Y-%m-%d %H:%M} to {dates[-1]:%Y-%m-%d %H:%M %Z}".strip() if dates else "unknown")
    return [f"- machine: {distinct(machine)}",
            f"- software: torch {distinct(lambda j: j.value('torch'))}, "
            f"transformers {distinct(lambda j: j.value('transformers'))}, python {distinct(lambda j: j.value('python'))}",
            f"- commit: {distinct(lambda j: j.value('git_commit'))}",
            f"- finished: {when}"]


def settings_line(jobs: list[Job]) -> str:
    def distinct(*keys):
        return ", ".join(dict.fromkeys(json.dumps(_get(j.config, *keys), default=str) for j in jobs))

    return (f"Prompts: dataset {distinct('dataset', 'name')} (limit {distinct('dataset', 'limit')}, "
            f"offset {distinct('dataset', 'offset')}, format {distinct('dataset', 'prompt_format')}); "
            f"decode: temperature {distinct('decode', 'temperature')}, top_k {distinct('decode', 'top_k')}, "
            f"max {distinct('decode', 'max_new_tokens')} new tokens; seed {distinct('seed')}.")


def strategy_table(jobs: list[Job]) -> list[str]:
    """Seed 000's tables: one row per target x strategy, each number with its 95% interval over
    prompts, the predicted speedup beside the measured one, alpha_1..4, and the jobs whose speedup
    this one's cannot be told apart from."""
    order = sorted(jobs, key=lambda j: (j.target, j.draft != "none"))
    rows = []
    for j in order:
        if j.ok:
            speedup = (with_interval(j.speedup, interval(j, "speedup"), 2, "x")
                       + (f" (baseline: {j.baseline_sweep})" if j.baseline_sweep else ""))
            rows.append([j.target, strategy(j), with_interval(j.value("tokens_per_s"), interval(j, "tokens_per_s")),
                         speedup, predicted_cell(j),
                         with_interval(j.value("acceptance_rate"), interval(j, "acceptance_rate"), 3),
                         with_interval(j.value("acceptance_length"), interval(j, "acceptance_length"), 3),
                         _fmt(j.value("tokens_per_target_forward")), alpha_cell(j), pass_at_1(j),
                         j.value("new_tokens"), j.name, lossless(j), indistinct_cell(j)])
        else:
            rows.append([j.target, strategy(j), f"**{j.status}**", *[""] * 9, j.name, "", ""])
    return _table(["target", "strategy", "tokens/s", "speedup", "predicted", "acceptance rate", "acceptance length",
                   "tokens/target forward", "α1 α2 α3 α4", "pass@1", "new tokens", "job", "lossless",
                   "not distinguishable from"], rows)


def indistinct_cell(job: Job) -> str:
    """The same sweep's runs this one is not distinguishable from, and how many of other sweeps."""
    here = [name for name in job.indistinct if "/" not in name]
    others = len(job.indistinct) - len(here)
    return ", ".join(here + ([f"+{others} in other sweeps"] if others else [])) or "-"


def pass_at_1(job: Job) -> str:
    evaluation = job.value("evaluation") or {}
    if evaluation.get("pass_at_1") is None:
        return "-"
    return f"{with_interval(evaluation['pass_at_1'], interval(job, 'pass_at_1'), 3)} (n={evaluation.get('evaluated')})"


def position_table(jobs: list[Job]) -> list[str]:
    """alpha_k with its interval per drafted run, and for trees the share of steps (with an accepted
    token) whose accepted path leaves the top-ranked branch."""
    drafted = [j for j in jobs if j.ok and alphas(j)]
    if not drafted:
        return []
    depth = max(len(alphas(j)) for j in drafted)
    rows = []
    for j in drafted:
        records = ((j.uncertainty or {}).get("alpha") or [])[:depth]
        cells = [with_interval(a, records[k] if k < len(records) and records[k].get("lo") is not None else None)
                 for k, a in enumerate(alphas(j))]
        rows.append([j.name, strategy(j), *cells, *[""] * (depth - len(cells)), _fmt(j.value("off_top_share"), 2)])
    return _table(["job", "strategy", *(f"α{k}" for k in range(1, depth + 1)), "off-top share"], rows)


def slower_lines(jobs: list[Job]) -> list[str]:
    """Per drafted run: how many prompts ran slower than on its baseline, the slowest few named."""
    lines = []
    for j in jobs:
        record = j.uncertainty or {}
        if not j.ok or j.draft == "none" or not record.get("prompt_speedups"):
            continue
        slow = sorted((x, t) for t, x in record["prompt_speedups"] if x < 1)
        named = ", ".join(f"{t} {x:.2f}x" for x, t in slow[:5]) + (" ..." if len(slow) > 5 else "")
        lines.append(f"- job {j.name} ({strategy(j)}): {len(slow)} of {record['paired_prompts']} prompts"
                     + (f": {named}" if slow else ""))
    return lines


def repeat_table(jobs: list[Job]) -> list[str]:
    """Run-to-run spread apart from prompt-to-prompt spread, for runs with repeats > 1."""
    rows = []
    for j in jobs:
        record = j.uncertainty or {}
        spread = record.get("spread") or {}
        if not j.ok or spread.get("repeats", 1) < 2:
            continue
        rows.append([j.name, strategy(j), spread["repeats"],
                     " ".join(f"{x:.2f}" for x in spread.get("tokens_per_s_by_repeat", [])),
                     " ".join(f"{x:.2f}" for x in record.get("speedup_by_repeat", [])) or "-",
                     _fmt(spread.get("run_to_run_cv")), _fmt(spread.get("within_prompt_cv")),
                     _fmt(spread.get("prompt_to_prompt_cv"))])
    return _table(["job", "strategy", "repeats", "tokens/s per pass", "speedup per pass", "run-to-run CV",
                   "within-prompt CV (median)", "prompt-to-prompt CV"], rows) if rows else []


def lossless(job: Job) -> str:
    """The audit's verdict as a table cell: the divergence counts where there are divergences."""
    record = job.audit or audit.not_audited("not audited")
    verdict = record["lossless"]
    if verdict == audit.DIVERGED:
        return f"**DIVERGED** ({record['diverged']} real, {record['ties']} ties of {record['compared']})"
    if verdict == audit.TIES:
        return f"ties ({record['ties']} of {record['compared']})"
    return verdict


def audit_table(jobs: list[Job]) -> list[str]:
    """Per audited run: its reference, sample counts and the worst divergence (specsweep.app.audit)."""
    rows = [[j.name, j.target, strategy(j), lossless(j), j.audit.get("reference", "-"), j.audit["compared"],
             j.audit["exact"], j.audit["ties"], j.audit["diverged"], audit.describe(j.audit.get("worst"))]
            for j in jobs if j.ok and j.audit and "compared" in j.audit]
    return _table(["job", "target", "strategy", "lossless", "reference", "samples", "exact", "tie divergences",
                   "real divergences", "worst divergence"], rows) if rows else []


def time_table(jobs: list[Job]) -> list[str]:
    rows = []
    for j in (j for j in jobs if j.ok and j.value("new_tokens")):
        parts = [1000 * (j.value(k) or 0.0) / j.value("new_tokens") for k in TIME_PARTS]
        rows.append([j.name, j.target, strategy(j), *(f"{p:.1f}" for p in parts), f"{sum(parts):.1f}"])
    return _table(["job", "target", "strategy", "prefill", "draft", "verify", "other", "total"], rows)


def tree_jobs(jobs: list[Job]) -> list[Job]:
    """Drafted runs of the sweeps that vary the draft tree (seed 001's study): a sweep qualifies when
    one of its drafts ran more than one tree, or a tree other than a chain."""
    drafted = [j for j in jobs if j.ok and j.draft != "none"]
    study = []
    for sweep in dict.fromkeys(j.sweep for j in drafted):
        members = [j for j in drafted if j.sweep == sweep]
        trees = {(j.target, j.draft, j.tree.get("shape"), draft_nodes(j)) for j in members}
        if len(trees) > len({t[:2] for t in trees}) or any(t[2] != "chain" for t in trees):
            study += members
    return sorted(study, key=lambda j: (j.target, j.draft, j.tree.get("shape", ""), draft_nodes(j) or 0))


def acceptance_table(jobs: list[Job]) -> list[str]:
    rows = []
    for j in jobs:
        steps = j.value("verify_steps")
        per_step = j.value("draft_tokens") / steps if steps else None
        rows.append([j.target, j.draft, j.tree.get("shape"), tree_label(j), draft_nodes(j), _fmt(per_step, 2),
                     with_interval(j.value("acceptance_rate"), interval(j, "acceptance_rate"), 3),
                     with_interval(j.value("acceptance_length"), interval(j, "acceptance_length"), 3),
                     alpha_cell(j), _fmt(j.value("off_top_share"), 2),
                     with_interval(j.value("tokens_per_s"), interval(j, "tokens_per_s")),
                     with_interval(j.speedup, interval(j, "speedup"), 2, "x"), predicted_cell(j),
                     f"{j.sweep}/{j.name}"])
    return _table(["target", "draft", "shape", "tree", "draft tokens (nodes)", "drafted per step",
                   "acceptance rate", "acceptance length", "α1 α2 α3 α4", "off-top share", "tokens/s", "speedup",
                   "predicted", "job"], rows)


# ---- plots -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, title: str, path: Path) -> Path:
    """Title, lay out, write and close a figure -> its path."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_time_breakdown(jobs: list[Job], path: Path) -> Path | None:
    """Stacked bars: milliseconds per new token spent in prefill / draft / verify / other."""
    ok = [j for j in jobs if j.ok and j.value("new_tokens")]
    if not ok:
        return None
    plt = _pyplot()
    several_targets = len({j.target for j in ok}) > 1
    labels = [f"{j.name}: " + (f"{j.target} · " if several_targets else "") + strategy(j) for j in ok]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(ok)))
    left = [0.0] * len(ok)
    for key in TIME_PARTS:
        widths = [1000 * (j.value(key) or 0.0) / j.value("new_tokens") for j in ok]
        ax.barh(labels, widths, left=left, label=key.removesuffix("_s"))
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()  # job order top to bottom
    ax.set_xlabel("ms per new token")
    ax.legend(ncol=len(TIME_PARTS), loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, fontsize="small")
    return _save(plt, fig, f"Time breakdown: {ok[0].sweep}", path)


def plot_acceptance(jobs: list[Job], path: Path) -> Path:
    """Seed 001: acceptance rate, acceptance length and tokens/s against draft tokens, one line per
    (draft, tree shape)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lines: dict[tuple, list[Job]] = {}
    for j in jobs:
        lines.setdefault((j.draft, j.tree.get("shape")), []).append(j)
    # colour = tree shape, line style and marker = draft
    shapes = list(dict.fromkeys(shape for _, shape in sorted(lines)))
    drafts = list(dict.fromkeys(draft for draft, _ in sorted(lines)))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    for (draft, shape), members in sorted(lines.items()):
        members.sort(key=lambda j: draft_nodes(j) or 0)
        x = [draft_nodes(j) for j in members]
        linestyle, marker = styles[drafts.index(draft) % len(styles)]
        for ax, key in zip(axes, ("acceptance_rate", "acceptance_length", "tokens_per_s")):
            ax.plot(x, [j.value(key) for j in members], linestyle=linestyle, marker=marker,
                    color=f"C{shapes.index(shape) % 10}", label=f"{draft} · {shape}")
    nodes = [draft_nodes(j) for j in jobs if draft_nodes(j)]
    for ax, title in zip(axes, ("acceptance rate", "acceptance length (accepted / verify step)", "tokens/s")):
        ax.set_title(title)
        ax.set_xlabel("draft tokens per step (tree nodes)")
        if nodes and max(nodes) / min(nodes) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(nodes)), [str(n) for n in sorted(set(nodes))])  # the budgets run, not 2^k
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(plt, fig, f"Acceptance vs draft tokens: target {jobs[0].target}", path)


def plot_positions(jobs: list[Job], path: Path) -> Path | None:
    """alpha_k against draft position (a tree's depth), one line per drafted run, with 95% bars."""
    drafted = [j for j in jobs if j.ok and alphas(j)]
    if not drafted:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, j in enumerate(drafted):
        values = alphas(j)
        x = [k + 1 for k, a in enumerate(values) if a is not None]
        y = [a for a in values if a is not None]
        records = (j.uncertainty or {}).get("alpha") or []
        bars = [records[k - 1] if k - 1 < len(records) and records[k - 1].get("lo") is not None else None for k in x]
        err = [[a - (r["lo"] if r else a) for a, r in zip(y, bars)], [(r["hi"] if r else a) - a for a, r in zip(y, bars)]]
        ax.errorbar([k + 0.04 * (i - len(drafted) / 2) for k in x], y, yerr=err, marker="o", capsize=3,
                    label=f"{j.name}: {strategy(j)}")
    ax.set_xlabel("draft position k (tree depth)")
    ax.set_ylabel("α_k = P(k accepted | 1..k-1 accepted)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return _save(plt, fig, f"Per-position acceptance: {drafted[0].sweep}", path)


def plot_prompt_speedups(jobs: list[Job], path: Path) -> Path | None:
    """Each drafted run's per-prompt speedups over its baseline (dots), their spread (box), 1x marked."""
    paired = [j for j in jobs if j.ok and j.draft != "none" and (j.uncertainty or {}).get("prompt_speedups")]
    if not paired:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(paired)))
    data = [[x for _, x in j.uncertainty["prompt_speedups"]] for j in paired]
    ax.boxplot(data, orientation="horizontal", widths=0.5, showfliers=False)
    for i, values in enumerate(data, 1):
        ax.scatter(values, [i] * len(values), s=12, alpha=0.6, color=["C3" if x < 1 else "C0" for x in values])
    ax.axvline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(1, len(paired) + 1), [f"{j.name}: {strategy(j)}" for j in paired])
    ax.invert_yaxis()
    ax.set_xlabel("per-prompt speedup over the baseline (red: slower)")
    return _save(plt, fig, f"Paired per-prompt speedups: {paired[0].sweep}", path)


# ---- the report --------------------------------------------------------------------------------

def build_report(jobs: list[Job], sweep_dirs: list[Path], out_dir: Path) -> str:
    """Write the PNGs into out_dir and return REPORT.md's text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    lines = ["# specsweep report", "",
             f"Generated {now:%Y-%m-%d %H:%M UTC} by `python -m specsweep report` from "
             + ", ".join(f"`{d}`" for d in sweep_dirs) + ".", "",
             "Definitions (README): acceptance rate = accepted / draft tokens; acceptance length = mean "
             "accepted draft tokens per verification step (tokens per target forward = length + 1); tokens/s = "
             "new tokens / timed generate seconds; speedup = tokens/s / tokens/s of the draft=none run with the "
             "same target, prompts, decode settings and hardware (same sweep, else another reported sweep "
             "on the same machine, named in the table); pass@1 with n = k = 1 (sandboxed HumanEval); lossless = "
             "greedy outputs against that draft=none run's, per sample: exact, ties (they part only where the "
             "target's top-2 logits there are a numeric tie, within a few ulps of its dtype: 8 for bf16, 64 for "
             "fp32), DIVERGED (some sample parts at a larger margin: a bug), n/a (no such run, or sampling).", "",
             "Intervals: `x [lo, hi]` is a 95% bootstrap interval over prompts "
             f"({uncertainty.DRAWS} resamples, seed {uncertainty.SEED}; a prompt's repeats stay together); a "
             "speedup's resamples take the same prompts for the run and its baseline (paired). 'not "
             "distinguishable from' lists the runs against the same baseline whose speedup differs from this "
             "one's by less than the interval of that difference (paired the same way: it holds 0); the "
             "baseline itself is listed when the speedup's interval holds 1. predicted = the speedup the run's "
             "measured acceptance predicts on the machine's cached verify-cost curve t(n)/t(1): "
             "sum(accepted + 1) / sum t(draft + 1)/t(1) over its steps, with drafting free / at its measured "
             "time (one number where they agree; prefill left out). α_k = accepted_k / offered_k: how often draft position k (a tree's depth k) was accepted "
             "when positions 1..k-1 were; off-top share = the share of tree steps with an accepted token whose "
             "accepted path leaves the top-ranked child somewhere.", ""]
    for label in dict.fromkeys(j.sweep for j in jobs):
        sweep = [j for j in jobs if j.sweep == label]
        bad = [j for j in sweep if not j.ok]
        lines += [f"## {label}", "", f"`{sweep[0].sweep_dir}`: {len(sweep) - len(bad)} finished, "
                  f"{sum(j.status == 'failed' for j in bad)} failed, {sum(j.status == 'missing' for j in bad)} missing.",
                  "", *provenance(sweep), "", settings_line(sweep), "", *strategy_table(sweep), ""]
        positions = position_table(sweep)
        if positions:
            lines += ["Per-position acceptance α_k (95% intervals):", "", *positions, ""]
            plot = plot_positions(sweep, out_dir / f"positions_{_slug(label)}.png")
            lines += [f"![per-position acceptance of {label}]({plot.name})", ""]
        slower = slower_lines(sweep)
        if slower:
            plot = plot_prompt_speedups(sweep, out_dir / f"prompts_{_slug(label)}.png")
            lines += ["Prompts slower than the baseline (per-prompt speedup < 1, paired by task id):", "", *slower, "",
                      f"![per-prompt speedups of {label}]({plot.name})", ""]
        repeats = repeat_table(sweep)
        if repeats:
            lines += ["Repeats: run-to-run spread (whole passes; one prompt across passes) apart from "
                      "prompt-to-prompt spread (coefficients of variation of tokens/s):", "", *repeats, ""]
        audited = audit_table(sweep)
        if audited:
            lines += ["Losslessness audit (first differing token per sample; margin = the reference's top-1 minus "
                      "top-2 logit there, in ulps of the target's dtype):", "", *audited, ""]
        if bad:
            lines += ["Jobs without results:", ""]
            lines += [f"- job {j.name} ({strategy(j)}): {j.status}: {j.error}" for j in bad] + [""]
        plot = plot_time_breakdown(sweep, out_dir / f"time_{_slug(label)}.png")
        if plot:
            lines += ["Time per new token (ms):", "", *time_table(sweep), "",
                      f"![time breakdown of {label}]({plot.name})", ""]
    study = tree_jobs(jobs)
    if study:
        lines += ["## Acceptance vs draft tokens (seed 001)", "",
                  "Draft tokens = the tree's nodes (all proposed tokens, the root not counted); 'drafted per "
                  "step' is what the draft actually proposed on average (model-free drafts may offer fewer).",
                  "", *acceptance_table(study), ""]
        for target in dict.fromkeys(j.target for j in study):
            plot = plot_acceptance([j for j in study if j.target == target], out_dir / f"acceptance_{_slug(target)}.png")
            lines += [f"![acceptance vs draft tokens, {target}]({plot.name})", ""]
    return "\n".join(lines)


def publish_wandb(markdown: str, jobs: list[Job], sweep_dirs: list[Path], project: str | None,
                  entity: str | None) -> tuple[bool, str]:
    """A W&B Report with the same tables and panels, over the W&B runs of these sweeps (grouped by
    sweep; see tracking.sweep_group). Returns (published, message)."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return False, "skipped: wandb-workspaces is not installed (pip install wandb-workspaces)"
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False, f"skipped: WANDB_MODE={os.environ['WANDB_MODE']} (publishing needs online mode)"
    import wandb

    try:
        api = wandb.Api(timeout=20)
    except Exception as err:  # no API key, no network
        return False, f"skipped: W&B is not reachable or not logged in ({err})"
    loggers = [j.config.get("logger") or {} for j in jobs]
    project = project or next((lg.get("project") for lg in loggers if lg.get("name") == "wandb"), "specsweep")
    entity = entity or next((lg.get("entity") for lg in loggers if lg.get("entity")), None) or api.default_entity
    groups = [sweep_group(d) for d in sweep_dirs]
    runset = wr.Runset(entity=entity, project=project, name="sweeps", filters=f"Metric('Group') in {groups!r}")
    panels = [wr.BarPlot(title="tokens/s", metrics=["tokens_per_s"]),
              wr.BarPlot(title="acceptance rate", metrics=["acceptance_rate"]),
              wr.BarPlot(title="pass@1", metrics=["evaluation/pass_at_1"]),
              wr.ScatterPlot(title="acceptance rate vs draft tokens", x="tree_nodes", y="acceptance_rate"),
              wr.ScatterPlot(title="acceptance length vs draft tokens", x="tree_nodes", y="acceptance_length"),
              wr.BarPlot(title="time breakdown (s)", metrics=list(TIME_PARTS)),
              wr.BarPlot(title="per-position acceptance α_1..α_4", metrics=[f"alpha_by_position/{k}" for k in range(1, 5)]),
              wr.BarPlot(title="predicted speedup (verify-cost curve)", metrics=["predicted/speedup"])]
    body = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", markdown)  # the PNGs are local files
    try:
        report = wr.Report(entity=entity, project=project, title="specsweep report",
                           description=", ".join(groups),
                           blocks=[wr.PanelGrid(runsets=[runset], panels=panels), wr.MarkdownBlock(text=body)])
        report.save()
    except Exception as err:
        return False, f"failed: {type(err).__name__}: {err}"
    return True, f"published: {report.url}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m specsweep report",
                                     description="Sweep dirs -> REPORT.md and PNG plots (reads only results files).")
    parser.add_argument("sweep_dirs", nargs="+", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--out", type=Path, help="where REPORT.md and the plots go (default: the first sweep dir)")
    parser.add_argument("--wandb", action="store_true", help="also publish a W&B Report (online, wandb-workspaces)")
    parser.add_argument("--project", help="W&B project of the runs (default: the runs' logger.project)")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.entity, else your default)")
    args = parser.parse_args(argv)
    try:
        jobs = load_sweeps(args.sweep_dirs)
        out_dir = args.out or args.sweep_dirs[0]
        markdown = build_report(jobs, args.sweep_dirs, out_dir)
    except SpecsweepError as err:
        print(f"specsweep: error: {err}", file=sys.stderr)
        return 2
    (out_dir / REPORT).write_text(markdown + "\n")
    print(f"report: {out_dir / REPORT}")
    if args.wandb:
        published, message = publish_wandb(markdown, jobs, args.sweep_dirs, args.project, args.entity)
        print(f"W&B report: {message}")
        return 0 if published or message.startswith("skipped") else 1
    return 0


if __name__ == "__main__":  # also runnable as `python -m specsweep.app.report`
    sys.exit(main(sys.argv[1:]))
