"""The "free tokens" curve: a whole target forward over root + n tree nodes vs a one-token decode.

Decoding is memory-bound, so verifying a few extra tokens in the same forward costs little; this
measures how many. The target is a random-weight model (no weights needed for timing) of a shape
in `specsweep.tools.costs.MODELS` (``shape``: by default the embedded model's). Nodes follow the
engine's convention: after a KV cache of ``prefix`` tokens come the root and the n nodes, with
`Tree.verify_mask` as a 4D additive mask and explicit `Tree.verify_position_ids`. A dense mask
costs the same whatever its pattern, so each n uses a chain of n nodes.
"""

from __future__ import annotations

import statistics

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import DynamicCache

from specsweep.core.tree import Tree
from specsweep.tools.costs import MODELS, random_llama
from specsweep.tools.tree_attention.timing import measure


def tree_sizes(cfg: DictConfig) -> list[int]:
    """0 (the one-token decode step), then 1..max_nodes every `stride`, always ending at max_nodes."""
    return sorted({0, *range(1, cfg.max_nodes + 1, cfg.stride), cfg.max_nodes})


def model_shape(cfg: DictConfig) -> dict:
    """LlamaConfig fields of the timed model: the shape ``cfg.shape`` names, ``cfg.model``'s fields over it."""
    return {**MODELS[cfg.shape], **OmegaConf.to_container(cfg.model)}


def run(cfg: DictConfig, device: torch.device, dtype: torch.dtype, timing: DictConfig) -> list[dict]:
    """One row per tree size; ``timing`` holds warmup, repeats and budget_s."""
    generator = torch.Generator().manual_seed(cfg.seed)
    model = random_llama(model_shape(cfg), device, dtype, cfg.attn_implementation)
    vocab = model.config.vocab_size
    prefix_ids = torch.randint(vocab, (cfg.batch, cfg.prefix), generator=generator).to(device)
    rows = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=prefix_ids, past_key_values=cache)

        def drop_appended():
            cache.crop(cfg.prefix - cache.get_seq_length())  # a negative count removes that many

        for n in tree_sizes(cfg):
            ids = torch.randint(vocab, (cfg.batch, n + 1), generator=generator).to(device)
            inputs = {"input_ids": ids, "past_key_values": cache}
            if n == 0:  # a plain decode step: the root alone, causal by default
                inputs["position_ids"] = torch.full((cfg.batch, 1), cfg.prefix, device=device)
            else:
                tree = Tree.chain(n)
                inputs["attention_mask"] = tree.verify_mask(cfg.prefix, dtype, device).expand(cfg.batch, -1, -1, -1)
                inputs["position_ids"] = tree.verify_position_ids(cfg.prefix, device).expand(cfg.batch, -1)
            times = measure(
                lambda: model(**inputs), device, timing.warmup, timing.repeats, timing.budget_s, reset=drop_appended
            )
            rows.append(
                {
                    "nodes": n,
                    "tokens": n + 1,
                    "prefix": cfg.prefix,
                    "batch": cfg.batch,
                    "median_ms": statistics.median(times) * 1e3,
                    "min_ms": min(times) * 1e3,
                    "repeats": len(times),
                }
            )
    decode_ms = rows[0]["median_ms"]
    for row in rows:
        row["vs_decode"] = row["median_ms"] / decode_ms
    return rows
