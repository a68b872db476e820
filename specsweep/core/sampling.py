"""Decode settings and the logits -> distribution warp shared by target and draft.

Speculative sampling is lossless only if the draft distribution q and the target distribution p
are warped by the same temperature / top-k / top-p, so both go through `probabilities`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"decode.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"decode.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"decode.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        # top_k=1 is greedy whatever the temperature (seed 000: top_k=1, temperature=0)
        return self.temperature == 0.0 or self.top_k == 1

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distribution over the last dim, float32 (only meaningful when not greedy)."""
        logits = logits.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            # drop a token when the tokens ranked above it already cover top_p
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return logits.softmax(-1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the last dim (the first maximal index, as ``argmax``). ``max`` finds the same
    index 2-4x faster than ``argmax`` on the CPU (17 x 49152 bf16 logits: 0.64 vs 2.9 ms)."""
    return logits.max(-1).indices


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of a [..., V] distribution -> [...] long."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
