"""The files every run leaves behind: metrics.json, samples.jsonl, error.json; written atomically."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from specsweep.backends.machine import machine_fingerprint, machine_info
from specsweep.files import write_atomic, write_json, write_jsonl

__all__ = ["environment", "lock_hash", "lock_status", "machine_fingerprint", "machine_info", "write_atomic",
           "write_json", "write_jsonl"]

METRICS = "metrics.json"
SAMPLES = "samples.jsonl"
ERROR = "error.json"
# the hashed lock of every Python package but torch (Makefile: `make setup` installs it, `make lock`
# refreshes it); absent where specsweep is installed from a wheel rather than a checkout
REPO = Path(__file__).resolve().parents[2]  # the checkout the package runs from (editable install)
LOCK_FILE = REPO / "requirements.lock"
# a lock's packages below this comment line are installed without their dependencies on purpose
NO_DEPS_MARK = "# Outside the resolver"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def git_commit() -> str | None:
    try:
        root = REPO
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """``{normalized name: version}`` of every ``name==version`` pin in a requirements lock's text."""
    return {_normalize(m.group(1)): m.group(2) for m in map(_PIN.match, text.splitlines()) if m}


def lock_hash(path: Path | None = None) -> str | None:
    """sha256 of the lock file, or None where there is none."""
    try:
        return hashlib.sha256(Path(path or LOCK_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def lock_status(path: Path | None = None) -> tuple[bool | None, list[str]]:
    """(whether every locked package is installed at its locked version, the mismatches): (None, [])
    without a lock file."""
    try:
        pins = parse_lock(Path(path or LOCK_FILE).read_text())
    except OSError:
        return None, []
    mismatches = []
    for name, version in sorted(pins.items()):
        have = installed_version(name)
        if have != version:
            mismatches.append(f"{name}: lock {version}, installed {have or 'none'}")
    return not mismatches, mismatches


def environment() -> dict:
    """Where a result came from: code, locked environment, key package versions, the machine."""
    machine = machine_info()
    matches, mismatches = lock_status()
    return {
        "git_commit": git_commit(),
        "torch": machine["torch"] or installed_version("torch"),
        "transformers": installed_version("transformers"),
        "hydra_core": installed_version("hydra-core"),
        "wandb": installed_version("wandb"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": machine["cpu_model"],
        "cpu_vendor": machine["cpu_vendor"],
        "cpu_count": os.cpu_count(),
        "torch_threads": machine["torch_threads"],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "lock_sha256": lock_hash(),
        "lock_matches": matches,
        "lock_mismatches": mismatches[:10] + ([f"... {len(mismatches) - 10} more"] if len(mismatches) > 10 else []),
        "machine_fingerprint": machine["fingerprint"],
        "machine": machine,
    }


def check_lock(path: Path | None = None) -> int:
    """`make setup`'s last step: 1 if an installed version differs from the lock, or if ``pip check``
    finds a locked package (or specsweep) with an unmet requirement; other ``pip check`` lines (a
    cluster's own torch wanting other versions, system site-packages) are printed as notes only."""
    path = Path(path or LOCK_FILE)
    matches, mismatches = lock_status(path)
    if matches is None:
        print(f"no lock file at {path}", file=sys.stderr)
        return 1
    for line in mismatches:
        print(f"not as locked: {line}", file=sys.stderr)
    text = path.read_text()
    mark = text.find(NO_DEPS_MARK)
    no_deps = set(parse_lock(text[mark:])) if mark >= 0 else set()
    ours = (set(parse_lock(text)) - no_deps) | {"specsweep"}
    failed = bool(mismatches)
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    for line in check.stdout.splitlines():
        if not line.strip() or line.startswith("No broken requirements"):
            continue
        requirer = _normalize(line.split()[0])
        if requirer in ours:
            print(f"pip check: {line}", file=sys.stderr)
            failed = True
        elif requirer not in no_deps:
            print(f"pip check (not a locked package, ignored): {line}", file=sys.stderr)
    if failed:
        print(f"the environment is not {path.name}: rerun `make setup`, or refresh the lock with `make lock`",
              file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-lock"]:
        raise SystemExit(check_lock())
    raise SystemExit("usage: python -m specsweep.app.results --check-lock")
