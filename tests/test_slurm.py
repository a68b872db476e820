"""A Hydra multirun through the repo's `hydra/launcher=slurm` profile on a real SLURM cluster.

Needs a running cluster (locally: `launchers/local-slurm.sh`). Skipped with the reason when
`sinfo` is missing or no node is usable; set SPECSWEEP_REQUIRE_SLURM=1 (CI does, after starting
the local cluster) to turn those skips into failures.

    pytest -m slurm tests/test_slurm.py
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specsweep import CONF_DIR

pytestmark = pytest.mark.slurm

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CONF = CONF_DIR
APP = TESTS / "slurm_app" / "app.py"
USABLE = {"idle", "mixed"}  # node states in which a new 1-CPU job starts right away


def _unavailable(reason: str) -> None:
    if os.environ.get("SPECSWEEP_REQUIRE_SLURM") == "1":
        pytest.fail(f"SPECSWEEP_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster() -> list[str]:
    """Skips (or fails, see module doc) unless `sinfo` answers with at least one usable node."""
    if shutil.which("sinfo") is None:
        _unavailable("sinfo not found: no SLURM here (start one with launchers/local-slurm.sh)")
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        _unavailable("sinfo timed out: slurmctld not answering (launchers/local-slurm.sh status)")
    if proc.returncode != 0:
        _unavailable(f"sinfo failed: {proc.stderr.strip() or proc.stdout.strip()}")
    nodes = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    usable = [name for name, state in nodes if state in USABLE]
    if not usable:
        _unavailable(f"no SLURM node idle (sinfo: {nodes or 'no nodes'})")
    return usable


def test_multirun_2x2_runs_every_job_under_slurm(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable, str(APP), "-m",
        f"hydra.searchpath=[{CONF.as_uri()}]",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep_dir}",
        # tiny jobs: no need to hold 4 GB or an hour of the node each
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.mem_gb=1",
        "a=1,2",
        "b=x,y",
    ]
    # drop an enclosing job's SLURM_* (if pytest runs inside one), keep the client's config
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("SLURM_") or k in ("SLURM_CONF", "SLURM_CLUSTERS")
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"sweep failed\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")]
    assert sorted((r["a"], r["b"]) for r in records) == [(1, "x"), (1, "y"), (2, "x"), (2, "y")], (
        f"expected one result per grid point in {sweep_dir}; stderr:\n{proc.stderr}"
    )
    outer = os.environ.get("SLURM_JOB_ID")  # set when pytest itself runs inside a SLURM job
    job_ids = {r["slurm_job_id"] for r in records}
    assert None not in job_ids, f"a job ran outside SLURM: {records}"
    assert outer not in job_ids, "jobs report the test's own SLURM job id, not their own"
    assert len(job_ids) == 4, f"expected 4 distinct SLURM jobs, got {sorted(job_ids)}"
    # one array job, one task per grid point, in Hydra's job order
    assert len({r["slurm_array_job_id"] for r in records}) == 1
    assert sorted(int(r["slurm_array_task_id"]) for r in records) == [0, 1, 2, 3]
    assert all(r["slurm_cpus_per_task"] == "1" for r in records)
    assert all(r["hydra_job_id"].startswith(r["slurm_array_job_id"] + "_") for r in records)
    # submitit's scripts and logs land under the sweep dir (submitit_folder in slurm.yaml)
    scripts = list((sweep_dir / ".submitit").glob("*/*_submission.sh"))
    assert scripts, f"no submitit folder under {sweep_dir}"
    text = scripts[0].read_text()
    assert "#SBATCH --mem=1GB" in text and "#SBATCH --time=5" in text


def test_specsweep_sweep_through_slurm_keeps_failures_and_resumes(slurm_cluster, model_dirs, tmp_path):
    """The real app: a 2x2 grid as a SLURM array; jobs on a missing prompt file fail without
    taking the others down; after the file appears, re-running the same command completes only them."""
    good, late = tmp_path / "good.jsonl", tmp_path / "late.jsonl"
    good.write_text(json.dumps({"prompt": "def add(a, b):\n    return"}) + "\n")
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "specsweep", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}",
           "hydra.launcher.timeout_min=10", "hydra.launcher.mem_gb=2", "target=local",
           f"target.path={model_dirs['target']}", "dataset=jsonl", f"dataset.path={good},{late}",
           "draft=none,prompt-lookup", "decode.max_new_tokens=8", "hardware=cpu", f"cache_dir={tmp_path / 'cache'}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k in ("SLURM_CONF", "SLURM_CLUSTERS")}

    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert first.returncode == 1, first.stderr  # some jobs failed, and the exit status says so
    rows = {r["job"]: r for r in csv.DictReader((sweep_dir / "summary.csv").open())}
    assert sorted(r["status"] for r in rows.values()) == ["failed", "failed", "ok", "ok"]
    assert all("late.jsonl: no such file" in r["error"] for r in rows.values() if r["status"] == "failed")
    done = {job: sweep_dir / job / "metrics.json" for job, r in rows.items() if r["status"] == "ok"}
    job_ids = {json.loads(p.read_text())["slurm_job_id"] for p in done.values()}
    assert None not in job_ids and len(job_ids) == 2  # each ran as its own SLURM task
    stamps = {job: p.stat().st_mtime_ns for job, p in done.items()}

    late.write_text(json.dumps({"prompt": "import os\nimport"}) + "\n")
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert {job: p.stat().st_mtime_ns for job, p in done.items()} == stamps  # finished jobs were not redone


def _job_ids(sweep_dir: Path) -> list[str]:
    """SLURM job ids of the sweep's array tasks, from submitit's folder (``<array>_<task>``)."""
    return sorted({p.name.split("_submission")[0] for p in (sweep_dir / ".submitit").glob("*/*_submission.sh")})


def _running_job_ids(sweep_dir: Path) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout.split("\n")
    running = {line.split()[0] for line in out if line.strip().endswith("RUNNING")}
    return [j for j in running if any(j.startswith(k.split("_")[0]) for k in _job_ids(sweep_dir))]


@pytest.mark.parametrize("interrupt", ["preempted", "timed-out"])
def test_a_preempted_or_timed_out_job_is_requeued_and_resumes_at_its_next_sample(slurm_cluster, model_dirs,
                                                                                 tmp_path, interrupt):
    """SLURM's signals mid-job, as submitit's own `_interrupt` sends them (preemption: SIGTERM then
    USR2; the time limit: USR2): the job checkpoints, is requeued, and its final samples are an
    uninterrupted run's."""
    import threading
    import time

    from specsweep.app.resume import read_samples

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("def add(a, b):\n    return", "import os\nimport", "for i in range(", "x = [1, 2,",
                                "class A:\n    def", "print(")))
    common = ["target=local", f"target.path={model_dirs['target']}", "dataset=jsonl", f"dataset.path={prompts}",
              "draft=none", "decode.max_new_tokens=200", "hardware=cpu", f"cache_dir={tmp_path / 'cache'}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k in ("SLURM_CONF", "SLURM_CLUSTERS")}
    local = tmp_path / "local"
    proc = subprocess.run([sys.executable, "-m", "specsweep", *common, f"hydra.run.dir={local}"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reference = read_samples(local / "samples.jsonl")[0]

    sweep_dir = tmp_path / "sweep"
    samples_file = sweep_dir / "0" / "samples.jsonl"
    signalled = []

    def interrupt_after_the_first_sample():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            running = _running_job_ids(sweep_dir)
            if running and len(read_samples(samples_file)[0]) >= 1:
                signals = (["SIGTERM"] if interrupt == "preempted" else []) + ["USR2"]
                for sig in signals:
                    subprocess.run(["scancel", "--signal", sig, running[0]], check=True)
                signalled.append(len(read_samples(samples_file)[0]))
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=interrupt_after_the_first_sample, daemon=True)
    watcher.start()
    cmd = [sys.executable, "-m", "specsweep", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}",
           "hydra.launcher.timeout_min=10", "hydra.launcher.mem_gb=2", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    watcher.join(timeout=5)
    assert signalled, f"the job ended before it could be signalled\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = read_samples(samples_file)[0]
    keys = ("task_id", "output_ids", "new_tokens", "prompt_ids")
    assert [[s[k] for k in keys] for s in samples] == [[s[k] for k in keys] for s in reference]
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    starts = metrics["resume"]["starts"]
    assert len(starts) == 2 and starts[1]["slurm_restart_count"] == 1, starts
    assert metrics["resume"]["resumed_samples"] >= 1 and sum(metrics["resume"]["samples_per_start"]) == 6
