"""Where a run is logged besides its results files: nowhere (logger=none) or Weights & Biases.

W&B is an output, never a source: the results files are written first and a W&B failure (no
network, not logged in, a broken install, a bad value) only logs a warning. Offline by default:
the run lands in ``<run dir>/wandb/offline-run-*`` for a later ``wandb sync``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from specsweep.errors import SpecsweepError

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
TAGGED_CHOICES = ("target", "draft", "tree", "hardware", "experiment")
SAMPLE_KEYS = ("new_tokens", "draft_tokens", "accepted_tokens", "verify_steps",
               "wall_s", "prefill_s", "draft_s", "verify_s")
TABLE_COLUMNS = ["task_id", "new_tokens", "tokens_per_s", "acceptance_rate", "acceptance_length", "passed", "text"]
NOT_SUMMARY = ("config", "choices")  # already in the run's config


class Tracker:
    """Receives each finished sample and the run's metrics; a context manager that closes the run
    (as failed) when the job raises before ``finish``."""

    def log_sample(self, index: int, sample: dict) -> None:
        pass

    def log(self, row: dict, step: int) -> None:
        """Any numbers at a step (e.g. a trainer's loss)."""

    def finish(self, metrics: dict, samples: list[dict]) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


class NullTracker(Tracker):
    """logger=none: log nothing."""


def make_tracker(cfg_logger, cfg_resolved: dict, choices: dict, run_dir: Path, group: str | None,
                 job_type: str = "decode") -> Tracker:
    """The tracker for the `logger` config group; bad settings stop the run before any model loads."""
    if cfg_logger.name == "none":
        return NullTracker()
    if cfg_logger.name == "wandb":
        if cfg_logger.mode not in MODES:
            raise SpecsweepError(f"logger.mode={cfg_logger.mode}: choose one of {', '.join(MODES)}")
        return WandbTracker(cfg_logger, cfg_resolved, choices, Path(run_dir), group, job_type=job_type)
    raise SpecsweepError(f"logger={cfg_logger.name}: unknown logger (none, wandb)")


class WandbTracker(Tracker):
    """One W&B run per job. ``backend`` is the wandb module (replaceable in tests)."""

    def __init__(self, cfg_logger, cfg_resolved: dict, choices: dict, run_dir: Path, group: str | None,
                 backend=None, job_type: str = "decode"):
        self.wandb = backend
        self.run = None
        self._call("import wandb", self._import)
        if self.wandb is None:
            return
        wandb_dir = Path(cfg_logger.dir) if cfg_logger.dir else run_dir
        tags = [f"{k}={choices[k]}"[:64] for k in TAGGED_CHOICES if choices.get(k)]  # W&B caps tags at 64
        self.run = self._call("wandb.init", lambda: self.wandb.init(
            project=cfg_logger.project, entity=cfg_logger.entity, mode=cfg_logger.mode, dir=str(wandb_dir),
            group=group, job_type=job_type, name=_run_name(choices, run_dir, group), tags=tags,
            config={**cfg_resolved, "choices": choices},
            # create_new: never hand back a previous job's unfinished run (multiruns share a process);
            # console off: W&B must not wrap stdout under the rich progress bar
            settings=self.wandb.Settings(reinit="create_new", console="off", quiet=True)))

    def _import(self):
        if self.wandb is None:
            import wandb

            self.wandb = wandb

    def _call(self, what: str, fn):
        """Run one W&B call; a failure is a warning, never the job's failure."""
        try:
            return fn()
        except Exception as err:  # any W&B problem: the results files are the record
            log.warning("W&B: %s failed (%s: %s); the run goes on without it", what, type(err).__name__, err)
            return None

    def log_sample(self, index: int, sample: dict) -> None:
        if self.run is None:
            return
        row = {f"sample/{k}": sample[k] for k in SAMPLE_KEYS if k in sample}
        row.update({f"sample/{k}": v for k, v in _sample_rates(sample).items() if v is not None})
        self._call(f"log sample {index}", lambda: self.run.log(row, step=index))

    def log(self, row: dict, step: int) -> None:
        if self.run is not None:
            self._call(f"log step {step}", lambda: self.run.log(row, step=step))

    def finish(self, metrics: dict, samples: list[dict]) -> None:
        if self.run is None:
            return
        step = len(samples)  # after the per-sample steps
        accepted = [a for s in samples for a in s.get("accepted_per_step", [])]
        if accepted:
            self._call("log accepted-length histogram", lambda: self.run.log(
                {"accepted_per_step": self._histogram(accepted)}, step=step))
        if samples:  # a decode job's (a trainer has none)
            self._call("log per-problem table", lambda: self.run.log({"problems": self._table(samples)}, step=step))
        self._call("write summary", lambda: self.run.summary.update(flat_numbers(metrics)))
        self._call("finish", self.run.finish)
        self.run = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:  # the job failed before finish(): close the run as failed
            self._call("finish", lambda: self.run.finish(exit_code=1))
            self.run = None

    def _histogram(self, accepted: list[int]):
        import numpy as np

        edges = np.arange(max(accepted) + 2) - 0.5  # one bin per accepted length 0, 1, 2, ...
        return self.wandb.Histogram(np_histogram=np.histogram(accepted, bins=edges))

    def _table(self, samples: list[dict]):
        rows = [[s.get("task_id"), s.get("new_tokens"), *_sample_rates(s).values(), s.get("passed"), s.get("text")]
                for s in samples]
        return self.wandb.Table(columns=TABLE_COLUMNS, data=rows)


def _sample_rates(sample: dict) -> dict:
    """tokens/s, acceptance rate and length of one sample (None where undefined)."""
    def ratio(num, den):
        return sample.get(num, 0) / sample[den] if sample.get(den) else None

    return {"tokens_per_s": ratio("new_tokens", "wall_s"), "acceptance_rate": ratio("accepted_tokens", "draft_tokens"),
            "acceptance_length": ratio("accepted_tokens", "verify_steps")}


def sweep_group(sweep_dir) -> str:
    """The W&B group of a sweep's runs: parent/name of its dir (outputs/reproduce/quick/seed000 ->
    quick/seed000), so equally named sweeps of different scales stay apart."""
    return "/".join(Path(sweep_dir).resolve().parts[-2:])


def _run_name(choices: dict, run_dir: Path, group: str | None) -> str:
    label = " ".join(f"{k}={choices[k]}" for k in ("target", "draft", "tree") if choices.get(k))
    return f"{run_dir.name} {label}" if group else label  # in a sweep the job number tells runs apart


def flat_numbers(metrics: dict, prefix: str = "") -> dict:
    """The finite numbers of metrics.json, nested keys joined with '/' (the config is left out)."""
    out = {}
    for key, value in metrics.items():
        if not prefix and key in NOT_SUMMARY:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_numbers(value, name + "/"))
        elif isinstance(value, list) and key.endswith("_by_position"):  # alpha_by_position/1, /2, ...
            out.update(flat_numbers({str(k): v for k, v in enumerate(value, 1)}, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    return out
