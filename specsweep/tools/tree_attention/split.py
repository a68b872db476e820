"""Prefix and tree attended apart, merged by log-sum-exp (the xformers tree-attention idea).

The prefix needs no mask, so it runs through a fused kernel that also returns each row's
log-sum-exp; the tree part is tiny (n x n) and takes the dense ancestor mask. Two partial
softmaxes over disjoint key sets combine exactly: each output is weighted by its share
exp(lse_part) / (exp(lse_prefix) + exp(lse_tree)).
"""

from __future__ import annotations

import math

import torch

from specsweep.core.tree import Tree
from specsweep.tools.tree_attention.layout import ancestor_mask

_CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: Tree, prefix_len: int) -> torch.Tensor:
    batch, q_heads, n, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    # Query heads sharing a kv head become extra query rows: exact (no per-head mask) and the
    # KV is never repeated. Head h uses kv head h // group, as in enable_gqa / repeat_kv.
    q_rows = q.reshape(batch, kv_heads, group * n, head_dim)
    tree_out, tree_lse = _tree_part(q_rows, k[:, :, prefix_len:], v[:, :, prefix_len:], tree, group)
    if prefix_len == 0:
        out = tree_out
    else:
        prefix_out, prefix_lse = attention_with_lse(q_rows, k[:, :, :prefix_len], v[:, :, :prefix_len])
        prefix_share = torch.sigmoid(prefix_lse.float() - tree_lse).unsqueeze(-1)
        out = torch.lerp(tree_out, prefix_out.float(), prefix_share)
    return out.to(q.dtype).reshape(batch, q_heads, n, head_dim)


def _tree_part(q_rows, k_tree, v_tree, tree: Tree, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of the query rows over the n tree keys, in float32; (out, lse)."""
    allowed = ancestor_mask(tree, q_rows.device).repeat(group, 1)
    scores = (q_rows.float() @ k_tree.float().transpose(-1, -2)) / math.sqrt(q_rows.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # every row sees itself, so it is finite
    return torch.exp(scores - lse.unsqueeze(-1)) @ v_tree.float(), lse


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention with equal head counts; returns (out [.., L, D], logsumexp [.., L]).

    Uses PyTorch's fused flash kernels, which compute the log-sum-exp anyway (ATen ops: SDPA's
    public API does not return it); other devices and dtypes fall back to plain matmuls.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    if q.device.type == "cuda" and q.dtype in _CUDA_FLASH_DTYPES and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out, lse
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse
