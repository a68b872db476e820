"""KV-cache surgery on transformers' DynamicCache: rollback after verification."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions (transformers 5 crops by a negative count to remove)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def compact(cache: DynamicCache, start: int, keep: list[int]) -> None:
    """Move the KV entries at positions ``keep`` (ascending, >= start) to ``start, start+1, ...``
    and drop everything after them: the accepted path of a verified tree, put in sequence order."""
    if keep != list(range(start, start + len(keep))):
        for layer in cache.layers:
            if layer.keys is None or layer.keys.numel() == 0:
                continue  # a layer this model does not run (layer-skip views)
            index = torch.tensor(keep, device=layer.keys.device)
            layer.keys[..., start:start + len(keep), :] = layer.keys.index_select(-2, index)
            layer.values[..., start:start + len(keep), :] = layer.values.index_select(-2, index)
    truncate(cache, start + len(keep))
