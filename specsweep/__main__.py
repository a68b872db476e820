"""``python -m specsweep [overrides]``: the Hydra app (``-m`` for a multirun sweep)."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from specsweep import summary
from specsweep.errors import SpecsweepError
from specsweep.results import ERROR, write_json

log = logging.getLogger("specsweep")
GROUPS = ("target", "draft", "tree", "dataset", "decode", "hardware", "logger", "experiment")


def run_job(cfg: DictConfig, run_dir: Path, choices: dict):
    if cfg.job == "decode":
        from specsweep.run import run_decode

        return run_decode(cfg, run_dir, choices)
    if cfg.job == "tree_attention":
        from specsweep.attention.benchmark import run

        return run(cfg.bench, run_dir)
    raise SpecsweepError(f"job={cfg.job}: unknown job (decode, tree_attention)")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def app(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    choices = {g: hydra_cfg.runtime.choices[g] for g in GROUPS if hydra_cfg.runtime.choices.get(g)}
    try:
        return run_job(cfg, run_dir, choices)
    except Exception as err:
        # leave the reason where the sweep summary (and a re-run) will find it
        message = str(err) if isinstance(err, SpecsweepError) else f"{type(err).__name__}: {err}"
        write_json(run_dir / ERROR, {"error": message, "type": type(err).__name__,
                                     "traceback": traceback.format_exc(), "choices": choices})
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            return None  # the other jobs go on; the sweep summary lists this one as failed
        if isinstance(err, SpecsweepError):
            print(f"specsweep: error: {message}", file=sys.stderr)
            sys.exit(2)
        raise


def main() -> None:
    app()
    if summary.failed_jobs:
        sys.exit(1)


if __name__ == "__main__":
    main()
