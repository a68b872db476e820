"""Prompt lookup (n-gram) drafting: continue the latest earlier occurrence of the current suffix.

No model at all. An index maps every n-gram (min_ngram <= n <= max_ngram) of the committed tokens to
the position after its most recent occurrence, updated incrementally, so a proposal costs O(max_ngram)
Python work whatever the sequence length.
"""

from __future__ import annotations

import torch

from specsweep.drafters.base import Draft, Drafter, fill_tree

SUCCESSORS_KEPT = 4  # distinct next tokens remembered per n-gram, for tree drafts


class PromptLookupDrafter(Drafter):
    """``weak_ngram``/``weak_tokens``: a match shorter than ``weak_ngram`` tokens is often wrong, so
    it proposes at most ``weak_tokens`` (verifying a token costs the target something even on CPU);
    a long match proposes the full draft length."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, weak_ngram: int = 1, weak_tokens: int | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if weak_tokens is not None and weak_tokens < 0:
            raise ValueError(f"weak_tokens must be >= 0, got {weak_tokens}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.weak_ngram, self.weak_tokens = weak_ngram, weak_tokens

    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.tokens: list[int] = []
        self.next_after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.successors: dict[tuple[int, ...], list[int]] = {}  # n-gram -> distinct next tokens, latest first

    def _extend(self, ids: torch.Tensor) -> None:
        start = len(self.tokens)
        self.tokens.extend(ids[0, start:].tolist())
        tokens = self.tokens
        # an n-gram ending just before position e is indexed once tokens[e] exists
        for e in range(max(start, 1), len(tokens)):
            for n in range(self.min_ngram, min(self.max_ngram, e) + 1):
                key = tuple(tokens[e - n:e])
                self.next_after[key] = e
                seen = self.successors.setdefault(key, [])
                if tokens[e] in seen:
                    seen.remove(tokens[e])
                seen.insert(0, tokens[e])
                del seen[SUCCESSORS_KEPT:]

    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        self._extend(ids)
        tokens, length = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, length), self.min_ngram - 1, -1):
            start = self.next_after.get(tuple(tokens[length - n:]))
            if start is not None:
                if n < self.weak_ngram and self.weak_tokens is not None:
                    max_tokens = min(max_tokens, self.weak_tokens)
                return Draft(torch.tensor(tokens[start:start + max_tokens], dtype=torch.long, device=ids.device))
        return Draft(ids.new_empty(0))

    def propose_tree(self, ids: torch.Tensor, shape) -> Draft:
        """A node's children: the tokens that followed its longest matching n-grams, latest first."""
        self._extend(ids)
        tail = self.tokens[-self.max_ngram:]

        def candidates(path, k):
            context = (tail + path)[-self.max_ngram:]
            ranked: list[int] = []
            for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
                for token in self.successors.get(tuple(context[len(context) - n:]), ()):
                    if token not in ranked:
                        ranked.append(token)
                if len(ranked) >= k:
                    break
            return ranked[:k]

        return fill_tree(shape, candidates, ids.device)
