"""Prompt lookup (n-gram) drafting: continue the latest earlier occurrence of the current suffix.

No model at all. An index maps every n-gram (min_ngram <= n <= max_ngram) of the committed tokens to
the position after its most recent occurrence, updated incrementally, so a proposal costs O(max_ngram)
Python work whatever the sequence length.

The copy may run into the tokens it is itself proposing, as an LZ77 copy does: when the occurrence
is p tokens back, the draft repeats those p tokens. Small models often loop on one line or one token;
cutting the copy at the end of the committed text would propose p tokens there instead of the full
draft (HF's prompt lookup does; on HumanEval 0..23 the overlap raised tokens per step by 11%).

Token recycling (Luo et al., 2024, "Turning Trash into Treasure") fills the steps prompt lookup
leaves empty or weak. The target's greedy choice after every token it scored along an accepted path
is remembered (token -> next token, across prompts); when the match is weak or absent, the draft is
extended to ``recycle_tokens`` tokens by following that table from the last token.
"""

from __future__ import annotations

import torch

from specsweep.drafters.base import Draft, Drafter, fill_tree

SUCCESSORS_KEPT = 4  # distinct next tokens remembered per n-gram, for tree drafts


class PromptLookupDrafter(Drafter):
    """``weak_ngram``/``weak_tokens``: a match shorter than ``weak_ngram`` tokens is often wrong, so
    it proposes at most ``weak_tokens`` (verifying a token costs the target something even on CPU);
    a long match proposes the full draft length."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, weak_ngram: int = 1, weak_tokens: int | None = None,
                 recycle_tokens: int = 0):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if weak_tokens is not None and weak_tokens < 0:
            raise ValueError(f"weak_tokens must be >= 0, got {weak_tokens}")
        if recycle_tokens < 0:
            raise ValueError(f"recycle_tokens must be >= 0, got {recycle_tokens}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.weak_ngram, self.weak_tokens = weak_ngram, weak_tokens
        self.recycle_tokens = recycle_tokens
        self.recycled: dict[int, int] = {}  # token -> the target's greedy next token after it (kept across prompts)

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
        draft, strong = self._lookup(max_tokens)
        if not strong and self.recycle_tokens:
            last = draft[-1] if draft else self.tokens[-1]
            while len(draft) < min(self.recycle_tokens, max_tokens) and last in self.recycled:
                last = self.recycled[last]
                draft.append(last)
        return Draft(torch.tensor(draft, dtype=torch.long, device=ids.device))

    def _lookup(self, max_tokens: int) -> tuple[list[int], bool]:
        """The continuation of the longest matching suffix, and whether the match was strong."""
        tokens, length = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, length), self.min_ngram - 1, -1):
            start = self.next_after.get(tuple(tokens[length - n:]))
            if start is not None:
                strong = n >= self.weak_ngram
                if not strong and self.weak_tokens is not None:
                    max_tokens = min(max_tokens, self.weak_tokens)
                source = tokens[start:]  # p = length - start tokens; the copy repeats them (see above)
                return (source * (max_tokens // len(source) + 1))[:max_tokens], strong
        return [], False

    def on_scored(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        if self.recycle_tokens:
            self.recycled.update(zip(inputs.tolist(), logits.argmax(-1).tolist()))

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
