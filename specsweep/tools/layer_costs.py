"""What a layer-skip draft step and a verify forward cost on this machine, measured, for the layer-skip
searches' predicted speedup (`specsweep.tools.layer_search`, `specsweep.tools.layer_bo`).

A draft step of a skip set runs the embedding, the kept layers, the final norm and the LM head. The
fixed part matters: on SmolLM2-135M the head alone is about a fifth of a token's products, so a draft
that keeps one layer of 30 costs far more than 1/30 of a step. Decoder layers have one shape, so a
draft step costs a + b k for k kept layers; a and b are fitted to one-token forwards of the target
with 1, half and all of its layers (through the draft's own layer-map cache), and the verify forward
of n rows, t(n), is timed for n = 1..max_gamma + 1. Every forward runs at the same cache position,
after a prefill of a calibration sequence, the order alternating between rounds; each figure is the
median of its rounds.

The timings are cached per machine, lock, target, hardware profile (threads included) and context
length in ``cache_dir/costs/`` (`specsweep.app.run.cost_path`), so the greedy search and the BO
search on one machine rank sets by the same costs.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import DynamicCache

from specsweep.app.run import cost_key, cost_path
from specsweep.core.draft_length import monotone
from specsweep.core.stats import predicted_speedup
from specsweep.drafters.layer_skip import LayerMapCache, skip_view
from specsweep.files import write_json

log = logging.getLogger(__name__)

ROUNDS = 15  # timed rounds per forward shape (one more untimed first: kernel builds)


@dataclass
class SkipCosts:
    """Measured seconds: ``draft`` {kept layers: one-token draft step}, ``verify`` {rows: target
    forward}, 1..max_gamma + 1 rows; ``source``: measured now, or the cache file read."""

    num_layers: int
    draft: dict[int, float]
    verify: dict[int, float]
    context: int
    source: str

    def __post_init__(self):
        ks = sorted(self.draft)
        mean_k = sum(ks) / len(ks)
        mean_t = sum(self.draft[k] for k in ks) / len(ks)
        spread = sum((k - mean_k) ** 2 for k in ks)
        self.per_layer = sum((k - mean_k) * (self.draft[k] - mean_t) for k in ks) / spread if spread else 0.0
        self.fixed = mean_t - self.per_layer * mean_k
        rows = sorted(self.verify)  # a forward of more rows is taken to cost no less (timing noise)
        self._verify = dict(zip(rows, monotone([self.verify[n] for n in rows])))

    def draft_ratio(self, kept: int) -> float:
        """A draft step keeping ``kept`` layers, in one-row target forwards."""
        return (self.fixed + self.per_layer * kept) / self._verify[1]

    def verify_ratio(self, rows: int) -> float:
        return self._verify[rows] / self._verify[1]

    def estimate(self, agreement: float, kept: int, max_gamma: int) -> dict:
        """Leviathan et al.'s predicted speedup of a set keeping ``kept`` layers, each drafted token
        accepted with ``agreement``, at the best draft length in 1..max_gamma: expected tokens per
        step over gamma draft steps and one verify of gamma + 1 rows, in one-row target forwards."""
        c = self.draft_ratio(kept)
        gamma, speedup = max(((g, predicted_speedup(agreement, g, g * c + self.verify_ratio(g + 1)))
                              for g in range(1, max_gamma + 1)), key=lambda pair: pair[1])
        return {"agreement": agreement, "cost_ratio": c, "best_gamma": gamma, "predicted_speedup": speedup}

    def describe(self) -> dict:
        return {"source": self.source, "context": self.context, "num_layers": self.num_layers,
                "draft_s": {str(k): t for k, t in sorted(self.draft.items())},
                "verify_s": {str(n): t for n, t in sorted(self.verify.items())},
                "fixed_ratio": self.fixed / self._verify[1], "per_layer_ratio": self.per_layer / self._verify[1],
                "verify_ratio": {str(n): self.verify_ratio(n) for n in sorted(self.verify)}}


def _time_forwards(model, ids: torch.Tensor, new_cache, rows: list[int], rounds: int) -> dict[int, float]:
    """Median seconds of a forward of m tokens (m in ``rows``) after a prefill of ``ids`` [1, P], the
    cache cropped back to P after each."""
    context = ids.shape[1]
    cache = new_cache()
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    feed = ids[:, -max(rows):] if context >= max(rows) else ids.repeat(1, max(rows) // context + 1)[:, :max(rows)]
    times: dict[int, list[float]] = {m: [] for m in rows}
    for round_ in range(rounds + 1):
        for m in (rows if round_ % 2 == 0 else rows[::-1]):
            start = time.perf_counter()
            logits = model(input_ids=feed[:, :m], past_key_values=cache, use_cache=True).logits
            logits.argmax(-1).tolist()  # what a draft or a verify reads
            if round_:
                times[m].append(time.perf_counter() - start)
            cache.crop(context - cache.get_seq_length())  # a negative count removes that many
    return {m: statistics.median(ts) for m, ts in times.items()}


def measure(target, context_ids: torch.Tensor, max_gamma: int, rounds: int = ROUNDS) -> SkipCosts:
    num_layers = len(target.model.layers)
    verify = _time_forwards(target, context_ids, DynamicCache, list(range(1, max_gamma + 2)), rounds)
    draft = {}
    for kept in sorted({1, max(1, num_layers // 2), num_layers}):
        layers = list(range(kept))
        draft[kept] = _time_forwards(skip_view(target, layers), context_ids, lambda: LayerMapCache(layers),
                                     [1], rounds)[1]
    return SkipCosts(num_layers, draft, verify, context_ids.shape[1], "measured")


def skip_costs(target, target_path: str, hw, cache_dir: Path, context_ids: torch.Tensor, max_gamma: int) -> SkipCosts:
    """The costs for this machine and setting: from the cache, else measured now and cached."""
    key = {**cost_key(target_path, hw), "kind": "layer-skip", "context": int(context_ids.shape[1])}
    path = cost_path(Path(cache_dir), key)
    num_layers = len(target.model.layers)
    try:
        cached = json.loads(path.read_text())
        draft = {int(k): float(t) for k, t in cached["draft_s"].items()}
        verify = {int(n): float(t) for n, t in cached["verify_s"].items()}
        if all(n in verify for n in range(1, max_gamma + 2)) and len(draft) >= 2:
            return SkipCosts(num_layers, draft, verify, key["context"], f"cache {path}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none yet, or unreadable: measured again
    log.info("timing draft steps and verify forwards for the predicted speedup (cached in %s)", path)
    with torch.inference_mode():
        costs = measure(target, context_ids, max_gamma)
    write_json(path, {"key": key, "draft_s": {str(k): t for k, t in costs.draft.items()},
                      "verify_s": {str(n): t for n, t in costs.verify.items()},
                      "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return costs
