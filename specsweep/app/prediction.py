"""The speedup a run's measured acceptance predicts on this machine's verify-cost curve, recorded in
metrics.json (``predicted``) beside the measured speedup.

The curve t(m) (seconds of a verify forward of m rows, root included) is the one
``draft.length_policy: cost`` caches per machine, lock, target and hardware profile in
``cache_dir/costs/<key>.json`` (`specsweep.app.run.cost_key`). Row counts the cache lacks are timed
through the run's own runner before decoding, outside every timer (`VerifyCosts.calibrate`), and added
to the cache, so a sweep times each row count once per machine and setting.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from specsweep.core.draft_length import VerifyCosts
from specsweep.core.engine import synchronize
from specsweep.core.stats import curve_speedup
from specsweep.files import write_json

log = logging.getLogger(__name__)


def cached_seconds(path: Path) -> dict[int, float]:
    """t(m) in seconds from a cost cache file ({} where there is none or it is unreadable)."""
    try:
        return {int(m): float(t) for m, t in json.loads(Path(path).read_text())["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def verify_curve(path: Path, key: dict, rows: int, runner, prompt_ids, device) -> dict[int, float]:
    """t(m) for m = 1..``rows`` (seconds): the cached curve, with missing row counts timed now and
    merged into the cache (its other rows and step counts kept)."""
    seconds = cached_seconds(path)
    if all(m in seconds for m in range(1, rows + 1)):
        return seconds
    costs = VerifyCosts(rows)
    log.info("timing verify forwards of 1..%d rows for the predicted speedup (cached in %s)", rows, path)
    costs.calibrate(runner, prompt_ids, lambda: synchronize(device))
    seconds.update(costs.medians)
    try:
        old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except (OSError, ValueError):
        old = {}
    write_json(Path(path), {"key": key, "seconds": {str(m): t for m, t in sorted(seconds.items())},
                            "steps": old.get("steps", {}) if isinstance(old, dict) else {},
                            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return seconds


def predict(samples: list[dict], seconds: dict[int, float], path: Path | None) -> dict:
    """``predicted`` for metrics.json: the speedup over autoregressive decoding that the run's steps
    (draft tokens sent and accepted per step) predict on the curve, drafting taken as free
    (``speedup``) and at its measured time (``speedup_with_draft``)."""
    if 1 not in seconds:
        return {}
    t1 = seconds[1]
    ratios = {m: t / t1 for m, t in seconds.items()}
    drafted = [s.get("drafted_per_step") or [] for s in samples]
    accepted = [s.get("accepted_per_step") or [] for s in samples]
    # autoregressive runs (no curve path): their "draft" span is loop bookkeeping, not drafting
    draft_steps = 0.0 if path is None else sum(s.get("draft_s", 0.0) for s in samples) / t1
    return {"speedup": curve_speedup(drafted, accepted, ratios),
            "speedup_with_draft": curve_speedup(drafted, accepted, ratios, draft_steps),
            "t1_ms": None if path is None else t1 * 1e3, "rows": max(seconds), "curve": None if path is None else str(path)}
