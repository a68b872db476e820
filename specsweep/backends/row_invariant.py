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
  together. Other tree rows gather their keys first, in whichever way takes fewer products:
  * by depth: rows that see equally many keys (the nodes of one depth) are done together, as a
    batch of the same per-row products a decode step makes (bushy trees: binary, k-ary, Medusa);
  * by chain (a node, its child, its grandchild...): one gather of the deepest node's keys serves
    the chain, and over them its rows see one unbroken run from the start each, as the rows of a
    chain verify do (deep, narrow trees: token recycling's branches). A recycling tree of two
    5-token branches after 350 tokens verifies in 54 ms by chain, 70 ms by depth (one token: 44 ms).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn


def _attend(query, key, value, mask, scaling, mask_from: int = 0):
    """query [B, Hq, n, D]; key, value [B, Hkv, L, D]; mask [B, 1, n, L] in the scores' dtype or
    None, all zeros before key ``mask_from`` -> [B, Hq, D, n]. The query heads sharing a KV head
    become extra rows (head h uses KV head h // groups, as repeat_kv does), so K and V are never
    copied."""
    b, hq, n, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = hq // hkv
    scores = torch.matmul(query.reshape(b, hkv, groups * n, d), key.transpose(2, 3))  # reduction over D: row-invariant
    if scaling != 1.0:
        scores = scores * scaling
    if mask is not None:  # adding the zeros before mask_from would change no score
        scores.view(b, hkv, groups, n, length)[..., mask_from:] += mask.unsqueeze(2)[..., mask_from:]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(value.transpose(2, 3), probs.transpose(2, 3))  # [B, Hkv, D, groups * n]
    return out.view(b, hkv, d, groups, n).transpose(2, 3).reshape(b, hq, d, n)  # [B, Hkv, groups, D, n]


def _gather_plan(mask: torch.Tensor, heads: int) -> tuple[int, list[tuple]]:
    """For a one-sequence additive mask [1, 1, n, L]: the first key some row does not see, and how
    to attend the tree rows whose keys are not one run from the start: groups of (rows, flat key
    rows of the [heads*L, D] view of K, and either the group's additive mask [1, 1, rows, keys] (a
    chain) or None with the keys per row (a depth)). Every layer of a forward gets the same mask
    object, so the plan is kept for it; no two forwards may therefore share one mask tensor
    (`GraphTarget` builds fresh inputs uncaptured)."""
    global _last_plan
    if _last_plan is not None and _last_plan[0]() is mask and _last_plan[1] == heads:
        return _last_plan[2]
    allowed = mask[0, 0] == 0  # [n, L]
    length = allowed.shape[-1]
    hidden = (~allowed).any(0).nonzero()
    mask_from = int(hidden[0]) if hidden.numel() else length
    seen = allowed.sum(-1)
    leading = torch.arange(length, device=allowed.device) < seen[:, None]
    gap_rows = (allowed != leading).any(-1).nonzero().flatten()
    plan = []
    if gap_rows.numel():
        gap_seen = seen[gap_rows]
        chains, depths = _chains(allowed[gap_rows], gap_seen), gap_seen.unique().tolist()
        offsets = torch.arange(heads, device=mask.device)[:, None] * length
        if len(chains) < len(depths):  # fewer gathers and products: deep, narrow trees
            for chain in chains:
                members = gap_rows[chain]
                keys = allowed[members[-1]].nonzero().flatten()  # the deepest row's keys, ascending
                visible = torch.arange(keys.numel(), device=mask.device) < seen[members][:, None]
                chain_mask = torch.zeros(visible.shape, dtype=mask.dtype, device=mask.device)
                chain_mask.masked_fill_(~visible, torch.finfo(mask.dtype).min)
                plan.append((members, (offsets + keys[None]).flatten(), chain_mask[None, None], None))
        else:  # bushy trees: the nodes of one depth see equally many keys
            for count in depths:
                rows = gap_rows[gap_seen == count]
                keys = allowed[rows].nonzero()[:, 1]  # ascending within each row, rows one after another
                plan.append((rows, (offsets + keys[None]).flatten(), None, count))
    _last_plan = (weakref.ref(mask), heads, (mask_from, plan))
    return mask_from, plan


_last_plan = None  # (the mask, heads, its plan) of the forward in progress


def _chains(allowed: torch.Tensor, seen: torch.Tensor) -> list[list[int]]:
    """Rows [g, L] of allowed keys (a tree's, in topological order) split into chains: a row, its
    child, its grandchild... Down a chain each row sees its parent's keys and its own, the last."""
    g, length = allowed.shape
    within = ~(allowed[None, :, :] & ~allowed[:, None, :]).any(-1)  # [i, j]: keys(j) within keys(i)
    last = torch.where(allowed, torch.arange(length, device=allowed.device), -1).max(-1).values
    parent_of = (within & (seen[None, :] == seen[:, None] - 1) & (last[None, :] < last[:, None])).tolist()
    chains: list[list[int]] = []
    chain_ending_at: dict[int, int] = {}
    for i in range(g):
        parent = next((j for j, is_parent in enumerate(parent_of[i]) if is_parent), None)
        chain = chain_ending_at.pop(parent, None) if parent is not None else None
        if chain is None:
            chain = len(chains)
            chains.append([])
        chains[chain].append(i)
        chain_ending_at[i] = chain
    return chains


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
    scores = torch.matmul(query.view(b, hkv, groups, g, d).transpose(2, 3), k.transpose(3, 4))
    if scaling != 1.0:
        scores = scores * scaling
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, Hkv, g, groups, c]
    out = torch.matmul(v.transpose(3, 4), probs.transpose(3, 4))  # [B, Hkv, g, D, groups]
    return out.permute(0, 1, 4, 3, 2).reshape(b, hq, d, g)


def _attend_chain(query, key, value, flat, chain_mask, scaling):
    """query [B, Hq, g, D]; ``flat``: the rows of K's [B*Hkv*L, D] view the chain's deepest row
    sees; ``chain_mask`` [1, 1, g, keys]: how many of them each row sees -> [B, Hq, D, g], each row
    as `_attend` computes a chain verify's rows."""
    b, hkv, _, d = key.shape
    k = key.reshape(-1, d).index_select(0, flat).view(b, hkv, -1, d)
    v = value.reshape(-1, d).index_select(0, flat).view(b, hkv, -1, d)
    return _attend(query, k, v, chain_mask, scaling)


def row_invariant_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query [B, Hq, n, D]; key/value [B, Hkv, L, D]; the mask is additive [B, 1, n, L] or None
    if math.frexp(scaling)[0] == 0.5:  # a power of two (1/8 for 64-dim heads): (q * s) @ K has the bits
        query, scaling = query * scaling, 1.0  # of (q @ K) * s, in n rows of D instead of n rows of L
    mask_from, plan = 0, []
    if attention_mask is not None and attention_mask.shape[0] == 1:  # the engine verifies one sequence
        mask_from, plan = _gather_plan(attention_mask, key.shape[0] * key.shape[1])
    out = _attend(query, key, value, attention_mask, scaling, mask_from)
    for rows, flat, chain_mask, count in plan:
        if chain_mask is None:
            out[:, :, :, rows] = _attend_gathered(query[:, :, rows], key, value, flat, count, scaling)
        else:
            out[:, :, :, rows] = _attend_chain(query[:, :, rows], key, value, flat, chain_mask, scaling)
    return out.permute(0, 3, 1, 2).contiguous(), None  # [B, n, Hq, D], as transformers expects


def register() -> None:
    """Make the functions above valid `attn_implementation` names (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("row_invariant", row_invariant_attention)
    AttentionMaskInterface.register("row_invariant", eager_mask)  # additive float masks, as eager
