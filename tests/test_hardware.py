"""Hardware profiles: what can run here resolves, what cannot fails at once with a clear line."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from specsweep import CONF_DIR
from specsweep.backends import hardware
from specsweep.errors import SpecsweepError


def profile(name, **overrides):
    cfg = OmegaConf.load(CONF_DIR / "hardware" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def test_cpu_profile_is_fp32():
    hw = hardware.resolve(profile("cpu"))
    assert hw.device == torch.device("cpu") and hw.dtype == torch.float32
    assert hw.describe()["device"] == "cpu"


def test_auto_prefers_cuda_then_npu_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_npu_available", lambda: False)
    hw = hardware.resolve(profile("auto"))
    assert hw.device.type == "cpu" and hw.dtype == torch.float32  # dtype auto: fp32 on CPU
    monkeypatch.setattr(hardware, "_npu_available", lambda: True)
    assert hardware.pick_device("auto") == "npu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.pick_device("auto") == "cuda"
    assert hardware.pick_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(SpecsweepError, match="sees no CUDA device"):
        hardware.resolve(profile("cuda"))


def test_npu_without_torch_npu_is_refused(monkeypatch):
    monkeypatch.setattr(hardware, "_npu_available", lambda: False)
    with pytest.raises(SpecsweepError, match=r"torch_npu is not installed or sees no NPU \(pip install .\[npu\]\)"):
        hardware.resolve(profile("npu"))


def test_unknown_device_and_dtype():
    with pytest.raises(SpecsweepError, match="unknown device"):
        hardware.resolve(profile("cpu", device="tpu"))
    with pytest.raises(SpecsweepError, match="hardware.dtype=float8"):
        hardware.resolve(profile("cpu", dtype="float8"))


def test_bool_tree_masks_need_sdpa():
    assert hardware.resolve(profile("cpu", tree_mask="bool")).bool_masks
    with pytest.raises(SpecsweepError, match="tree_mask=bool needs attn_implementation=sdpa"):
        hardware.resolve(profile("cpu", tree_mask="bool", attn_implementation="eager"))
    with pytest.raises(SpecsweepError, match="choose additive or bool"):
        hardware.resolve(profile("cpu", tree_mask="int"))


def test_cpu_bf16_is_refused_in_one_line_below_the_bf16_kernels(tmp_path):
    """Capped to AVX2, oneDNN has no bf16 products: cpu-bf16 stops before loading anything."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "specsweep", "hardware=cpu-bf16", f"hydra.run.dir={tmp_path}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "prepack_linear=true" in line]
    assert len(lines) == 1 and "bf16" in lines[0]
