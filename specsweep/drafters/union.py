"""Two drafts at once: their chains merged into one tree, verified in one target forward.

``first`` and ``second`` are draft configs of their own (e.g. prompt lookup and trained heads).
Each step both propose a chain; where they agree the tree shares the nodes, where they part the
second's rest becomes a sibling branch, so the target keeps whichever source was right. When one
chain holds the other (or one is empty) the step is a plain chain, of the first's kind when it
comes from the first (the cost length policy then cuts it, `specsweep.core.draft_length`).
``budget`` caps the tree's nodes (at most tree.depth, which sized the target's cache): the first's
chain comes first, the second's branch gets the rest. Greedy decoding only: a sampled chain's
distributions do not carry over into a merged tree's deterministic branches.
"""

from __future__ import annotations

import torch

from specsweep.core.draft import ComposedDrafter, Draft, Drafter
from specsweep.core.tree import Tree
from specsweep.errors import SpecsweepError


def merge(first: list[int], second: list[int], budget: int) -> tuple[list[int], Tree | None]:
    """-> (tokens, tree) of the trie of two chains (tree None: a chain)."""
    first = first[:budget]
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    rest = second[shared:shared + budget - len(first)]
    if not rest:
        return first, None
    if shared == len(first):  # the second runs on past the first's end (or the first is empty)
        return first + rest, None
    parents = list(range(-1, len(first) - 1)) + [shared - 1] + list(range(len(first), len(first) + len(rest) - 1))
    ranks = [0] * len(first) + [1] + [0] * (len(rest) - 1)
    return first + rest, Tree(tuple(parents), tuple(ranks))


class UnionDrafter(ComposedDrafter):
    fills = ("chain",)

    @classmethod
    def build(cls, ctx, *, first, second, budget) -> UnionDrafter:
        from specsweep.drafters import build_drafter

        if not ctx.sampling.greedy:  # a sampled chain's q does not survive the merge into deterministic branches
            raise SpecsweepError(f"{ctx.prefix}: merged drafts verify greedy decoding only (decode=greedy)")
        built = [build_drafter(cfg, ctx, f"{ctx.prefix}.{key}") for key, cfg in (("first", first), ("second", second))]
        if any(d is None for d in built):
            raise SpecsweepError(f"{ctx.prefix}: first and second must both be drafts (not _target_: null)")
        return cls(*built, budget, ctx.hardware.max_verify_tokens)

    def __init__(self, first: Drafter, second: Drafter, budget: int, max_verify_tokens: int | None = None):
        if not isinstance(budget, int) or budget < 1:
            raise SpecsweepError(f"draft.budget={budget!r}: must be a positive integer")
        if max_verify_tokens is not None and budget + 1 > max_verify_tokens:
            raise SpecsweepError(f"draft.budget={budget}: a verify of {budget + 1} rows exceeds "
                                 f"hardware.max_verify_tokens={max_verify_tokens} (use {max_verify_tokens - 1})")
        super().__init__([first, second])
        self.budget = budget
        self.trees = self.chains = 0

    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        a, b = (d.propose(ids, max_tokens) for d in self.parts)
        tokens, tree = merge(a.tokens.tolist(), b.tokens.tolist(), self.budget)
        if tree is None:
            self.chains += 1
            return Draft(ids.new_tensor(tokens), kind=a.kind if a.tokens.numel() else b.kind)
        self.trees += 1
        return Draft(ids.new_tensor(tokens), tree=tree)

    def counters(self) -> dict:
        return {"tree_steps": self.trees, "chain_steps": self.chains,
                **{f"{key}_counters": d.counters() for key, d in zip(("first", "second"), self.parts)}}
