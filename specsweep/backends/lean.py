"""The Llama forward of a verify step as bare tensor operations: the HF forward's bits, fewer calls.

On this repo's CPU a one-token bf16 step of the embedded target streams 27 ms of weights, yet took
42 ms through transformers: the rest is per-call work around tiny products (module calls, argument
plumbing, mask building, and three products per attention and two per MLP where one would do). This
forward makes the same arithmetic in fewer calls:

* q/k/v and gate/up each become one oneDNN product over the concatenated weights. A product's output
  column is one dot product over the input, whatever the other columns; tests/test_lean.py checks
  the fused products give the separate ones' bits;
* RoPE rotates q and k together (elementwise, so the same bits);
* no module calls, hooks or keyword plumbing; the mask is built directly;
* the KV cache (`BucketCache`) is written in place and grows 64 positions at a time, so the
  attention products keep their shapes for many steps: oneDNN builds a kernel per new shape, which
  a length growing every step paid on every step. In the engine on HumanEval 124..129: a one-token
  step 41.6 -> 37.5 ms, a 32-token verify 68.9 -> 60.0 ms.

Every other operation is the one transformers' Llama runs, in the same order and dtype, so the
logits are the HF forward's bits (tests/test_lean.py, torch.equal). Only verify forwards use it
(`target.LeanTarget`); the prefill stays transformers'. One-token step of the embedded target, 1
thread, 350 cached tokens: 42.1 ms -> 35.4 ms; 16 tokens 50.1 -> 44.0 ms.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from specsweep.backends.cache import move_entries
from specsweep.backends.prepack import pack_weight, packed_linear, row_block_for
from specsweep.backends.row_invariant import PLAN_KEYWORD, causal_plan, plan_for
from specsweep.core.tree import Tree, after_cache, attention_mask_4d, causal_block
from specsweep.errors import SpecsweepError

BUCKET = 64  # cache positions per allocation (see BucketCache)


class _Product:
    """The linears' weights concatenated and packed for oneDNN (a prepacked single linear's own
    copy), with the row block of that shape (`specsweep.backends.prepack.row_block_for`)."""

    def __init__(self, linears: tuple[nn.Linear, ...], row_block: int | str, max_rows: int | None):
        packed = [getattr(linear, "packed_weight", None) for linear in linears]  # specsweep.backends.prepack's copies
        if len(linears) == 1 and packed[0] is not None:  # the HF forward's own product
            self.weight, self.row_block = packed[0], linears[0].row_block
            return
        dense = [p.to_dense() if p is not None else linear.weight for p, linear in zip(packed, linears)]
        self.weight = pack_weight(torch.cat(dense))
        shape = (linears[0].in_features, sum(linear.out_features for linear in linears))
        self.row_block = row_block_for(self.weight, *shape, row_block, max_rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.row_block)


def check_model(model) -> None:
    """The forward below is Llama's: refuse models whose forward differs from it."""
    config = model.config
    reasons = []
    if config.model_type != "llama":
        reasons.append(f"model_type is {config.model_type!r}, not 'llama'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        reasons.append("its linears have biases")
    if config.hidden_act != "silu":
        reasons.append(f"hidden_act is {config.hidden_act!r}")
    if getattr(config, "pretraining_tp", 1) != 1:
        reasons.append("pretraining_tp > 1")
    if config._attn_implementation != "row_invariant":  # see BucketCache
        reasons.append(f"its attention is {config._attn_implementation!r}, not 'row_invariant'")
    if model.dtype != torch.bfloat16 or model.device.type != "cpu":
        reasons.append(f"it runs in {model.dtype} on {model.device.type}, not bfloat16 on the CPU")
    if reasons:
        raise SpecsweepError("hardware.lean_forward=true reproduces the bf16 Llama forward on the CPU only; "
                             f"this target: {'; '.join(reasons)} (set hardware.lean_forward=false)")


class LeanLlama:
    """``model``'s verify forward (a loaded transformers Llama, its linears prepacked or not; fused
    products take row blocks as its prepacking did, `specsweep.backends.prepack`)."""

    def __init__(self, model):
        check_model(model)
        row_block, max_rows = getattr(model, "row_blocking", (1, None))
        self.model = model
        self.attend = ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, eager_attention_forward)
        self.layers = []

        def product(*linears):
            return _Product(linears, row_block, max_rows)

        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, product(attn.q_proj, attn.k_proj, attn.v_proj), attn,
                                product(attn.o_proj), layer.post_attention_layernorm,
                                product(mlp.gate_proj, mlp.up_proj), product(mlp.down_proj)))
        self.lm_head = product(model.lm_head)
        first, config = model.model.layers[0].self_attn, model.config
        self.head_dim, self.scaling = first.head_dim, first.scaling
        self.q_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.intermediate = config.intermediate_size
        self.hidden: torch.Tensor | None = None  # the last forward's final hidden states (the output layer's input)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree: Tree | None,
                 cache: BucketCache) -> torch.Tensor:
        """input_ids, position_ids [1, n]: root + draft, ``tree`` its shape (None: a chain, causal).
        Appends the n tokens' KV to ``cache`` -> logits [n, V]."""
        n, d, cached = input_ids.shape[1], self.head_dim, cache.length
        cache.reserve(cached + n)
        # the cache, then root + draft as `tree` has them; the keys past cached + n are stale slots: hidden
        block = causal_block(n) if tree is None else tree.verify_block()
        mask = attention_mask_4d(after_cache(block, cached, cache.capacity), self.model.dtype, input_ids.device)
        plan = {PLAN_KEYWORD: causal_plan(cached) if tree is None else plan_for(mask, self.kv_heads)}  # once per forward
        x = self.model.model.embed_tokens(input_ids)
        cos, sin = self.model.model.rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        qk_width, half = (self.q_heads + self.kv_heads) * d, d // 2
        for index, (norm1, qkv_w, attn, o_w, norm2, gate_up_w, down_w) in enumerate(self.layers):
            qkv = qkv_w(_rms_norm(x, norm1))
            qk = qkv[..., :qk_width].view(1, n, -1, d).transpose(1, 2)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin  # apply_rotary_pos_emb
            key, value = cache.keys[index], cache.values[index]
            key[:, :, cached:cached + n] = qk[:, self.q_heads:]
            value[:, :, cached:cached + n] = qkv[..., qk_width:].view(1, n, -1, d).transpose(1, 2)
            out, _ = self.attend(attn, qk[:, :self.q_heads], key, value, mask, dropout=0.0, scaling=self.scaling, **plan)
            x = x + o_w(out.reshape(1, n, -1))
            gate_up = gate_up_w(_rms_norm(x, norm2))
            gate, up = gate_up[..., :self.intermediate], gate_up[..., self.intermediate:]
            x = x + down_w(nn.functional.silu(gate) * up)
        cache.length = cached + n
        self.hidden = _rms_norm(x, self.model.model.norm)  # [1, n, H]: what drafts reading it get
        return self.lm_head(self.hidden)[0]


class BucketCache:
    """The lean forward's KV cache: keys and values of all layers, [layers, 1, kv_heads, capacity,
    head_dim], the capacity a multiple of `BUCKET` positions. A forward writes its entries in place
    and attends over the whole capacity, the slots past its tokens masked out. So the tensors are
    re-allocated once per `BUCKET` positions, not once per step (transformers' DynamicCache
    concatenates), and the attention products keep one shape for the steps of a bucket: oneDNN
    builds a kernel for each new shape (3 ms for P @ V after 330 tokens on this repo's CPU), which a
    length growing by a few tokens per step met on every step. Masked trailing keys leave a row's
    bits as they are (the premise of row_invariant attention; tests/test_lean.py checks it)."""

    def __init__(self, prefill: DynamicCache):
        layers = prefill.layers
        self.length = prefill.get_seq_length()
        self.keys, self.values = (_grown(torch.stack([getattr(layer, kind) for layer in layers]), self.length)
                                  for kind in ("keys", "values"))

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions."""
        if length > self.capacity:
            self.keys, self.values = _grown(self.keys, length), _grown(self.values, length)

    def keep(self, start: int, positions: list[int]) -> None:
        """Keep the first ``start`` positions and the entries at ``positions`` (ascending), moved to follow them."""
        move_entries([self.keys, self.values], start, positions)
        self.length = start + len(positions)


def _grown(entries: torch.Tensor, length: int) -> torch.Tensor:
    """``entries`` [..., L, D] in a zeroed tensor of ``length`` positions rounded up to `BUCKET`
    (masked keys must be finite: 0 * inf would spoil the products)."""
    grown = entries.new_zeros(*entries.shape[:-2], -(-length // BUCKET) * BUCKET, entries.shape[-1])
    grown[..., :entries.shape[-2], :] = entries
    return grown


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """LlamaRMSNorm's forward, op for op."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)
