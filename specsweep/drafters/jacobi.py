"""Jacobi decoding (Santilli et al., 2023): the draft is the target's own predictions from the last
forward, verified in the forward that makes the next ones. No draft model.

Greedy decoding solves y_i = argmax p(y_i | y_<i) for every position i. Jacobi iteration guesses a
block of positions at once and replaces every guess by the target's choice given the guesses before
it; a prefix that agrees with the target is fixed, so a block of n positions is fixed in at most n
iterations whatever the start (seed 003's Proposition 1). In the engine's step the guesses are a
chain draft: the verify forward fixes the accepted prefix and the target's next token, and its rows
past the first rejected guess are the next iterate of the positions after them
(`Drafter.on_verified`).

``variant`` (seed 003, Santilli et al.'s Algorithms 1-3):

* ``pj``, parallel Jacobi: one block, the whole output; each step drafts every position not yet
  fixed (the rows a forward holds grow with ``decode.max_new_tokens``).
* ``pgj``, parallel Gauss-Seidel-Jacobi: blocks of ``block`` positions, each iterated until it is
  fixed; the next block starts from fresh guesses.
* ``hgj``, hybrid: a block of fixed length h = ``block`` kept in flight: each step refills the
  block with fresh guesses as its prefix is fixed, so Jacobi iteration and Gauss-Seidel fixing run
  together (the Jacobi branch of lookahead decoding, `specsweep.drafters.lookahead`, is this).

Every variant stops at EOS and at the token limit, as the engine does for every draft (the
paper's Algorithm 3 stop). Fresh guesses (``init``): ``pad`` (the tokenizer's pad token, else its
EOS, as the paper pads) or ``lookup`` (prompt lookup's continuation of the committed text and the
guesses before them, padded where it has none). Drafts are deterministic, so sampling (T > 0) is
lossless through the engine's usual speculative sampling.
"""

from __future__ import annotations

import torch

from specsweep.core.draft import Draft, Drafter
from specsweep.core.tree import SelfShaped
from specsweep.drafters.prompt_lookup import PromptLookupDrafter

VARIANTS = ("pj", "pgj", "hgj")
INITS = ("pad", "lookup")


class JacobiDrafter(Drafter):
    """``block``: positions per block (pgj) or in flight (hgj); ``max_new_tokens``: pj's block (the
    whole output: the YAML sets it to ``decode.max_new_tokens``)."""

    fills = ("self",)

    @classmethod
    def self_shaped(cls, params: dict) -> SelfShaped:
        depth = cls._block(params["variant"], params["block"], params["max_new_tokens"])
        return SelfShaped(depth, depth)

    @staticmethod
    def _block(variant: str, block: int, max_new_tokens: int) -> int:
        if variant not in VARIANTS:
            raise ValueError(f"draft.variant={variant}: choose one of {', '.join(VARIANTS)}")
        if variant != "pj" and not (isinstance(block, int) and block >= 1):
            raise ValueError(f"draft.block={block}: must be an integer >= 1")
        return max(max_new_tokens - 1, 1) if variant == "pj" else block

    @classmethod
    def build(cls, ctx, **params) -> JacobiDrafter:
        tokenizer = ctx.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad_id=int(pad if pad is not None else 0), **params)

    def __init__(self, variant: str = "hgj", block: int = 8, init: str = "pad", max_new_tokens: int = 128,
                 pad_id: int = 0):
        if init not in INITS:
            raise ValueError(f"draft.init={init}: choose one of {', '.join(INITS)}")
        self.variant, self.init, self.pad_id = variant, init, pad_id
        self.block = self._block(variant, block, max_new_tokens)
        self.lookup = PromptLookupDrafter(max_ngram=3) if init == "lookup" else None
        # pj/pgj: blocks fixed and the forwards they took; every variant: forwards that sent a draft
        self.blocks_fixed = self.block_iterations = self.block_forwards = self.forwards = 0

    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.guesses: list[int] = []  # for the positions after the root
        self.left = 0  # pj/pgj: the current block's positions not fixed yet (0: start a block)
        if self.lookup is not None:
            self.lookup.reset(prompt_ids)

    def _fresh(self, ids: torch.Tensor, count: int) -> list[int]:
        """``count`` new guesses after the committed ``ids`` and the current guesses."""
        found = [] if self.lookup is None else self.lookup.continuation(ids, ids[0].tolist() + self.guesses, count)
        return found + [self.pad_id] * (count - len(found))

    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        if self.variant == "hgj":
            self.left = self.block
        elif self.left == 0:  # a new block
            self.block_forwards = 0
            self.left, self.guesses = self.block, []
        want = min(self.left, max_tokens)
        if len(self.guesses) < want:
            self.guesses += self._fresh(ids, want - len(self.guesses))
        self.sent = want
        return Draft(torch.tensor(self.guesses[:want], dtype=torch.long, device=ids.device))

    def on_verified(self, draft: Draft, logits: torch.Tensor, path: list[int]) -> None:
        """Row i chose the token after draft position i; past the accepted ones (and the target's
        next token) those are the next iterate of the positions after the new root."""
        accepted = len(path)
        self.forwards += 1
        self.block_forwards += 1
        self.guesses = logits[accepted + 1:self.sent + 1].argmax(-1).tolist()
        if self.variant == "hgj":
            return
        self.left = max(self.left - accepted - 1, 0)
        self.guesses = self.guesses[:self.left]
        if self.left == 0:
            self.blocks_fixed += 1
            self.block_iterations += self.block_forwards

    def counters(self) -> dict:
        """Iterations per block: forwards per fixed block (pj, pgj; a block of n positions takes at
        most n, one when every guess was right)."""
        blocks = self.variant != "hgj"
        per_block = self.block_iterations / self.blocks_fixed if blocks and self.blocks_fixed else None
        return {"variant": self.variant, "block": self.block, "init": self.init, "forwards": self.forwards,
                "blocks_fixed": self.blocks_fixed if blocks else None, "iterations_per_block": per_block}
