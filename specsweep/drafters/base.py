"""The drafter interface: propose tokens, hear how many the target kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draft:
    """Proposed continuation of the committed sequence."""

    tokens: torch.Tensor  # [n] long, n may be 0 (nothing to propose: the step decodes one token)
    probs: torch.Tensor | None = None  # [n, V] distributions the tokens were sampled from; None = deterministic


class Drafter:
    """One draft source. The engine owns the loop; a drafter only proposes and listens.

    Per prompt the engine calls ``reset(prompt_ids)``, then repeatedly ``propose(ids, k)`` and
    ``on_verified(accepted)``. ``ids`` [1, L] is every committed token (prompt + output so far); its
    last token is the root the draft continues. After ``on_verified`` the committed sequence grows
    by ``accepted`` draft tokens plus the target's own next token.
    """

    #: True when the draft returns the distributions it sampled from (needed for stochastic verification
    #: to use min(1, p/q); deterministic drafts are treated as one-hot q)
    samples = False

    def reset(self, prompt_ids: torch.Tensor) -> None:
        pass

    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        raise NotImplementedError

    def on_verified(self, accepted: int) -> None:
        pass

    def counters(self) -> dict:
        """Draft-specific counters for metrics.json (e.g. per-level acceptance of a cascade)."""
        return {}
