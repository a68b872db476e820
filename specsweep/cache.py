"""KV-cache surgery on transformers' DynamicCache: rollback after verification."""

from __future__ import annotations

from transformers import DynamicCache


def truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions (transformers 5 crops by a negative count to remove)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
