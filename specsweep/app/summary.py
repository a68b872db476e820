"""End of a multirun: one table and summary.csv built by scanning the sweep dir's results files.

Hydra's ``on_multirun_end`` receives no job results, and SLURM jobs write theirs on other nodes, so
the summary reads only what each job left on disk: metrics.json, or error.json for a failed job.
Each decoding run's losslessness audit (`specsweep.app.audit`: its greedy outputs in samples.jsonl
against the draft=none run's) goes into summary.csv, the table, and its metrics.json (``audit``).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from specsweep.app import audit
from specsweep.app.report import Job, alphas, interval, load_sweeps, with_interval
from specsweep.app.results import METRICS, write_json
from specsweep.errors import SpecsweepError

COLUMNS = ("tokens_per_s", "speedup", "acceptance_rate", "acceptance_length", "tokens_per_target_forward",
           "new_tokens", "draft_s", "verify_s", "wall_s", "pass_at_1")
# the numbers whose 95% bootstrap interval goes into summary.csv as NAME_lo, NAME_hi (specsweep.app.uncertainty)
INTERVALS = ("tokens_per_s", "speedup", "acceptance_rate", "acceptance_length", "pass_at_1")
# read by __main__ to set the exit status: jobs without results, jobs whose outputs are not lossless
failed_jobs: list[str] = []
diverged_jobs: list[str] = []


def load(sweep_dir: Path) -> list[Job]:
    """Every job of the sweep, read the way the report reads them (`specsweep.app.report.load_sweeps`:
    baseline = the draft=none job of the same resolved target, prompts, decode settings, seed and
    hardware; audit = the outputs against that baseline's)."""
    try:
        return load_sweeps([sweep_dir], decode_only=False)
    except SpecsweepError:  # no job left anything behind
        return []


def collect(sweep_dir: Path) -> list[dict]:
    return summary_rows(load(sweep_dir))


def summary_rows(jobs: list[Job]) -> list[dict]:
    """One row per job dir: its choices, status, metrics or error, its speedup and its audit."""
    rows = []
    for job in jobs:
        row = {"job": job.name, **{k: v for k, v in job.choices.items() if "/" not in k}, **override_values(job),
               "status": job.status}
        if job.ok:
            row.update({k: job.value(k) for k in COLUMNS if k in job.metrics})
            if job.speedup is not None:
                row["speedup"] = job.speedup
            row.update(uncertainty_columns(job))
            if job.audit is not None:
                row.update(audit.columns(job.audit))
        else:
            row.update(error=job.error, log=str(job.path))
        rows.append(row)
    return rows


def override_values(job: Job) -> dict:
    """The job's value overrides (``draft.heads=3``), from the overrides.yaml Hydra writes in every
    job dir: the table shows those that differ between jobs."""
    path = job.path / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    values = {}
    for item in OmegaConf.load(path):
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if "." in key and not key.startswith("hydra."):
            values[key] = value
    return values


def uncertainty_columns(job: Job) -> dict:
    """summary.csv's columns from the bootstrap (NAME_lo, NAME_hi), alpha_k, the predicted speedup,
    the paired per-prompt comparison and the repeats' spread."""
    row = {}
    for key in INTERVALS:
        record = interval(job, key)
        if record is not None:
            row.update({f"{key}_lo": record["lo"], f"{key}_hi": record["hi"]})
    row.update({f"alpha_{k}": a for k, a in enumerate(alphas(job, limit=64), 1)})
    if job.value("off_top_share") is not None:
        row["off_top_share"] = job.value("off_top_share")
    record = job.uncertainty or {}
    prediction = job.value("predicted") or {}
    row.update(predicted_speedup=prediction.get("speedup"), predicted_speedup_with_draft=prediction.get("speedup_with_draft"))
    if "paired_prompts" in record:
        row.update(paired_prompts=record["paired_prompts"], slower_prompts=len(record["slower_than_baseline"]))
    spread = record.get("spread") or {}
    row.update(repeats=spread.get("repeats", job.value("repeats") or 1), run_to_run_cv=spread.get("run_to_run_cv"),
               prompt_to_prompt_cv=spread.get("prompt_to_prompt_cv"),
               not_distinguishable_from=" ".join(job.indistinct))
    return row


def record_audits(jobs: list[Job]) -> None:
    """Each audited job's audit and bootstrap record into its metrics.json (``audit``,
    ``uncertainty``), atomically; a file already holding these is left untouched (a resumed sweep
    does not rewrite finished jobs)."""
    for job in jobs:
        changed = False
        for key, value in (("audit", job.audit), ("uncertainty", job.uncertainty)):
            if value is not None and job.metrics.get(key) != value:
                job.metrics[key], changed = value, True
        if changed:
            write_json(job.path / METRICS, job.metrics)


def divergence_line(job: str, record: dict) -> str:
    """One line for a job that is not lossless: its worst divergence (task, position, margin)."""
    return (f"[red]DIVERGED[/red] job {job}: outputs part from the draft=none run's ({record.get('reference', '?')}) "
            f"at a margin that is no numeric tie: {audit.describe(record.get('worst'))}; "
            f"{record['diverged']} of {record['compared']} samples")


def write_summary(sweep_dir: Path, rows: list[dict]) -> Path:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    path = sweep_dir / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def summary_table(rows: list[dict]) -> Table:
    choice_keys = [k for k in ("target", "draft", "tree", "dataset", "decode", "hardware")
                   if len({r.get(k) for r in rows}) > 1] or ["draft"]
    choice_keys += [k for k in dict.fromkeys(k for r in rows for k in r if "." in k) if len({r.get(k) for r in rows}) > 1]
    shown = ("tokens_per_s", "speedup", "predicted", "acceptance_rate", "acceptance_length", "α1..α4", "pass_at_1")
    table = Table("job", *choice_keys, "status", *shown, "lossless", "≈ (not distinguishable)",
                  title="sweep summary (95% bootstrap intervals over prompts)")
    for row in rows:
        cells = (_cells(row) if row["status"] == "ok" else [row.get("error", "")[:60]] + [""] * (len(shown) - 1))
        table.add_row(row["job"], *[str(row.get(k, "-")) for k in choice_keys], row["status"], *cells, _lossless(row),
                      row.get("not_distinguishable_from") or "")
    return table


def _cells(row: dict) -> list[str]:
    def cell(key, digits=2, suffix=""):
        lo = row.get(f"{key}_lo")
        record = None if lo is None else {"lo": lo, "hi": row[f"{key}_hi"]}
        return with_interval(row.get(key), record, digits, suffix)

    alphas_ = " ".join(_fmt(row[f"alpha_{k}"], 2) for k in range(1, 5) if f"alpha_{k}" in row) or "-"
    return [cell("tokens_per_s"), cell("speedup", 2, "x"), _fmt(row.get("predicted_speedup"), 2, "x"),
            cell("acceptance_rate", 3), cell("acceptance_length", 3), alphas_, cell("pass_at_1", 2)]


def _lossless(row: dict) -> str:
    verdict = row.get("lossless")
    if verdict == audit.DIVERGED:
        return f"[red]DIVERGED[/red] {row['real_divergences']}"
    if verdict == audit.TIES:
        return f"ties {row['tie_divergences']}"
    return verdict or ""


def _fmt(value, digits: int = 3, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}" if isinstance(value, float) else str(value)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = load(sweep_dir)
        record_audits(jobs)
        rows = summary_rows(jobs)
        path = write_summary(sweep_dir, rows)
        # a terminal keeps its width; piped output (logs, SLURM) gets room for the intervals
        console = Console(width=None if sys.stdout.isatty() else 220)
        console.print(summary_table(rows))
        console.print(f"summary: {path}; each job's metrics.json and samples.jsonl: {sweep_dir}/<job>/; "
                      f"a report with plots: python -m specsweep report {sweep_dir}")
        failed_jobs[:] = [r["job"] for r in rows if r["status"] != "ok"]
        for row in rows:
            if row["status"] != "ok":
                console.print(f"[red]{row['status']}[/red] {row['job']}: {row.get('error', '')} (see {row['log']})")
        diverged = [j for j in jobs if j.audit and j.audit["lossless"] == audit.DIVERGED]
        diverged_jobs[:] = [j.name for j in diverged]
        for job in diverged:
            console.print(divergence_line(job.name, job.audit))
