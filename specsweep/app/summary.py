"""End of a multirun: one table and summary.csv built by scanning the sweep dir's results files.

Hydra's ``on_multirun_end`` receives no job results, and SLURM jobs write theirs on other nodes, so
the summary reads only what each job left on disk: metrics.json, or error.json for a failed job.
Each decoding run's losslessness audit (`specsweep.app.audit`: its greedy outputs in samples.jsonl
against the draft=none run's) goes into summary.csv, the table, and its metrics.json (``audit``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from specsweep.app import audit
from specsweep.app.report import Job, load_sweeps
from specsweep.app.results import METRICS, write_json
from specsweep.errors import SpecsweepError

COLUMNS = ("tokens_per_s", "speedup", "acceptance_rate", "acceptance_length", "tokens_per_target_forward",
           "new_tokens", "draft_s", "verify_s", "wall_s", "pass_at_1")
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
        row = {"job": job.name, **{k: v for k, v in job.choices.items() if "/" not in k}, "status": job.status}
        if job.ok:
            row.update({k: job.value(k) for k in COLUMNS if k in job.metrics})
            if job.speedup is not None:
                row["speedup"] = job.speedup
            if job.audit is not None:
                row.update(audit.columns(job.audit))
        else:
            row.update(error=job.error, log=str(job.path))
        rows.append(row)
    return rows


def record_audits(jobs: list[Job]) -> None:
    """Each audited job's audit into its metrics.json (``audit``), atomically; a file whose audit
    is already this one is left untouched (a resumed sweep does not rewrite finished jobs)."""
    for job in jobs:
        if job.audit is not None and job.metrics.get("audit") != job.audit:
            job.metrics["audit"] = job.audit
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
    shown = ("tokens_per_s", "speedup", "acceptance_rate", "acceptance_length", "pass_at_1")
    table = Table(*choice_keys, "status", *shown, "lossless", title="sweep summary")
    for row in rows:
        cells = ([_fmt(row.get(k)) for k in shown] if row["status"] == "ok"
                 else [row.get("error", "")[:60]] + [""] * (len(shown) - 1))
        table.add_row(*[str(row.get(k, "")) for k in choice_keys], row["status"], *cells, _lossless(row))
    return table


def _lossless(row: dict) -> str:
    verdict = row.get("lossless")
    if verdict == audit.DIVERGED:
        return f"[red]DIVERGED[/red] {row['real_divergences']}"
    if verdict == audit.TIES:
        return f"ties {row['tie_divergences']}"
    return verdict or ""


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = load(sweep_dir)
        record_audits(jobs)
        rows = summary_rows(jobs)
        path = write_summary(sweep_dir, rows)
        console = Console()
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
