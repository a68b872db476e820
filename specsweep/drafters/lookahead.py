"""Lookahead decoding (Fu et al., 2024): a Jacobi lookahead branch feeds an n-gram pool, and a
verification branch checks the pool's n-grams that continue the root, both in one target forward.

**Lookahead branch.** A 2D window of N - 1 levels: Jacobi trajectories of W positions. Level 0 holds
guesses for the W - 1 positions after the root (B0 = root + level 0); level l >= 1 holds W tokens,
token j at position root + l + j, the target's choice after level l - 1's token j in the forward
before. In the paper's attention mask, level l's token j sees the prefix, B0 up to j and the tokens
j of levels 1..l: exactly its ancestors if its parent is level l - 1's token j (B0's for l = 1), so
the whole window is a draft tree, and with the verification branch one tree verified in one
forward (`specsweep.core.tree`). Each forward's choices after the last level form level N - 1; the
tokens j of every level and that choice are an N-gram (B0[j], L1[j], .., L_{N-2}[j], new[j]) keyed by
its first token. The window then moves one position per step whatever was accepted (the
reference implementation's default, ALWAYS_FWD_ONE): level 0 <- level 1 without its first token,
level l <- level l + 1, the last level <- the new choices. It starts from W + N - 3 tokens drawn
from the prompt, filling one level per step for N - 2 steps, as the reference implementation does.

**Verification branch.** Up to G pooled n-grams whose key is the root, each the N - 1 tokens after
it (an LRU of G per key). The engine verifies the tree: greedy keeps the longest path equal to the
target's choices, sampling SpecInfer's rule over deterministic children (the paper's sampling), so
both are lossless. The window's own chains are verified as well: a Jacobi guess the target agrees
with is kept too.

Nodes with the same parent and token are one node (their rows would be equal), so the tree is a
trie. ``pool_from_text`` also pools the N-grams of the prompt and of the output (the reference's
POOL_FROM_PROMPT; off there by default).
"""

from __future__ import annotations

import random
import zlib

import torch

from specsweep.core.draft import Draft, Drafter
from specsweep.core.tree import SelfShaped, Tree


def window_tree(window: int, ngram: int, guesses: int) -> Tree:
    """The largest step's tree: the full window and ``guesses`` disjoint n-gram chains, no merging."""
    parents = list(range(-1, window - 2))  # level 0: W - 1 tokens after the root
    below = [-1] + list(range(window - 1))  # B0: the root, then level 0
    for _ in range(1, ngram - 1):
        start = len(parents)
        parents += below
        below = list(range(start, start + window))
    for _ in range(guesses):
        start = len(parents)
        parents += [-1] + list(range(start, start + ngram - 2))
    return Tree(tuple(parents))


class LookaheadDrafter(Drafter):
    """``window`` W, ``ngram`` N (N - 1 levels, N-grams pooled), ``guesses`` G (n-grams verified per
    step, kept per key)."""

    fills = ("self",)

    @classmethod
    def self_shaped(cls, params: dict) -> SelfShaped:
        window, ngram, guesses = cls._check(params["window"], params["ngram"], params["guesses"])
        tree = window_tree(window, ngram, guesses)
        # while filling, level 0 is longer (W + N - 3 tokens at first): the most nodes any step holds
        filling = max(window - 1 + (ngram - 1 - k) + (k - 1) * (window + ngram - 1 - k) for k in range(1, ngram))
        return SelfShaped(max(tree.num_nodes, filling + guesses * (ngram - 1)), tree.depth, tree)

    @staticmethod
    def _check(window: int, ngram: int, guesses: int) -> tuple[int, int, int]:
        for key, value, least in (("window", window, 2), ("ngram", ngram, 2), ("guesses", guesses, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"draft.{key}={value}: must be an integer >= {least}")
        return window, ngram, guesses

    @classmethod
    def build(cls, ctx, **params) -> LookaheadDrafter:
        eos = ctx.tokenizer.eos_token_id
        return cls(eos_id=eos, **params)

    def __init__(self, window: int = 5, ngram: int = 4, guesses: int = 5, pool_from_text: bool = False,
                 eos_id: int | None = None):
        self.window, self.ngram, self.guesses = self._check(window, ngram, guesses)
        self.pool_from_text, self.eos_id = pool_from_text, eos_id
        self.forwards = self.steps_with_guesses = self.accepted_from_pool = self.accepted_from_window = 0

    def reset(self, prompt_ids: torch.Tensor) -> None:
        prompt = prompt_ids[0].tolist()
        self.rng = random.Random(zlib.crc32(str(prompt).encode()))  # per prompt: order and resume agnostic
        self.text = list(prompt)
        self.levels = [[self.rng.choice(prompt) for _ in range(self.window + self.ngram - 3)]]
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        if self.pool_from_text:
            for start in range(len(prompt) - self.ngram + 1):
                self._pool(tuple(prompt[start:start + self.ngram]))

    def _pool(self, gram: tuple[int, ...]) -> None:
        """Add an N-gram (key first) to its key's list, most recent last, at most G per key."""
        if self.guesses == 0:
            return
        kept = self.pool.setdefault(gram[0], [])
        if gram[1:] in kept:
            kept.remove(gram[1:])
        kept.append(gram[1:])
        del kept[:-self.guesses]

    def propose(self, ids: torch.Tensor, max_depth: int) -> Draft:
        self._catch_up(ids)
        root = self.text[-1]
        tokens, parents, depths, children = [], [], [], {}
        index: dict[tuple[int, int], int] = {}

        def node(parent: int | None, token: int) -> int | None:
            """The node of ``token`` under ``parent`` (-1: the root; None: beyond the depth)."""
            if parent is None or (depths[parent] if parent >= 0 else 0) >= max_depth:
                return None
            key = (parent, token)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                depths.append((depths[parent] if parent >= 0 else 0) + 1)
                children.setdefault(parent, []).append(index[key])
            return index[key]

        below: list[int | None] = [-1]
        for token in self.levels[0]:
            below.append(node(below[-1], token))
        self.slots = [below]  # per level, the node of each token (B0 for level 0)
        for level in self.levels[1:]:
            below = [node(parent, token) for parent, token in zip(below, level)]
            self.slots.append(below)
        self.root, self.on_grams = root, set()
        for gram in self.pool.get(root, ()):
            at = -1
            for token in gram:
                at = node(at, token)
                self.on_grams.add(at)
        self.on_grams.discard(None)
        self.forwards += 1
        if not tokens:
            return Draft(torch.empty(0, dtype=torch.long, device=ids.device))
        ranks = [children[p].index(i) for i, p in enumerate(parents)]
        return Draft(torch.tensor(tokens, dtype=torch.long, device=ids.device), tree=Tree(tuple(parents), tuple(ranks)))

    def _catch_up(self, ids: torch.Tensor) -> None:
        """The committed text since the last step; with ``pool_from_text`` its new N-grams pooled."""
        start = len(self.text)
        self.text.extend(ids[0, start:].tolist())
        if self.pool_from_text:
            for end in range(max(start, self.ngram), len(self.text) + 1):
                self._pool(tuple(self.text[end - self.ngram:end]))

    def on_verified(self, draft: Draft, logits: torch.Tensor, path: list[int]) -> None:
        choice = logits.argmax(-1).tolist()  # row 0: the root's; row 1 + i: node i's

        def out(slot: int | None) -> int:
            if slot is None:  # beyond the depth the step allowed: a fresh guess
                return self.rng.choice(self.text)
            return choice[slot + 1]

        from_pool = sum(node in self.on_grams for node in path)
        self.accepted_from_pool += from_pool
        self.accepted_from_window += len(path) - from_pool
        self.steps_with_guesses += bool(self.on_grams)
        self._advance([out(slot) for slot in self.slots[-1]])

    def _advance(self, new: list[int]) -> None:
        """Move the window one position: pool the window's N-grams once every level is full, then
        shift the levels up (filling: every level loses its first token, the new one joins)."""
        if self.eos_id is not None:  # the reference keeps EOS out of the window (it destabilises it)
            new = [self.rng.choice(self.text) if t == self.eos_id else t for t in new]
        levels = self.levels
        if len(levels) < self.ngram - 1:
            self.levels = [level[1:] for level in levels] + [new[1:]]
            return
        base = [self.root] + levels[0]  # B0 of the step just verified
        for j in range(self.window):
            self._pool((base[j], *(level[j] for level in levels[1:]), new[j]))
        moved = levels[1:] + [new]
        self.levels = [moved[0][1:]] + moved[1:]

    def counters(self) -> dict:
        return {"window": self.window, "ngram": self.ngram, "guesses": self.guesses,
                "pool_from_text": self.pool_from_text, "forwards": self.forwards,
                "steps_with_guesses": self.steps_with_guesses, "accepted_from_pool": self.accepted_from_pool,
                "accepted_from_window": self.accepted_from_window}
