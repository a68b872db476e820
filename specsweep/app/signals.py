"""SIGTERM during a job becomes `Terminated`: the stack unwinds (sandboxes killed, W&B closed, a file
being written left whole) instead of the process vanishing. Under submitit (SLURM) submitit's own
handlers stay: it ignores SIGTERM and checkpoints and requeues on its signal (USR2)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from specsweep.errors import Terminated


def _raise(signum, frame):
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_raises():
    if os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
