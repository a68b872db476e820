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
Which rows go which way is read off the mask once per forward, where the mask is built, and handed
to every layer with the forward (`AttentionPlan`); nothing is kept between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from specsweep.core.tree import attention_mask_4d


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


PLAN_KEYWORD = "row_invariant_plan"  # the forward's keyword argument that carries the plan to every layer


@dataclass(frozen=True)
class AttentionPlan:
    """How `row_invariant_attention` attends the rows of one forward, worked out from its mask.

    Every layer of a forward attends with the same mask, so whoever builds the mask (the runners in
    `specsweep.backends.target`, the lean forward) computes the plan once (`plan_for`, or
    `causal_plan` for transformers' own causal mask) and passes it with the forward: a model's
    keyword ``row_invariant_plan=`` reaches every layer's attention call (`plan_kwargs`). Without
    one the attention function works it out on each call: the same bits, more work.

    ``mask_from``: the first key some row does not see (the mask is all zeros before it).
    ``groups``: the tree rows whose keys are not one run from the start, as (rows, flat key rows of
    the [heads*length, D] view of K, and either the group's additive mask [1, 1, rows, keys] (a
    chain) or None with the keys per row (a depth)); ``heads`` (batch x KV heads) and ``length``
    (keys) are the shape the flat rows index.
    """

    mask_from: int
    groups: tuple[tuple, ...] = ()
    heads: int | None = None
    length: int | None = None


def plan_for(mask: torch.Tensor, heads: int) -> AttentionPlan:
    """The plan for a one-sequence additive mask [1, 1, n, L] over K of ``heads`` (batch x KV heads) heads."""
    allowed = mask[0, 0] == 0  # [n, L]
    length = allowed.shape[-1]
    hidden = (~allowed).any(0).nonzero()
    mask_from = int(hidden[0]) if hidden.numel() else length
    seen = allowed.sum(-1)
    leading = torch.arange(length, device=allowed.device) < seen[:, None]
    gap_rows = (allowed != leading).any(-1).nonzero().flatten()
    groups = []
    if gap_rows.numel():
        gap_seen = seen[gap_rows]
        chains, depths = _chains(allowed[gap_rows], gap_seen), gap_seen.unique().tolist()
        offsets = torch.arange(heads, device=mask.device)[:, None] * length
        if len(chains) < len(depths):  # fewer gathers and products: deep, narrow trees
            for chain in chains:
                members = gap_rows[chain]
                keys = allowed[members[-1]].nonzero().flatten()  # the deepest row's keys, ascending
                visible = torch.arange(keys.numel(), device=mask.device) < seen[members][:, None]
                chain_mask = attention_mask_4d(visible, mask.dtype, mask.device)
                groups.append((members, (offsets + keys[None]).flatten(), chain_mask, None))
        else:  # bushy trees: the nodes of one depth see equally many keys
            for count in depths:
                rows = gap_rows[gap_seen == count]
                keys = allowed[rows].nonzero()[:, 1]  # ascending within each row, rows one after another
                groups.append((rows, (offsets + keys[None]).flatten(), None, count))
    return AttentionPlan(mask_from, tuple(groups), heads, length)


def causal_plan(cache_len: int) -> AttentionPlan:
    """The plan for a causal mask over the new rows after ``cache_len`` cached keys (a prefill, a
    chain verify; keys past the last new one, stale slots, may be hidden too): row 0 sees the keys
    up to ``cache_len`` and no row has a gap."""
    return AttentionPlan(cache_len + 1)


def plan_kwargs(model, mask: torch.Tensor | None = None, *, cache_len: int | None = None) -> dict:
    """The keyword arguments that give ``model``'s attention calls one forward's plan: the plan of
    ``mask`` (the additive [1, 1, n, L] mask the forward is given), or, with ``cache_len`` instead,
    of the causal mask transformers builds itself after that many cached tokens. None where the
    model's attention is not row_invariant (or the mask holds more than one sequence)."""
    if model.config._attn_implementation != "row_invariant":
        return {}
    if mask is None:
        return {PLAN_KEYWORD: causal_plan(cache_len)}
    if mask.shape[0] != 1:
        return {}
    return {PLAN_KEYWORD: plan_for(mask, model.config.num_key_value_heads)}


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


def row_invariant_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                            row_invariant_plan: AttentionPlan | None = None, **kwargs):
    # query [B, Hq, n, D]; key/value [B, Hkv, L, D]; the mask is additive [B, 1, n, L] or None;
    # ``row_invariant_plan``: the forward's `AttentionPlan` for this mask, if its caller made one
    if math.frexp(scaling)[0] == 0.5:  # a power of two (1/8 for 64-dim heads): (q * s) @ K has the bits
        query, scaling = query * scaling, 1.0  # of (q @ K) * s, in n rows of D instead of n rows of L
    heads, length = key.shape[0] * key.shape[1], key.shape[2]
    plan = row_invariant_plan
    if plan is None:
        one_sequence = attention_mask is not None and attention_mask.shape[0] == 1  # the engine verifies one
        plan = plan_for(attention_mask, heads) if one_sequence else AttentionPlan(0)
    elif plan.groups and (plan.heads, plan.length) != (heads, length):
        raise ValueError(f"a row_invariant plan for {plan.heads} heads x {plan.length} keys, "
                         f"given to an attention over {heads} x {length}")
    out = _attend(query, key, value, attention_mask, scaling, plan.mask_from)
    for rows, flat, chain_mask, count in plan.groups:
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
