"""Tiny Hydra app for tests/test_slurm.py: records the SLURM environment it ran in.

No torch import: a job starts in well under a second.
"""
import json
import os
import socket
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    record = {
        "a": cfg.a,
        "b": cfg.b,
        "job_num": HydraConfig.get().job.num,
        "hydra_job_id": HydraConfig.get().job.id,
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "slurm_cpus_per_task": env.get("SLURM_CPUS_PER_TASK"),
        "slurm_partition": env.get("SLURM_JOB_PARTITION"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    (out / "result.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
