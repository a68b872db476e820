"""Verification of a drafted chain against the target's scores: greedy and stochastic.

Both take, for one sequence, the target's scores at the root and at each of the n draft tokens
(n + 1 rows) and return ``(accepted, next_token)``: how many leading draft tokens the target keeps
and the token the target itself emits after them (the correction, or the bonus when all pass).
"""

from __future__ import annotations

import torch

from specsweep.core.sampling import greedy_tokens, sample


def verify_greedy(target_logits: torch.Tensor, draft: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of ``draft`` [n] equal to the target's argmax, then the target's argmax."""
    choice = greedy_tokens(target_logits)  # [n + 1]
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


def _walk(tree, choose_child) -> tuple[list[int], int]:
    """Descend from the root while ``choose_child(node) -> (child or None, token)`` accepts a child."""
    path, node = [], -1
    while True:
        child, token = choose_child(node)
        if child is None:
            return path, token
        path.append(child)
        node = child


def verify_tree_greedy(target_logits: torch.Tensor, tokens: torch.Tensor, tree) -> tuple[list[int], int]:
    """Longest root-to-node path whose tokens equal the target's argmax at each parent.

    ``target_logits`` [n + 1, V]: row 0 scores the root, row 1 + i node i. Returns the accepted node
    indices (root to deepest) and the target's next token after them.
    """
    choice = greedy_tokens(target_logits).tolist()
    node_tokens = tokens.tolist()

    def choose_child(node):
        want = choice[node + 1]
        for child in tree.children(node):
            if node_tokens[child] == want:
                return child, want
        return None, want

    return _walk(tree, choose_child)


def verify_tree_stochastic(p: torch.Tensor, tokens: torch.Tensor, tree,
                           generator: torch.Generator | None) -> tuple[list[int], int]:
    """SpecInfer's multi-step speculative sampling over each node's (deterministic) children.

    ``p`` [n + 1, V]: target distributions (row 0 at the root, row 1 + i at node i). At a node, each
    child x in rank order is accepted with probability p(x) under the current residual p; on
    rejection p <- norm(p with x removed) (max(0, p - q) for a one-hot q). If every child fails, the
    next token is drawn from the residual. The output is distributed exactly as the target's.
    """
    node_tokens = tokens.tolist()

    def choose_child(node):
        residual = p[node + 1]
        for child in tree.children(node):
            x = node_tokens[child]
            if float(torch.rand((), generator=generator, device=p.device)) < float(residual[x]):
                return child, x
            rest = residual.clone()
            rest[x] = 0.0
            total = rest.sum()
            if total <= 0:  # x held all the mass, so it could not have been rejected (rounding only)
                return child, x
            residual = rest / total
        return None, int(sample(residual, generator))

    return _walk(tree, choose_child)
