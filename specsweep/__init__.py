"""specsweep: Hydra-configured, reproducible sweeps for speculative-decoding research."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"  # the Hydra config tree, shipped as package data
