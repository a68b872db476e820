"""The machine a result came from, and a fingerprint of what decides its kernels.

Machines of one kind differ in CPU (Intel with AMX, AMD Zen 5 with avx512_bf16 and no AMX), and bf16
rounding, exactness and verify-cost curves differ with them (docs/performance.md). ``machine_info()`` records
the CPU model and vendor, the ISA flags that decide oneDNN's and ATen's kernels, ``ONEDNN_MAX_CPU_ISA``
(which caps them), torch's version and threads, and a GPU or NPU where there is one.
``machine_fingerprint()`` hashes the part that decides kernels: a cache key, with the lock hash, for
per-machine probes and cost curves. Nothing here raises: what cannot be read is None.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

# the /proc/cpuinfo flags that decide which kernels run (AMX tiles, bf16/fp16 AVX-512, AVX2)
ISA_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "avx512_fp16")
# environment variables that cap or pick kernels
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
# what the fingerprint is made of
FINGERPRINT_KEYS = ("cpu_model", "cpu_vendor", "cpu_family", "cpu_model_number", "isa", "onednn_max_cpu_isa",
                    "aten_cpu_capability", "torch", "torch_threads", "accelerator")


def parse_cpuinfo(text: str) -> dict:
    """The first processor's model name, vendor, family/model numbers and ISA flags from /proc/cpuinfo text.

    x86 has ``model name``, ``vendor_id``, ``cpu family``, ``model`` and ``flags``; ARM has ``CPU implementer``,
    ``CPU part`` and ``Features`` (and often no model name)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:  # the first processor's block is enough: they are all alike
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return {
        "cpu_model": fields.get("model name") or fields.get("hardware") or None,
        "cpu_vendor": fields.get("vendor_id") or fields.get("cpu implementer") or None,
        "cpu_family": fields.get("cpu family") or fields.get("cpu architecture") or None,
        "cpu_model_number": fields.get("model") or fields.get("cpu part") or None,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
    }


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    """A command's stdout, or None if it is missing, fails or takes longer than ``timeout``."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """``parse_cpuinfo`` of this machine, with lscpu filling in a missing model name or vendor."""
    try:
        info = parse_cpuinfo(Path(path).read_text(errors="replace"))
    except OSError:
        info = parse_cpuinfo("")
    if info["cpu_model"] is None or info["cpu_vendor"] is None:
        lscpu = {}
        for line in (_run(["lscpu"]) or "").splitlines():
            key, _, value = line.partition(":")
            lscpu[key.strip()] = value.strip()
        info["cpu_model"] = info["cpu_model"] or lscpu.get("Model name") or platform.machine() or None
        info["cpu_vendor"] = info["cpu_vendor"] or lscpu.get("Vendor ID") or None
    return info


@functools.lru_cache(maxsize=None)
def nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi (first GPU), or None: no nvidia-smi, or it failed."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.strip().splitlines()[0].strip() if out and out.strip() else None


def _torch_info() -> dict:
    info = {"torch": None, "torch_threads": None, "aten_cpu_capability": None, "gpu": None, "npu": None}
    try:
        import torch
    except Exception:  # noqa: BLE001 - no torch: the CPU part still stands
        return info
    info["torch"] = torch.__version__
    try:
        info["torch_threads"] = torch.get_num_threads()
        info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        pass
    try:
        if torch.cuda.is_available():
            info["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                           "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
                           "driver": nvidia_driver()}
    except Exception:  # noqa: BLE001
        pass
    try:
        if importlib.util.find_spec("torch_npu") is not None:
            import torch_npu  # noqa: F401 - registers torch.npu

            if torch.npu.is_available():
                info["npu"] = {"name": torch.npu.get_device_name(0), "count": torch.npu.device_count(),
                               "torch_npu": getattr(torch_npu, "__version__", None)}
    except Exception:  # noqa: BLE001
        pass
    return info


def machine_info() -> dict:
    """What this machine is, as far as kernels go: CPU model/vendor, ISA flags, ISA caps, torch, GPU/NPU."""
    info = dict(cpu_info())
    info["isa"] = dict(info["isa"])
    info["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA")
    info["aten_cpu_capability_env"] = os.environ.get("ATEN_CPU_CAPABILITY")
    info["cpu_count"] = os.cpu_count()
    info["arch"] = platform.machine()
    info["platform"] = platform.platform()
    info.update(_torch_info())
    gpu, npu = info["gpu"], info["npu"]
    info["accelerator"] = ({"gpu": gpu["name"], "cuda": gpu["cuda"], "hip": gpu["hip"]} if gpu
                           else {"npu": npu["name"]} if npu else None)
    info["fingerprint"] = fingerprint(info)
    return info


def fingerprint(info: dict) -> str:
    """A short hash of what decides kernels in ``info`` (``FINGERPRINT_KEYS``): equal on two machines
    (or two settings of one machine) that run the same kernels."""
    parts = {key: info.get(key) for key in FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine_fingerprint() -> str:
    return machine_info()["fingerprint"]
