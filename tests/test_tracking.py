"""The trackers: logger=none logs nothing; logger=wandb records an offline run we read back, and a
failing W&B never fails the job."""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from specsweep import CONF_DIR
from specsweep.app.tracking import NullTracker, WandbTracker, flat_numbers, make_tracker
from specsweep.errors import SpecsweepError

CHOICES = {"target": "smollm2-135m", "draft": "layer-skip", "tree": "chain", "dataset": "humaneval",
           "hardware": "cpu", "logger": "wandb"}
RESOLVED = {"tree": {"name": "chain", "shape": "chain", "depth": 4}, "draft": {"name": "layer-skip"}, "seed": 0}
SAMPLES = [
    {"task_id": "HumanEval/0", "new_tokens": 10, "draft_tokens": 8, "accepted_tokens": 6, "verify_steps": 4,
     "wall_s": 0.5, "prefill_s": 0.1, "draft_s": 0.1, "verify_s": 0.3, "accepted_per_step": [2, 0, 3, 1],
     "text": "    return 1\n", "passed": True},
    {"task_id": "HumanEval/1", "new_tokens": 5, "draft_tokens": 4, "accepted_tokens": 1, "verify_steps": 4,
     "wall_s": 0.25, "prefill_s": 0.05, "draft_s": 0.05, "verify_s": 0.15, "accepted_per_step": [0, 1, 0, 0],
     "text": "    pass\n", "passed": False},
]
METRICS = {"tokens_per_s": 20.0, "acceptance_rate": 7 / 12, "acceptance_length": 0.875, "pass_at_1": 0.5,
           "draft_counters": {"levels": {"layer-skip": 7}}, "hardware": {"device": "cpu", "torch_threads": 2},
           "config": RESOLVED, "choices": CHOICES, "git_commit": "abc123"}


def wandb_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "logger" / "wandb.yaml"), overrides)


def read_records(path: Path) -> list:
    """The records of a .wandb transaction log, decoded with W&B's own protobuf schema.

    wandb 0.31 ships no Python reader (the log is written by its Go core), so this follows the
    format: a 7-byte file header (":W&B", magic, version), then LevelDB-log records in 32 KiB
    blocks (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer padding
            pos += left
            continue
        chunks = (b"" if kind in (1, 2) else chunks) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def closed_run_records(path: Path, timeout_s: float = 30.0) -> list:
    """The records once the run's exit record is on disk: W&B's core process writes the log
    asynchronously, and under load it can land a moment after ``run.finish()`` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(path)
        if of_type(records, "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def items(updates) -> dict:
    """Summary/history items -> {"a/b": value}."""
    return {"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in updates}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("job") / "3"
    run_dir.mkdir()
    with make_tracker(wandb_cfg(), RESOLVED, CHOICES, run_dir, group="reproduce/seed000") as tracker:
        assert isinstance(tracker, WandbTracker)
        for index, sample in enumerate(SAMPLES):
            tracker.log_sample(index, sample)
        tracker.finish(METRICS, SAMPLES)
    logs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, list(run_dir.rglob("*"))
    return logs[0], closed_run_records(logs[0])


def of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def test_offline_run_records_config_tags_and_group(offline_run):
    _, records = offline_run
    [run] = of_type(records, "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["tree"] == RESOLVED["tree"] and config["choices"] == CHOICES
    assert set(run.tags) == {"target=smollm2-135m", "draft=layer-skip", "tree=chain", "hardware=cpu"}
    assert run.run_group == "reproduce/seed000" and run.job_type == "decode"
    assert run.display_name == "3 target=smollm2-135m draft=layer-skip tree=chain"
    assert run.project == "specsweep"


def test_offline_run_records_samples_histogram_and_summary(offline_run):
    _, records = offline_run
    history = [items(h.item) for h in of_type(records, "history")]
    per_sample = [h for h in history if "sample/new_tokens" in h]
    assert [h["_step"] for h in per_sample] == [0, 1]
    assert [h["sample/new_tokens"] for h in per_sample] == [10, 5]
    assert per_sample[0]["sample/tokens_per_s"] == 20.0 and per_sample[1]["sample/acceptance_length"] == 0.25

    final = next(h for h in history if "accepted_per_step/values" in h)
    assert final["_step"] == 2
    counts = dict(zip((round(b + 0.5) for b in final["accepted_per_step/bins"]), final["accepted_per_step/values"]))
    assert counts == {0: 4, 1: 2, 2: 1, 3: 1}  # accepted lengths over both samples' 8 steps

    summary = {}
    for s in of_type(records, "summary"):
        summary.update(items(s.update))
    assert summary["tokens_per_s"] == 20.0 and summary["pass_at_1"] == 0.5
    assert summary["draft_counters/levels/layer-skip"] == 7 and summary["hardware/torch_threads"] == 2
    assert not any(k.startswith(("config", "choices")) for k in summary)
    assert of_type(records, "exit")


def test_offline_run_records_the_per_problem_table(offline_run):
    path, records = offline_run
    history = [items(h.item) for h in of_type(records, "history")]
    table = next(h for h in history if "problems/path" in h)
    assert table["problems/nrows"] == 2
    content = json.loads((path.parent / "files" / table["problems/path"]).read_text())
    assert content["columns"] == ["task_id", "new_tokens", "tokens_per_s", "acceptance_rate",
                                  "acceptance_length", "passed", "text"]
    assert content["data"][0] == ["HumanEval/0", 10, 20.0, 0.75, 1.5, True, "    return 1\n"]
    assert content["data"][1][5] is False


def test_jobs_of_one_process_get_a_run_each(tmp_path):
    """A local multirun runs its jobs in one process: a failed job's run is closed, the next is new."""
    for number in range(2):
        (tmp_path / str(number)).mkdir()
    with pytest.raises(ValueError):
        with make_tracker(wandb_cfg(), RESOLVED, CHOICES, tmp_path / "0", "g") as tracker:
            tracker.log_sample(0, SAMPLES[0])
            raise ValueError("job 0 failed")
    with make_tracker(wandb_cfg(), RESOLVED, CHOICES, tmp_path / "1", "g") as tracker:
        tracker.finish(METRICS, SAMPLES[:1])
    logs = [next((tmp_path / str(n)).glob("wandb/offline-run-*/run-*.wandb")) for n in range(2)]
    first, second = (closed_run_records(p) for p in logs)
    assert of_type(first, "exit")[0].exit_code == 1 and of_type(second, "exit")[0].exit_code == 0
    assert of_type(first, "run")[0].run_id != of_type(second, "run")[0].run_id


def test_logger_none_logs_nothing(tmp_path):
    tracker = make_tracker(OmegaConf.create({"name": "none"}), RESOLVED, CHOICES, tmp_path, None)
    assert isinstance(tracker, NullTracker)
    with tracker:
        tracker.log_sample(0, SAMPLES[0])
        tracker.finish(METRICS, SAMPLES)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("cfg, message", [
    ({"name": "tensorboard"}, "logger=tensorboard: unknown logger"),
    ({"name": "wandb", "mode": "cloud", "project": "p", "entity": None, "dir": None}, "logger.mode=cloud"),
])
def test_bad_logger_settings_are_clear_errors(tmp_path, cfg, message):
    with pytest.raises(SpecsweepError, match=message):
        make_tracker(OmegaConf.create(cfg), RESOLVED, CHOICES, tmp_path, None)


class Recorder:
    """Stands in for the wandb module: records calls; ``fail`` names the calls that raise."""

    def __init__(self, fail=()):
        self.fail, self.calls = set(fail), []

    def _maybe_fail(self, name):
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"{name} is broken")

    def init(self, **kwargs):
        self._maybe_fail("init")
        summary = SimpleNamespace(update=lambda d: self._maybe_fail("summary"))
        return SimpleNamespace(log=lambda row, step: self._maybe_fail("log"), summary=summary,
                               finish=lambda exit_code=None: self._maybe_fail(f"finish({exit_code})"))

    def Settings(self, **kwargs):  # noqa: N802 (wandb's name)
        self._maybe_fail("Settings")
        return kwargs

    def Histogram(self, **kwargs):  # noqa: N802
        return kwargs

    def Table(self, **kwargs):  # noqa: N802
        return kwargs


def tracked_job(tracker, run_dir: Path, fail_job=False):
    """What run.py does: results files first, the tracker after."""
    with tracker:
        for index, sample in enumerate(SAMPLES):
            tracker.log_sample(index, sample)
        if fail_job:
            raise ValueError("decode failed")
        (run_dir / "metrics.json").write_text(json.dumps(METRICS))
        tracker.finish(METRICS, SAMPLES)


@pytest.mark.parametrize("fail", [{"init"}, {"Settings"}, {"log", "summary"}, {"finish(None)"}])
def test_failing_wandb_only_warns_and_the_results_are_written(tmp_path, caplog, fail):
    backend = Recorder(fail)
    tracker = WandbTracker(wandb_cfg(), RESOLVED, CHOICES, tmp_path, None, backend=backend)
    with caplog.at_level(logging.WARNING, logger="specsweep.app.tracking"):
        tracked_job(tracker, tmp_path)
    assert (tmp_path / "metrics.json").is_file()
    assert any("W&B:" in r.message and "is broken" in r.message for r in caplog.records)
    if fail == {"log", "summary"}:  # one broken call does not stop the rest being logged
        assert backend.calls.count("log") == 4 and "finish(None)" in backend.calls


def test_a_failed_job_closes_its_run_as_failed(tmp_path):
    backend = Recorder()
    tracker = WandbTracker(wandb_cfg(), RESOLVED, CHOICES, tmp_path, None, backend=backend)
    with pytest.raises(ValueError):
        tracked_job(tracker, tmp_path, fail_job=True)
    assert backend.calls[-1] == "finish(1)" and "summary" not in backend.calls


def test_summary_is_the_flattened_numbers_of_metrics_json():
    assert flat_numbers({"a": 1, "b": None, "c": "x", "d": {"e": 2.5, "f": {"g": 3}}, "h": float("nan"),
                         "config": {"x": 1}, "choices": {"y": 2}, "ok": True}) == {"a": 1, "d/e": 2.5, "d/f/g": 3}
    # per-position lists become one number per position (1-based); other lists are left out
    assert flat_numbers({"alpha_by_position": [0.5, None, 0.25], "lock_mismatches": ["x"], "seq": [1, 2]}) == {
        "alpha_by_position/1": 0.5, "alpha_by_position/3": 0.25}
