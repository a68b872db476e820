"""Cascade Speculative Drafting (Chen et al., CS-Drafting): drafts that are themselves accelerated.

``levels`` lists the drafts from the largest down (e.g. [llama-160m, bigram]), each a draft config
of its own (``_target_``, ``name`` and its class's keys; a model level's path is resolved as
``draft.levels.<i>.path``). ``k_matrix`` is CS-Drafting's n x n matrix. Row 0 is the top-level
proposal: its first k[0][0] tokens come from level 0, the next k[0][1] from level 1, and so on
(horizontal cascade: later positions, cheaper drafts).
A model level producing tokens is itself sped up by the levels below it, with row/column i+1 onward
of the matrix as its own k-matrix (vertical cascade): the lower levels propose, the model checks the
proposal in one forward and keeps its own greedy continuation. The bottom level (a bigram table or
prompt lookup) just proposes.

Every level only proposes; the target's verification in the engine keeps decoding lossless whatever
the levels do. The cascade's proposal is deterministic (one-hot q at temperature > 0).
"""

from __future__ import annotations

import torch

from specsweep.core.draft import ComposedDrafter, Draft, Drafter
from specsweep.drafters.model import ModelDrafter
from specsweep.errors import SpecsweepError


def check_k_matrix(k_matrix, levels: int) -> list[list[int]]:
    rows = [list(map(int, row)) for row in k_matrix]
    if len(rows) != levels or any(len(row) != levels for row in rows):
        raise SpecsweepError(f"draft.k_matrix must be {levels} x {levels} for {levels} draft levels, got "
                             f"{len(rows)} rows of lengths {[len(r) for r in rows]}")
    if any(k < 0 for row in rows for k in row) or sum(rows[0]) == 0:
        raise SpecsweepError("draft.k_matrix: entries must be >= 0 and row 0 must propose at least one token")
    return rows


class CascadeDrafter(ComposedDrafter):
    fills = ("chain",)

    @classmethod
    def build(cls, ctx, *, levels, k_matrix) -> CascadeDrafter:
        from specsweep.drafters import build_drafter

        check_k_matrix(k_matrix, len(levels))  # before any level loads a model
        built = [build_drafter(level, ctx, f"{ctx.prefix}.levels.{i}") for i, level in enumerate(levels)]
        if any(level is None for level in built):
            raise SpecsweepError(f"{ctx.prefix}.levels: _target_: null (no draft) cannot be a cascade level")
        return cls(built, [level.get("name") or type(d).__name__ for level, d in zip(levels, built)], k_matrix)

    def __init__(self, levels: list[Drafter], names: list[str], k_matrix):
        if len(levels) < 2:
            raise SpecsweepError("draft=cascade needs at least two levels")
        super().__init__(levels)
        self.names = names
        self.k = check_k_matrix(k_matrix, len(levels))
        # per level: tokens it was shown from the levels below, and how many of them it kept
        self.checked = [0] * len(levels)
        self.kept = [0] * len(levels)

    @property
    def levels(self) -> list[Drafter]:
        return self.parts

    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        tokens = self._draft(0, ids, max_tokens)
        return Draft(torch.tensor(tokens[:max_tokens], dtype=torch.long, device=ids.device))

    def _draft(self, first: int, ids: torch.Tensor, limit: int) -> list[int]:
        """Up to ``limit`` tokens continuing ``ids`` from levels ``first``.. with k-matrix row ``first``."""
        tokens: list[int] = []
        row = self.k[first]
        budget = 0
        for level in range(first, len(self.levels)):
            budget = min(budget + row[level], limit)
            while len(tokens) < budget:
                context = torch.cat([ids, ids.new_tensor([tokens])], dim=1) if tokens else ids
                new = self._step(level, context, budget - len(tokens))
                if not new:
                    break  # this level has nothing to offer here: let the next one try
                tokens.extend(new)
        return tokens[:limit]

    def _step(self, level: int, context: torch.Tensor, want: int) -> list[int]:
        drafter = self.levels[level]
        lower = level + 1 < len(self.levels) and sum(self.k[level + 1][level + 1:]) > 0
        if isinstance(drafter, ModelDrafter) and lower:
            proposal = self._draft(level + 1, context, sum(self.k[level + 1][level + 1:]))
            if proposal:
                new = drafter.verify_greedy(context, torch.tensor(proposal, device=context.device))
                self.checked[level] += len(proposal)
                self.kept[level] += len(new) - 1
                return new
        return drafter.propose(context, want).tokens.tolist()

    def counters(self) -> dict:
        return {"levels": [
            {"level": i, "draft": name, "checked_tokens": self.checked[i], "kept_tokens": self.kept[i],
             "acceptance_rate": self.kept[i] / self.checked[i] if self.checked[i] else None}
            for i, name in enumerate(self.names)
        ]}
