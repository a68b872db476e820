"""Baseline: one attention call per root-to-leaf path, as if each path were its own sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specsweep.core.tree import Tree
from specsweep.tools.tree_attention.layout import path_plans


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: Tree, prefix_len: int) -> torch.Tensor:
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for plan in path_plans(tree, prefix_len, q.device):
        # Gathering prefix + path is the copy a batch of independent sequences would hold.
        path_out = F.scaled_dot_product_attention(
            q.index_select(2, plan.nodes),
            k.index_select(2, plan.keys),
            v.index_select(2, plan.keys),
            attn_mask=plan.causal,
            enable_gqa=gqa,
        )
        # Nodes shared by several paths get the same result each time.
        out.index_copy_(2, plan.nodes, path_out)
    return out
