"""Run untrusted Python (model-generated code) in a separate, limited, isolated process.

Standard: generated code runs in its own process with a wall-clock limit, CPU/memory/process/
file-size limits, a scrubbed environment, a fresh temporary working directory and NO access to
the project's files. Whatever it does (hang, crash, fork, delete, escape) it cannot stop or
corrupt the run; the caller just gets a result back.

Isolation levels, strongest first (the best one that works here is picked by a real probe,
once per process; see `isolation_level()`):

  "namespaces"  running as root: util-linux `unshare` gives the child private mount, PID,
                network, IPC and UTS namespaces; inside, every mount is remounted read-only,
                /tmp, /var/tmp and /dev/shm become small private tmpfs, the project directory,
                home directories, the venv and cache dirs are covered by empty tmpfs, and
                `setpriv` drops to a throwaway uid (owns no files, shared with no other process)
                with no capabilities and no_new_privs. No network (empty net namespace).
  "userns"      not root, unprivileged user namespaces allowed (clusters, most distros): the same
                namespaces and mounts inside `unshare --user --map-root-user`; the code keeps the
                caller's uid (no other uid can be mapped without newuidmap) but has no
                capabilities, so it cannot unmount what hides the project, and the read-only
                remounts stop it writing anywhere but its private tmpfs.
  "uid"         root, but namespaces unavailable (e.g. a container without CAP_SYS_ADMIN): only
                the drop to a throwaway uid; the project can still be READ where it is
                world-readable, but not modified.
  "process"     last resort: separate process, limits, scrubbed env, temp cwd. The code can read
                and modify everything the caller can. A warning is logged.

The level in use is logged once when it is weaker than "userns", returned by
`isolation_level()` and reported with every result so a sweep can record it.
Environment knobs:
  SPECSWEEP_SANDBOX       force a level (auto|namespaces|userns|uid|process); a forced level
                          that does not work raises instead of falling back (use it in CI).
  SPECSWEEP_SANDBOX_HIDE  extra directories to hide (os.pathsep-separated).

Only util-linux (`unshare`, `setpriv`, `mount`, stock on Debian) and /bin/sh are needed.
What it does not do: seccomp syscall filtering, and cgroup limits (RLIMIT_AS bounds the
address space per process, RLIMIT_NPROC the process count, so a fork bomb stays bounded).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

LEVELS = ("namespaces", "userns", "uid", "process")
PROTECTS_PROJECT = ("namespaces", "userns")  # levels where the project's files are hidden

# Throwaway uids come from a range no account uses, one per run: nothing on disk is owned
# by them, and RLIMIT_NPROC (counted per uid) then limits this one sandbox alone.
_UID_BASE, _UID_SPAN = 1_900_000_000, 1_000_000

# Never hidden (nor any ancestor of them): what the sandbox itself needs, and the temp dirs that
# get a fresh private tmpfs anyway.
_KEEP_VISIBLE = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/dev", "/proc", "/sys",
                 "/tmp", "/var/tmp", "/dev/shm")
_OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept (the tail)

# Runs as root inside the new namespaces (real root, or root of the new user namespace),
# then execs the interpreter as the unprivileged sandbox user.
# Args: python, its prefix, tmpfs size (MiB), uid to drop to (0 = keep), program, hidden dirs...
_NS_SCRIPT = r"""
set -eu
py=$1 prefix=$2 tmp_mb=$3 uid=$4 code=$5
shift 5
# Keep a handle on the interpreter's installation: it may live under a dir we hide (pyenv in ~).
exec 3<"$prefix"
# Read-only everything we inherited (best effort: a mount we cannot remount keeps its flags;
# the unprivileged uid / missing capabilities still apply).
while read -r _ _ _ _ mp _; do mount -o remount,bind,ro "$mp" 2>/dev/null || true; done </proc/self/mountinfo
# The only writable places: small private tmpfs.
for d in /tmp /var/tmp /dev/shm; do
  mount -t tmpfs -o "size=${tmp_mb}m,mode=1777,nosuid,nodev" sandbox-tmp "$d"
done
# Hide the project, homes, venv, caches behind empty root-owned tmpfs. A dir that no longer
# exists here is already under something hidden.
for d in "$@"; do
  if [ -d "$d" ]; then mount -t tmpfs -o size=64k,mode=755,nosuid,nodev sandbox-hidden "$d"; fi
done
# Put the interpreter back (read-only) if hiding covered it.
if [ ! -x "$py" ]; then
  mkdir -p "$prefix"
  mount --no-canonicalize --bind /proc/self/fd/3 "$prefix"
  mount -o remount,bind,ro,nosuid,nodev "$prefix"
fi
exec 3<&-
cd /tmp
if [ "$uid" = 0 ]; then drop=""; else drop="--reuid=$uid --regid=$uid --clear-groups"; fi
exec setpriv $drop --no-new-privs --bounding-set=-all --inh-caps=-all -- "$py" -I -S -c "$code"
"""

_NS_FLAGS = ["--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts"]

# Prepended to every program: the limits apply before any untrusted code runs, and an
# unprivileged process cannot raise them again.
_PROLOGUE = """\
import resource as _r
for _k, _v in {limits!r}.items():
    _r.setrlimit(getattr(_r, _k), _v)
del _r, _k, _v
"""


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None  # None when killed for the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool
    isolation: str


def _interpreter() -> tuple[str, str]:
    """The base interpreter (not the venv's wrapper: the venv is hidden) and its prefix."""
    py = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return py, os.path.realpath(sys.base_prefix)


def hidden_paths() -> list[str]:
    """Directories the sandboxed code must not see: project root, cwd, homes, venv, caches."""
    project_root = Path(__file__).resolve().parents[2]  # .../specsweep/evaluation/sandbox.py
    candidates = [str(project_root), os.getcwd(), str(Path.home()), "/root", "/home", sys.prefix]
    for var in ("XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME", "WANDB_DIR"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    candidates += [p for p in os.environ.get("SPECSWEEP_SANDBOX_HIDE", "").split(os.pathsep) if p]
    out: list[str] = []
    for c in candidates:
        p = os.path.realpath(c)
        if not os.path.isdir(p) or any(k == p or k.startswith(p.rstrip("/") + "/") for k in _KEEP_VISIBLE):
            continue
        if p not in out:
            out.append(p)
    return sorted(out)  # parents before children: a child under a hidden parent is skipped


def _count_tasks(uid: int) -> int:
    """Processes+threads owned by uid (what RLIMIT_NPROC counts)."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n


def _command(level: str, program: str, tmp_mb: int) -> tuple[list[str], str | None, int]:
    """argv, cwd to create (None: the namespace script uses its private /tmp), uid."""
    py, prefix = _interpreter()
    if level in ("namespaces", "userns"):
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if level == "namespaces" else 0
        userns = ["--user", "--map-root-user"] if level == "userns" else []
        argv = ["unshare", *userns, *_NS_FLAGS, "--", "/bin/sh", "-c", _NS_SCRIPT, "sandbox",
                py, prefix, str(tmp_mb), str(uid), program, *hidden_paths()]
        return argv, None, uid
    if level == "uid":
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                "--bounding-set=-all", "--inh-caps=-all", "--", py, "-I", "-S", "-c", program]
        return argv, tempfile.mkdtemp(prefix="specsweep-sbx-"), uid
    return [py, "-I", "-S", "-c", program], tempfile.mkdtemp(prefix="specsweep-sbx-"), os.getuid()


def _read_tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _OUTPUT_LIMIT))
    return f.read().decode("utf-8", "replace")


def run_python(code: str, stdin: str = "", *, timeout_s: float = 10.0, memory_mb: int = 512,
               fsize_mb: int = 16, nproc: int = 16, level: str | None = None) -> SandboxResult:
    """Run `code` with `python -I -S` (stdlib only) in the sandbox; never raises for what the
    code does. timeout_s is wall clock for the whole process tree (killed after it)."""
    level = level or isolation_level()
    uid = os.getuid()
    if level == "process" and uid != 0:
        # Same uid as us: the count includes our own processes (root is exempt from NPROC).
        nproc += _count_tasks(uid)
    cpu = math.ceil(timeout_s) + 1
    limits = {"RLIMIT_AS": (memory_mb << 20,) * 2, "RLIMIT_CPU": (cpu, cpu + 1),
              "RLIMIT_FSIZE": (fsize_mb << 20,) * 2, "RLIMIT_NPROC": (nproc,) * 2,
              "RLIMIT_CORE": (0, 0), "RLIMIT_NOFILE": (256, 256)}
    program = _PROLOGUE.format(limits=limits) + code
    argv, workdir, sandbox_uid = _command(level, program, tmp_mb=max(64, 2 * fsize_mb))
    if workdir:
        os.chown(workdir, sandbox_uid, sandbox_uid)
    home = workdir or "/tmp"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
    try:
        # Output goes to unlinked files (bounded by RLIMIT_FSIZE), not pipes we must drain.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    cwd=workdir or "/", env=env, start_new_session=True)
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The whole process group; in the namespaces levels killing `unshare` also
                # kills the namespace's init and with it every process the code started.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            return SandboxResult(None if timed_out else proc.returncode, _read_tail(out),
                                 _read_tail(err), timed_out, level)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
_PROBE = """\
import os, sys
assert os.getcwd() != "/"
if {hides!r}:
    assert not os.path.exists({own_file!r}), "project visible"
    try:
        open("/specsweep-probe", "w")
        raise SystemExit("root fs writable")
    except OSError:
        pass
print("sandbox-ok")
"""

_lock = threading.Lock()
_level: str | None = None


def _probe(level: str) -> str:
    """'' when `level` works here, else why not."""
    if level in ("namespaces", "uid") and os.geteuid() != 0:
        return "needs root"
    if level == "userns" and os.geteuid() == 0:
        return "not used as root"
    tools = {"namespaces": ("unshare", "setpriv", "mount"), "userns": ("unshare", "setpriv", "mount"),
             "uid": ("setpriv",), "process": ()}[level]
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        return f"missing {', '.join(missing)}"
    code = _PROBE.format(hides=level in PROTECTS_PROJECT, own_file=str(Path(__file__).resolve()))
    try:
        r = run_python(code, timeout_s=30, level=level)
    except OSError as e:
        return str(e)
    if r.returncode == 0 and "sandbox-ok" in r.stdout:
        return ""
    return (r.stderr.strip() or r.stdout.strip() or f"exit code {r.returncode}").splitlines()[-1]


def isolation_level() -> str:
    """The isolation used for generated code here (probed once; see the module docstring)."""
    global _level
    with _lock:
        if _level is None:
            forced = os.environ.get("SPECSWEEP_SANDBOX", "auto").strip().lower() or "auto"
            if forced != "auto":
                if forced not in LEVELS:
                    raise ValueError(f"SPECSWEEP_SANDBOX={forced!r}: expected auto or one of {LEVELS}")
                why = _probe(forced)
                if why:
                    raise RuntimeError(f"SPECSWEEP_SANDBOX={forced} does not work here: {why}")
                _level = forced
                reasons = [f"forced by SPECSWEEP_SANDBOX={forced}"]
            else:
                reasons = []
                for level in LEVELS:
                    why = _probe(level)
                    if not why:
                        _level = level
                        break
                    reasons.append(f"{level}: {why}")
            if _level not in PROTECTS_PROJECT:
                log.warning(
                    "sandbox: generated code runs with isolation level %r; it is NOT kept away "
                    "from the project's files (%s)", _level, "; ".join(reasons))
        return _level


def _reset_for_tests() -> None:
    global _level
    with _lock:
        _level = None
