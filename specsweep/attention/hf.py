"""Attention functions registered with transformers, selected by `hardware.attn_implementation`.

* ``row_invariant``: eager attention (bf16 matmuls, fp32 softmax) whose output rows have the same
  bits whatever the number of query rows in the forward. With it, verifying n draft tokens in one
  forward gives each token exactly the logits a one-token decode step would, which makes greedy
  speculative decoding token-for-token identical to autoregressive decoding in bf16 too. The CPU
  sdpa kernel and eager's ``probs @ V`` are not: their reduction over the keys is blocked
  differently for different numbers of rows, so a row's last bit can depend on its neighbours.
  Computing ``(V^T @ probs^T)^T`` instead keeps the rows in the matmul's N dimension, which
  the CPU kernels do not split the reduction over (tests/test_bf16.py checks it bit for bit).
  Keys a row does not see must also stay out of its reduction, not merely be zeroed: a tree node
  sees the prefix and its ancestors, which a one-token decode of its path sees contiguously.
  Rows that see a contiguous run of keys from the start (a decode step, a chain) are done
  together. Other tree rows gather their keys first; rows that see equally many keys (the nodes
  of one depth) are done together, as a batch of the same per-row products a decode step makes.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


def _attend(query, key, value, mask, scaling):
    """query [B, Hq, n, D]; key, value [B, Hkv, L, D]; mask [B, 1, n, L] or None -> [B, Hq, D, n].
    The query heads sharing a KV head become extra rows (head h uses KV head h // groups, as
    repeat_kv does), so K and V are never copied."""
    b, hq, n, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = hq // hkv
    scores = torch.matmul(query.reshape(b, hkv, groups * n, d), key.transpose(2, 3)) * scaling
    if mask is not None:  # reduction over D above: row-invariant
        scores = (scores.view(b, hkv, groups, n, length) + mask.unsqueeze(2)).view(b, hkv, groups * n, length)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(value.transpose(2, 3), probs.transpose(2, 3))  # [B, Hkv, D, groups * n]
    return out.view(b, hkv, d, groups, n).transpose(2, 3).reshape(b, hq, d, n)  # [B, Hkv, groups, D, n]


def _gap_groups(mask: torch.Tensor, heads: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """For a one-sequence additive mask [1, 1, n, L]: the tree rows whose keys are not one run from
    the start, grouped by how many keys they see, as (rows, flat key rows of the [heads*L, D] view of
    K, count). Every layer of a forward gets the same mask object, so the analysis is kept for it."""
    global _last_groups
    if _last_groups is not None and _last_groups[0]() is mask and _last_groups[1] == heads:
        return _last_groups[2]
    allowed = mask[0, 0] == 0  # [n, L]
    length = allowed.shape[-1]
    seen = allowed.sum(-1)
    leading = torch.arange(length, device=allowed.device) < seen[:, None]
    gaps = (allowed != leading).any(-1)
    groups = []
    for count in seen[gaps].unique().tolist():
        rows = (gaps & (seen == count)).nonzero().flatten()
        keys = allowed[rows].nonzero()[:, 1]  # ascending within each row, rows one after another
        flat = (torch.arange(heads, device=keys.device)[:, None] * length + keys[None]).flatten()
        groups.append((rows, flat, count))
    _last_groups = (weakref.ref(mask), heads, groups)
    return groups


_last_groups = None  # (the mask, heads, its groups) of the forward in progress


def _attend_gathered(query, key, value, flat, count, scaling):
    """query [B, Hq, g, D]; ``flat``: the rows of K's [B*Hkv*L, D] view each of the g rows sees,
    ``count`` per row -> [B, Hq, D, g]. Row r computes exactly what `_attend` does for that row alone
    over its keys: the same matmul shapes, batched over the rows. (One row copy per head and key is
    about 5x faster than index_select on the key dimension.)"""
    b, hq, g, d = query.shape
    hkv, c = key.shape[1], count
    groups = hq // hkv
    k = key.reshape(-1, d).index_select(0, flat).view(b, hkv, g, c, d)
    v = value.reshape(-1, d).index_select(0, flat).view(b, hkv, g, c, d)
    scores = torch.matmul(query.view(b, hkv, groups, g, d).transpose(2, 3), k.transpose(3, 4)) * scaling
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, Hkv, g, groups, c]
    out = torch.matmul(v.transpose(3, 4), probs.transpose(3, 4))  # [B, Hkv, g, D, groups]
    return out.permute(0, 1, 4, 3, 2).reshape(b, hq, d, g)


def row_invariant_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query [B, Hq, n, D]; key/value [B, Hkv, L, D]; the mask is additive [B, 1, n, L] or None
    out = _attend(query, key, value, attention_mask, scaling)
    if attention_mask is not None and attention_mask.shape[0] == 1:  # the engine verifies one sequence
        for rows, flat, count in _gap_groups(attention_mask, key.shape[0] * key.shape[1]):
            out[:, :, :, rows] = _attend_gathered(query[:, :, rows], key, value, flat, count, scaling)
    return out.permute(0, 3, 1, 2).contiguous(), None  # [B, n, Hq, D], as transformers expects


def register() -> None:
    """Make the functions above valid `attn_implementation` names (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("row_invariant", row_invariant_attention)
    AttentionMaskInterface.register("row_invariant", eager_mask)  # additive float masks, as eager
