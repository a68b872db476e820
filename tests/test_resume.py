"""Nothing lost: a job resumes at its next sample; SIGTERM, a failing W&B and a full disk leave result
files that are valid and complete up to the last finished sample. Tiny local models, in this process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from specsweep import CONF_DIR
from specsweep.app import resume, run
from specsweep.app.resume import read_samples
from specsweep.errors import Terminated
from tests.conftest import CACHE_DIR

COUNTERS = ("task_id", "prompt_ids", "output_ids", "new_tokens", "draft_tokens", "accepted_tokens", "verify_steps")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": p} for p in ("def add(a, b):\n    return", "import os\nimport", "for i in range(", "x = [1, 2,",
                                    "class A:\n    def", "print(")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(model_dirs, prompts, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["target=local", f"target.path={model_dirs['target']}", "dataset=jsonl",
                                            f"dataset.path={prompts}", "decode.max_new_tokens=16", "hardware=cpu",
                                            f"cache_dir={CACHE_DIR}", *overrides])


def decode(cfg, run_dir: Path) -> dict:
    return run.run_decode(cfg, run_dir, {"draft": "prompt-lookup"})


@pytest.fixture(scope="module")
def whole(model_dirs, prompts, tmp_path_factory):
    """An uninterrupted run: (its dir, its samples)."""
    run_dir = tmp_path_factory.mktemp("whole")
    decode(config(model_dirs, prompts), run_dir)
    return run_dir, read_samples(run_dir / "samples.jsonl")[0]


def interrupted_copy(whole_dir: Path, run_dir: Path, keep: int, torn: bool = True) -> list[dict]:
    """What a job killed after ``keep`` samples leaves behind (a torn line after them, if ``torn``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(whole_dir / "run.json", run_dir / "run.json")
    lines = (whole_dir / "samples.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "samples.jsonl").write_text("".join(lines[:keep]) + (lines[keep][:25] if torn else ""))
    return [json.loads(line) for line in lines[:keep]]


def test_a_killed_job_resumes_at_its_next_sample(model_dirs, prompts, whole, tmp_path):
    whole_dir, expected = whole
    kept = interrupted_copy(whole_dir, tmp_path, keep=4)
    metrics = decode(config(model_dirs, prompts), tmp_path)
    samples, torn = read_samples(tmp_path / "samples.jsonl")
    assert not torn and len(samples) == len(expected) == 6
    assert samples[:4] == kept  # resumed samples keep their own timings, untouched
    assert [[s[k] for k in COUNTERS] for s in samples] == [[s[k] for k in COUNTERS] for s in expected]
    assert [s["start"] for s in samples] == [0] * 4 + [1] * 2
    assert metrics["resume"]["resumed_samples"] == 4 and metrics["resume"]["samples_per_start"] == [4, 2]
    assert len(metrics["resume"]["starts"]) == 2 and metrics["samples"] == 6
    # the run's rates are sums over its samples, whichever start decoded them
    assert metrics["new_tokens"] == sum(s["new_tokens"] for s in samples)
    assert metrics["tokens_per_s"] == pytest.approx(metrics["new_tokens"] / sum(s["wall_s"] for s in samples))
    assert json.loads((tmp_path / "metrics.json").read_text())["resume"] == metrics["resume"]


def test_a_finished_decode_resumes_with_no_sample_to_decode(model_dirs, prompts, whole, tmp_path):
    whole_dir, expected = whole
    interrupted_copy(whole_dir, tmp_path, keep=6, torn=False)  # killed after decoding, before metrics.json
    metrics = decode(config(model_dirs, prompts), tmp_path)
    assert metrics["resume"]["resumed_samples"] == 6 and read_samples(tmp_path / "samples.jsonl")[0] == expected


@pytest.mark.parametrize("change, why", [
    ("config", "the config differs (decode.max_new_tokens: 16 -> 12)"),
    ("commit", "the code differs (commit"),
    ("lock", "the locked environment differs"),
])
def test_another_config_commit_or_lock_starts_afresh_and_says_why(model_dirs, prompts, whole, tmp_path, monkeypatch,
                                                                   caplog, change, why):
    whole_dir, _ = whole
    interrupted_copy(whole_dir, tmp_path, keep=3)
    overrides = ["decode.max_new_tokens=12"] if change == "config" else []
    if change == "commit":
        monkeypatch.setattr(run, "git_commit", lambda: "0" * 40)
    if change == "lock":
        monkeypatch.setattr(run, "lock_hash", lambda *a: "f" * 64)
    metrics = decode(config(model_dirs, prompts, *overrides), tmp_path)
    assert metrics["resume"]["resumed_samples"] == 0 and why in metrics["resume"]["started_afresh_because"]
    assert [s["start"] for s in read_samples(tmp_path / "samples.jsonl")[0]] == [0] * 6
    assert any(why in r.getMessage() and "starting afresh" in r.getMessage() for r in caplog.records)
    assert len(read_samples(tmp_path / "samples.jsonl.replaced")[0]) == 3  # set aside, not deleted


def test_a_torn_line_is_dropped_and_only_whole_samples_are_read(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"task_id": "a"}\n{"task_id": "b"}\n{"task_id": "c", "out')
    assert read_samples(path) == ([{"task_id": "a"}, {"task_id": "b"}], True)
    assert resume.first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c: 2 -> 3"


def test_failing_wandb_mid_run_leaves_the_results_complete(model_dirs, prompts, whole, tmp_path, monkeypatch):
    from tests.test_tracking import Recorder

    from specsweep.app import tracking

    class BreaksMidRun(Recorder):  # logging works for two samples, then every W&B call raises
        def _maybe_fail(self, name):
            super()._maybe_fail(name)
            if self.calls.count("log") > 2:
                raise RuntimeError("W&B went away")

    backend = BreaksMidRun()
    monkeypatch.setattr(run, "make_tracker", lambda cfg_logger, *a: tracking.WandbTracker(cfg_logger, *a,
                                                                                          backend=backend))
    metrics = decode(config(model_dirs, prompts, "logger=wandb"), tmp_path)
    assert metrics["samples"] == 6 and len(read_samples(tmp_path / "samples.jsonl")[0]) == 6
    assert json.loads((tmp_path / "metrics.json").read_text())["samples"] == 6
    assert backend.calls.count("log") > 3  # it kept trying, each failure only a warning


def test_sigterm_mid_job_keeps_every_finished_sample_and_the_rerun_completes(model_dirs, prompts, whole, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "specsweep", "target=local", f"target.path={model_dirs['target']}", "dataset=jsonl",
            f"dataset.path={prompts}", "decode.max_new_tokens=64", "hardware=cpu", "draft=none",
            f"cache_dir={CACHE_DIR}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not read_samples(run_dir / "samples.jsonl")[0] and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the job finished before the signal (a very fast machine)")
    assert proc.returncode == 143, err
    assert "terminated by SIGTERM; the same command resumes at the next sample" in err and "Traceback" not in err
    kept, torn = read_samples(run_dir / "samples.jsonl")
    assert kept and not torn and not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "error.json").read_text())["type"] == "Terminated"
    decode(config(model_dirs, prompts, "decode.max_new_tokens=64", "draft=none"), run_dir)  # the same job again
    samples = read_samples(run_dir / "samples.jsonl")[0]
    assert samples[:len(kept)] == kept and len(samples) == 6
    assert json.loads((run_dir / "metrics.json").read_text())["resume"]["resumed_samples"] == len(kept)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped with the reason elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "specsweep-test", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or 'not root'}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_keeps_every_finished_sample(model_dirs, prompts, whole, small_disk):
    run_dir = small_disk / "run"
    run_dir.mkdir()
    filler = small_disk / "filler"
    cfg = config(model_dirs, prompts)

    class FillsUp:  # after the second sample the disk has 20 KB left: the next rewrite fails midway
        def __init__(self, *a):
            self.logged = 0

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def log_sample(self, index, sample):
            if index == 1:
                free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
                filler.write_bytes(b"x" * max(free - 20_000, 0))

        def finish(self, *a):
            pass

    # a sample of 16 tokens is ~1-2 KB: pad each with 8 KB of text so the third rewrite overflows
    real_write = run.write_jsonl
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "make_tracker", lambda *a: FillsUp())
        mp.setattr(run, "write_jsonl", lambda path, rows: real_write(path, [{**r, "pad": "y" * 8000} for r in rows]))
        with pytest.raises(OSError) as err:
            decode(cfg, run_dir)
    assert err.value.errno == 28  # ENOSPC
    samples, torn = read_samples(run_dir / "samples.jsonl")
    assert not torn and [s["task_id"] for s in samples] == [s["task_id"] for s in whole[1][:2]]
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json", "samples.jsonl"]  # no temp file left
    filler.unlink()
    metrics = decode(cfg, run_dir)  # space again: the same job resumes at sample 3
    assert metrics["resume"]["resumed_samples"] == 2 and len(read_samples(run_dir / "samples.jsonl")[0]) == 6


def test_sigterm_during_sandboxed_scoring_kills_the_sandboxes_and_keeps_the_samples(tmp_path, monkeypatch):
    from specsweep.evaluation import humaneval, pass_at_1, sandbox

    problems = humaneval.load_problems()[:4]
    samples = [{"task_id": p["task_id"], "text": "    while True:\n        pass\n"} for p in problems]
    cfg_eval = type("E", (), {"workers": 2, "timeout_s": 30.0, "memory_mb": 256})
    sandbox.isolation_level()  # probed before the clock starts
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    with pytest.raises(Terminated), run.sigterm_raises():
        pass_at_1.score_samples(samples, problems, cfg_eval)
    assert time.monotonic() - started < 10  # not the 4 x 30 s the sandboxes would take
    assert not sandbox.running()
