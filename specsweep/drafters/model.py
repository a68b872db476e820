"""A draft that is a causal LM with its own KV cache (llama-160m, a 7b sibling, a layer-skipped target)."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache

from specsweep.cache import truncate
from specsweep.drafters.base import Draft, Drafter
from specsweep.sampling import Sampling, sample
from specsweep.verify import verify_greedy


class ModelDrafter(Drafter):
    """Autoregressive drafting, one token per draft forward.

    The drafter remembers which tokens its KV cache holds and, before each proposal, keeps only the
    longest prefix shared with the sequence it is asked to continue: rollback after verification,
    and continuing sequences that a cascade extended tentatively, are the same operation.
    ``confidence_threshold`` stops a proposal early when the draft's top probability falls under it
    (Draft & Verify's adaptive draft length).
    """

    def __init__(self, model, sampling: Sampling, generator: torch.Generator | None = None,
                 confidence_threshold: float | None = None, new_cache: Callable[[], DynamicCache] | None = None):
        if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
        self.model, self.sampling, self.generator = model, sampling, generator
        self.samples = not sampling.greedy
        self.confidence_threshold = confidence_threshold
        self.new_cache = new_cache or (lambda: DynamicCache(config=model.config))

    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.cache = self.new_cache()
        self.cached = prompt_ids.new_empty(0)  # the token ids whose KV the cache holds, in order

    def _sync(self, ids: torch.Tensor) -> torch.Tensor:
        """Drop cached KV that ``ids`` does not share; return the tokens still to feed (at least one)."""
        n = min(self.cached.numel(), ids.shape[1] - 1)
        differ = (self.cached[:n] != ids[0, :n]).nonzero()
        if differ.numel():
            n = int(differ[0])
        truncate(self.cache, n)
        self.cached = self.cached[:n]
        return ids[:, n:]

    def _forward(self, feed: torch.Tensor, keep: int) -> torch.Tensor:
        logits = self.model(input_ids=feed, past_key_values=self.cache, use_cache=True, logits_to_keep=keep).logits
        self.cached = torch.cat([self.cached, feed[0]])
        return logits[0]

    @torch.inference_mode()
    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        if max_tokens <= 0:
            return Draft(ids.new_empty(0))
        feed = self._sync(ids)
        tokens, probs = [], []
        for _ in range(max_tokens):
            logits = self._forward(feed, 1)[-1]
            if self.samples:
                q = self.sampling.probabilities(logits)
                token = sample(q, self.generator)
            else:
                q, token = None, logits.argmax(-1)
            if self.confidence_threshold is not None:
                top = (q if q is not None else logits.float().softmax(-1)).max()
                if top < self.confidence_threshold:
                    break
            tokens.append(token)
            if q is not None:
                probs.append(q)
            feed = token.view(1, 1)
        if not tokens:
            return Draft(ids.new_empty(0))
        return Draft(torch.stack(tokens), torch.stack(probs) if probs else None)

    @torch.inference_mode()
    def verify_greedy(self, ids: torch.Tensor, proposal: torch.Tensor) -> list[int]:
        """Speculative decoding inside the draft (a cascade level): this model's greedy continuation
        of ``ids``, checked against ``proposal`` in one forward -> accepted prefix + its own next token."""
        feed = torch.cat([self._sync(ids), proposal.view(1, -1)], dim=1)
        logits = self._forward(feed, proposal.numel() + 1)
        accepted, token = verify_greedy(logits, proposal)
        return proposal[:accepted].tolist() + [token]
