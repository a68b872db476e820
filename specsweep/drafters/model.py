"""A draft that is a causal LM with its own KV cache (llama-160m, a 7b sibling, a layer-skipped target)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from specsweep.cache import truncate
from specsweep.drafters.base import Draft, Drafter
from specsweep.sampling import Sampling, sample


class ModelDrafter(Drafter):
    """Autoregressive drafting, one token per draft forward, rolling its cache back after verification."""

    def __init__(self, model, sampling: Sampling, generator: torch.Generator | None = None):
        self.model, self.sampling, self.generator = model, sampling, generator
        self.samples = not sampling.greedy

    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.valid = 0  # leading committed tokens whose KV is in the cache
        self.base, self.fed_drafts = 0, 0

    def _next_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[0, -1]

    @torch.inference_mode()
    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        self.base, self.fed_drafts = self.valid, 0
        if max_tokens == 0:
            return Draft(ids.new_empty(0))
        feed = ids[:, self.valid:]  # the committed tokens this cache has not seen (at least the root)
        self.base = ids.shape[1]
        tokens, probs = [], []
        for step in range(max_tokens):
            logits = self._next_logits(feed)
            if self.samples:
                q = self.sampling.probabilities(logits)
                token = sample(q, self.generator)
                probs.append(q)
            else:
                token = logits.argmax(-1)
            tokens.append(token)
            feed = token.view(1, 1)
        self.fed_drafts = max_tokens - 1  # the last drafted token was never fed
        return Draft(torch.stack(tokens), torch.stack(probs) if probs else None)

    def on_verified(self, accepted: int) -> None:
        self.valid = self.base + min(accepted, self.fed_drafts)
        truncate(self.cache, self.valid)
