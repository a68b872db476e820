"""The target's side of a decode step, as the engine sees it (`specsweep.backends.target` has the
implementations: a dynamic cache, the lean bf16 forward, a static cache with CUDA graphs)."""

from __future__ import annotations

from typing import Protocol

import torch

from specsweep.core.tree import Tree


class Runner(Protocol):
    def prefill(self, prompt_ids: torch.Tensor, room: int) -> torch.Tensor:
        """Fill a fresh KV cache with ``prompt_ids`` [1, P] -> logits [V] after its last token.
        ``room``: the most tokens that will follow the prompt."""

    def score(self, step_input: torch.Tensor, tree: Tree | None, cache_len: int) -> torch.Tensor:
        """One forward over root + draft [1, m] after ``cache_len`` cached tokens -> logits [m, V];
        ``tree`` None: a chain (causal). Their KV entries are appended to the cache."""

    def keep(self, start: int, positions: list[int]) -> None:
        """Keep the cache's first ``start`` positions and the entries at ``positions`` (ascending),
        moved to follow them; drop the rest."""

    def hidden(self) -> torch.Tensor:
        """The final hidden states [m, H] (the output layer's input) of the rows the last forward
        returned logits for: the prefill's last token, or every row of a score."""
