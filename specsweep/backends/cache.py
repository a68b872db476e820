"""KV-cache surgery on transformers' caches: rollback and compaction after verification, static write position."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions (transformers 5 crops by a negative count to remove)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def move(cache, start: int, keep: list[int]) -> None:
    """Move the KV entries at positions ``keep`` (ascending, >= start) to ``start, start+1, ...``
    (a dynamic or static cache); what lies after them is left in place."""
    run = [layer for layer in cache.layers if layer.keys is not None and layer.keys.numel()]  # not layer-skip's idle ones
    move_entries([t for layer in run for t in (layer.keys, layer.values)], start, keep)


def move_entries(tensors: list[torch.Tensor], start: int, keep: list[int]) -> None:
    """`move` for KV tensors [..., L, D] themselves, in place."""
    if tensors and keep != list(range(start, start + len(keep))):
        index = torch.tensor(keep, device=tensors[0].device)
        for t in tensors:
            t[..., start:start + len(keep), :] = t.index_select(-2, index)


def compact(cache: DynamicCache, start: int, keep: list[int]) -> None:
    """`move`, then drop everything after the kept entries: the accepted path of a verified tree,
    put in sequence order."""
    move(cache, start, keep)
    truncate(cache, start + len(keep))


def set_write_position(cache, length: int) -> None:
    """Point a StaticCache's write position at ``length``. Recent transformers keep it as a device
    tensor that each forward (and so each CUDA-graph replay) advances; older ones take the
    ``cache_position`` input instead and have nothing to set."""
    for layer in cache.layers:
        position = getattr(layer, "cumulative_length", None)
        if isinstance(position, torch.Tensor):
            position.fill_(length)
        elif isinstance(position, int):
            layer.cumulative_length = length
