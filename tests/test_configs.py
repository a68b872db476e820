"""Every config in specsweep/conf composes with Hydra and passes the run's own checks, or is refused
with the one line this machine calls for (no GPU, no NPU, no hub, a value the user must set)."""

from __future__ import annotations

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from specsweep import CONF_DIR
from specsweep.__main__ import find_job
from specsweep.app import schema
from specsweep.app.run import check_decode, run_decode
from specsweep.errors import SpecsweepError
from tests.conftest import CACHE_DIR, bf16_unsupported

GROUPS = ("target", "draft", "tree", "dataset", "decode", "hardware", "logger", "experiment")
NOT_HERE = "not in the local Hugging Face cache and downloads are off"  # a hub id: no hub here
# (group, name) -> the refusal expected on a CPU machine without a hub; everything else must pass
REFUSALS = {
    ("target", "llama2-7b-chat"): NOT_HERE,
    ("target", "llama2-13b-chat"): NOT_HERE,
    ("target", "local"): "target.path",
    ("draft", "160m"): NOT_HERE,
    ("draft", "7b"): NOT_HERE,
    ("draft", "cascade-160m"): NOT_HERE,
    ("draft", "model"): "draft.path: not set",
    ("tree", "custom"): "path_file",
    ("tree", "dynamic"): "cannot fill dynamic trees",  # the default draft, prompt lookup, fills fixed shapes
    ("dataset", "jsonl"): "dataset.path",
    ("hardware", "cuda"): "sees no CUDA device",
    ("hardware", "npu"): "torch_npu is not installed",
}
# configs on the cpu-bf16 profile: refused in one line on a CPU without oneDNN bf16 kernels (AVX2 only)
NEEDS_BF16 = {("hardware", "cpu-bf16"), ("experiment", "best")}
NO_BF16 = "no oneDNN bf16 support"
CONFIGS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"cache_dir={CACHE_DIR}"])


@pytest.mark.parametrize("group, name", CONFIGS, ids=[f"{g}={n}" for g, n in CONFIGS])
def test_every_config_composes_and_passes_the_checks(group, name):
    cfg = composed(f"{group}={name}")
    expected = REFUSALS.get((group, name))
    if (group, name) == ("hardware", "cuda") and torch.cuda.is_available():
        expected = None
    if (group, name) in NEEDS_BF16 and bf16_unsupported():
        expected = NO_BF16
    schema.check(cfg)  # every shipped config passes the typed schemas
    job = find_job(cfg.job)  # every job names a function that exists
    if job is not run_decode:  # an experiment's own job checks its own settings
        assert OmegaConf.to_container(cfg, resolve=True)
        return
    try:
        check_decode(cfg)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
    except (SpecsweepError, MissingMandatoryValue) as err:
        # a `???` left unset: the app turns it into one line naming the key (tests/test_cli.py)
        message = f"{err.full_key} is not set" if isinstance(err, MissingMandatoryValue) else str(err)
        assert expected is not None, f"{group}={name} refused: {message}"
        assert re.search(re.escape(expected), message) and "\n" not in message, message
    else:
        assert expected is None, f"{group}={name} passed, expected a refusal matching {expected!r}"


def test_the_list_of_refusals_names_only_configs_that_exist():
    assert set(REFUSALS) | NEEDS_BF16 <= set(CONFIGS)


def test_an_unknown_job_is_refused_in_one_line():
    with pytest.raises(SpecsweepError, match="job=nowhere.job: no such function"):
        find_job("nowhere.job")
