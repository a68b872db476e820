"""End of a multirun: one table and summary.csv built by scanning the sweep dir's results files.

Hydra's ``on_multirun_end`` receives no job results, and SLURM jobs write theirs on other nodes, so
the summary reads only what each job left on disk: metrics.json, or error.json for a failed job.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from specsweep.results import ERROR, METRICS

COLUMNS = ("tokens_per_s", "speedup", "acceptance_rate", "acceptance_length", "tokens_per_target_forward",
           "new_tokens", "draft_s", "verify_s", "wall_s", "pass_at_1")
failed_jobs: list[str] = []  # read by __main__ to set the exit status


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job dir: its choices, status, metrics or error; speedup vs draft=none of the same setting."""
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                          key=lambda p: (len(p.name), p.name)):
        row = {"job": job_dir.name}
        if (job_dir / METRICS).is_file():
            metrics = json.loads((job_dir / METRICS).read_text())
            row.update(metrics.get("choices", {}), status="ok", **{k: metrics.get(k) for k in COLUMNS if k in metrics})
        elif (job_dir / ERROR).is_file():
            error = json.loads((job_dir / ERROR).read_text())
            row.update(error.get("choices", {}), status="failed", error=error["error"], log=str(job_dir))
        else:
            row.update(status="missing", log=str(job_dir))
        rows.append(row)
    _add_speedup(rows)
    return rows


def _add_speedup(rows: list[dict]) -> None:
    def setting(row):  # everything but the draft and tree identifies "the same target, hardware, prompts"
        return tuple(row.get(k) for k in ("target", "dataset", "decode", "hardware"))

    baseline = {setting(r): r["tokens_per_s"] for r in rows if r.get("draft") == "none" and r["status"] == "ok"}
    for row in rows:
        base = baseline.get(setting(row))
        if row["status"] == "ok" and base:
            row["speedup"] = row["tokens_per_s"] / base


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
    table = Table(*choice_keys, "status", *COLUMNS[:5], title="sweep summary")
    for row in rows:
        cells = [_fmt(row.get(k)) for k in COLUMNS[:5]] if row["status"] == "ok" else [row.get("error", "")[:60]] + [""] * 4
        table.add_row(*[str(row.get(k, "")) for k in choice_keys], row["status"], *cells)
    return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        path = write_summary(sweep_dir, rows)
        console = Console()
        console.print(summary_table(rows))
        console.print(f"summary: {path}")
        failed_jobs[:] = [r["job"] for r in rows if r["status"] != "ok"]
        for row in rows:
            if row["status"] != "ok":
                console.print(f"[red]{row['status']}[/red] {row['job']}: {row.get('error', '')} (see {row['log']})")
