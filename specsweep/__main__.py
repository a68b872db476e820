"""``python -m specsweep [overrides]``: the Hydra app (``-m`` for a multirun sweep)."""

from __future__ import annotations

import errno
import json
import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from specsweep.app import schema, summary
from specsweep.app.results import ERROR, METRICS, git_commit, write_json
from specsweep.app.tracking import sweep_group
from specsweep.errors import SpecsweepError, Terminated

log = logging.getLogger("specsweep")
GROUPS = ("target", "draft", "tree", "dataset", "decode", "hardware", "logger", "experiment")


def finished(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The metrics of an earlier run of the same resolved config and the same code, if any:
    such a job is not run again."""
    path = run_dir / METRICS
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    same = done.get("config") == OmegaConf.to_container(cfg, resolve=True) and done.get("git_commit") == git_commit()
    return done if same else None


def run_job(cfg: DictConfig, run_dir: Path, choices: dict, group: str | None):
    schema.check(cfg)  # types, ranges and choices of the fixed groups, before anything else
    done = finished(cfg, run_dir)
    if done is not None:
        log.info("results for this configuration and code exist in %s: not running it again", run_dir)
        return done
    return find_job(cfg.job)(cfg, run_dir, choices, group)


def find_job(path: str):
    """``job``: the dotted path of a function (cfg, run_dir, choices, group) -> metrics; the app
    imports it only when it runs (tools are never imported by the app itself)."""
    try:
        return get_method(path)
    except Exception:  # noqa: BLE001 (Hydra wraps what went wrong in its own errors)
        raise SpecsweepError(f"job={path}: no such function (the default is specsweep.app.run.run_decode)") from None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def app(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    choices = {g: hydra_cfg.runtime.choices[g] for g in GROUPS if hydra_cfg.runtime.choices.get(g)}
    group = sweep_group(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    (run_dir / ERROR).unlink(missing_ok=True)  # a re-run replaces an earlier failure
    try:
        try:
            return run_job(cfg, run_dir, choices, group)
        except MissingMandatoryValue as err:  # a `???` in the config the user did not set
            raise SpecsweepError(f"{err.full_key} is not set: add {err.full_key}=... to the command") from None
    except Terminated as err:  # SIGTERM: the finished samples are kept; the same command resumes
        message = f"{err}; the same command resumes at the next sample"
        record_error(run_dir, {"error": message, "type": "Terminated", "choices": choices})
        print(f"specsweep: {message} ({run_dir})", file=sys.stderr)
        sys.exit(143)  # the whole sweep stops, as a terminated process should
    except Exception as err:
        # leave the reason where the sweep summary (and a re-run) will find it
        message = str(err) if isinstance(err, SpecsweepError) else f"{type(err).__name__}: {err}"
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        if full:  # the results files keep every finished sample (each write replaces a whole file)
            message = f"no space left on the device writing results in {run_dir} ({err.filename}): " \
                      "free space, then the same command resumes at the next sample"
        record_error(run_dir, {"error": message, "type": type(err).__name__,
                               "traceback": traceback.format_exc(), "choices": choices})
        if full and hydra_cfg.mode != RunMode.MULTIRUN:
            print(f"specsweep: error: {message}", file=sys.stderr)
            sys.exit(1)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            return None  # the other jobs go on; the sweep summary lists this one as failed
        if isinstance(err, SpecsweepError):
            print(f"specsweep: error: {message}", file=sys.stderr)
            sys.exit(2)
        raise


def record_error(run_dir: Path, record: dict) -> None:
    """error.json, where the disk allows (a full disk must not hide the job's own error)."""
    try:
        write_json(run_dir / ERROR, record)
    except OSError as err:
        log.error("could not write %s: %s", run_dir / ERROR, err)


def main() -> None:
    if sys.argv[1:2] == ["report"]:  # python -m specsweep report SWEEP_DIR...
        from specsweep.app import report

        sys.exit(report.main(sys.argv[2:]))
    app()
    if summary.failed_jobs or summary.diverged_jobs:  # a multirun's jobs without results, or not lossless
        sys.exit(1)


if __name__ == "__main__":
    main()
