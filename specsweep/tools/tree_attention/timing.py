"""Wall-clock timing of one call, with warm-up and device synchronisation."""

from __future__ import annotations

import time
from typing import Callable

import torch

from specsweep.core.engine import synchronize

MIN_REPEATS = 3  # a median needs a few samples even when one call is slow


def measure(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    budget_s: float | None = None,
    reset: Callable[[], object] | None = None,
) -> list[float]:
    """Seconds per call of ``fn``, one entry per repeat.

    ``reset`` runs untimed after every call (e.g. to crop a KV cache back). When ``budget_s`` is
    set and a warm-up call shows ``repeats`` calls would take longer, fewer repeats are run
    (never fewer than `MIN_REPEATS`). CUDA is timed with events, other devices by the host clock
    after synchronising.
    """
    if warmup < 1:
        raise ValueError("timing needs at least one warm-up call (first calls compile, allocate, cache)")
    for _ in range(warmup):
        warm_time = _time_once(fn, device)
        if reset is not None:
            reset()
    if budget_s is not None:
        repeats = max(MIN_REPEATS, min(repeats, int(budget_s / max(warm_time, 1e-9))))
    times = []
    for _ in range(repeats):
        times.append(_time_once(fn, device))
        if reset is not None:
            reset()
    return times


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    synchronize(device)
    start_s = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start_s
