"""Verification of a drafted chain against the target's scores: greedy and stochastic.

Both take, for one sequence, the target's scores at the root and at each of the n draft tokens
(n + 1 rows) and return ``(accepted, next_token)``: how many leading draft tokens the target keeps
and the token the target itself emits after them (the correction, or the bonus when all pass).
"""

from __future__ import annotations

import torch

from specsweep.sampling import sample


def verify_greedy(target_logits: torch.Tensor, draft: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of ``draft`` [n] equal to the target's argmax, then the target's argmax."""
    choice = target_logits.argmax(-1)  # [n + 1]
    matches = (choice[:-1] == draft).int()
    accepted = int(matches.cumprod(0).sum()) if draft.numel() else 0
    return accepted, int(choice[accepted])


def verify_stochastic(
    p: torch.Tensor,
    draft: torch.Tensor,
    q: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Leviathan/Chen speculative sampling: the output is distributed exactly as the target's.

    ``p`` [n + 1, V]: target distributions; ``draft`` [n]; ``q`` [n, V]: the distributions the draft
    sampled from, or None for a deterministic draft (q is then one-hot on the drafted token).
    """
    n = draft.numel()
    if n:
        p_draft = p[:-1].gather(-1, draft[:, None]).squeeze(-1)  # p_i(x_i)
        q_draft = torch.ones_like(p_draft) if q is None else q.gather(-1, draft[:, None]).squeeze(-1)
        ratio = (p_draft / q_draft).clamp(max=1.0)
        u = torch.rand(n, generator=generator, device=p.device)
        rejected = (u >= ratio).nonzero()
        if rejected.numel():
            i = int(rejected[0])
            if q is None:
                residual = p[i].clone()
                residual[draft[i]] = 0.0
            else:
                residual = (p[i] - q[i]).clamp(min=0.0)
            total = residual.sum()
            # residual mass 0 means p == q on this row, where rejection has probability 0
            residual = residual / total if total > 0 else p[i]
            return i, int(sample(residual, generator))
    return n, int(sample(p[n], generator))
