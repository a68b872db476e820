"""One scaled_dot_product_attention call over all nodes with the tree's bool mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specsweep.core.tree import Tree
from specsweep.tools.tree_attention.layout import tree_mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: Tree, prefix_len: int) -> torch.Tensor:
    mask = tree_mask(tree, prefix_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
