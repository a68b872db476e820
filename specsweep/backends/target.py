"""The target's side of a decode step: prefill, score root + draft in one forward, keep the accepted KV.

Three implementations with one interface; `make_runner` picks one from the hardware profile:

* `DynamicTarget`: transformers' DynamicCache, which grows by concatenation and is cut back after
  verification. Works everywhere. (A cache growing in place, returning views of a doubling buffer,
  was tried on cpu-bf16: attention over the strided views cost what the concatenation saved.)
* `LeanTarget` (`hardware.lean_forward`, bf16 Llama on the CPU): its verify forwards as bare tensor
  operations with the HF forward's bits, over a cache of contiguous tensors that grow 64 positions
  at a time, the slots past the tokens masked (specsweep/backends/lean.py). The bare operations made a step
  16% faster; the cache another 9-13% in the engine (oneDNN kernels built once per 64 positions).
* `GraphTarget`: a StaticCache allocated once, and every verify forward of m tokens captured once as a
  CUDA graph and replayed. A 7B-sized target's one-token step is launch-bound in eager mode; replaying
  a graph removes the host's per-kernel cost (results/gpu_h100_2026-11-22: a 160M draft costs 0.57 of
  a 7B step eagerly, 0.16 with graphs). Each forward gets explicit positions and an additive mask over
  all cache slots, so stale slots past the accepted tokens are never seen and the graph needs no
  Python-side shapes. ``capture=False`` runs the same static-cache forwards eagerly (what the CPU
  tests check).

  With ``width`` (`hardware.verify_width`) every forward after the prefill holds exactly that many
  rows, the unused ones padded (their KV lands in slots no real row sees). GPU matmul and attention
  kernels are chosen by shape, so in bf16 a token scored in a 1-row step and in a 9-row verify can
  differ in the last bit and flip a near-tie; with one shape for every step, autoregressive and
  speculative decoding run the same kernels on every row and stay token for token equal. On an
  H100, padding to 32 rows made a 7B-shaped AR run 13% slower than unpadded graphs.

  With ``compile`` (`hardware.compile`) the verify forwards run through ``torch.compile`` (inductor
  fuses the elementwise work between the matmuls), captured as CUDA graphs when ``capture`` is on.
  The prefill stays eager: its length changes with every prompt. Without a fixed width the first
  forwards of new sizes recompile once with a dynamic row count (torch's automatic dynamic shapes).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, StaticCache

from specsweep.backends.cache import compact, move, set_write_position
from specsweep.backends.hardware import Hardware
from specsweep.backends.lean import BucketCache, LeanLlama
from specsweep.backends.row_invariant import plan_kwargs
from specsweep.core.tree import Tree, after_cache, attention_mask_4d, causal_block

CAPTURE_WARMUP = 3  # eager calls on a side stream before capture, as torch.cuda.graph's docs ask


def capture_graph(prepare, forward):
    """``forward()`` captured as a CUDA graph after warm-up calls on a side stream; ``prepare()``
    runs before each call (static inputs, the cache's write position). -> (graph, forward's output,
    whose memory belongs to the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            prepare()
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    prepare()
    with torch.cuda.graph(graph):
        output = forward()
    return graph, output


class HiddenTap:
    """The input of a model's output layer (its final hidden states) in the model's last forward,
    kept by a forward pre-hook: what drafts reading the target's hidden state get (`hidden()`).
    One per model (`hidden_tap`), however many runners it serves."""

    def __init__(self, model):
        self.last: torch.Tensor | None = None
        model.get_output_embeddings().register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self.last = args[0]


def hidden_tap(model) -> HiddenTap:
    if not hasattr(model, "hidden_tap"):
        model.hidden_tap = HiddenTap(model)
    return model.hidden_tap


def make_runner(model, hw: Hardware) -> DynamicTarget | LeanTarget | GraphTarget:
    """The runner a hardware profile asks for: a static cache for CUDA graphs or a fixed verify width,
    the lean forward for `hardware.lean_forward`."""
    if hw.cuda_graphs or hw.verify_width or hw.compile:
        return GraphTarget(model, capture=hw.cuda_graphs, width=hw.verify_width, compile=hw.compile)
    if hw.lean_forward:
        return LeanTarget(model)
    return DynamicTarget(model, hw.bool_masks)


class DynamicTarget:
    def __init__(self, model, bool_masks: bool = False):
        self.model, self.bool_masks = model, bool_masks
        self.tap = hidden_tap(model)

    def hidden(self) -> torch.Tensor:
        """The final hidden states [m, H] of the rows the last forward returned logits for."""
        return self.tap.last[0]

    def prefill(self, prompt_ids: torch.Tensor, room: int) -> torch.Tensor:
        """Fill a fresh cache with the prompt -> logits [V] after its last token. ``room``: the most
        tokens that will follow the prompt (unused here)."""
        self.cache = DynamicCache(config=self.model.config)
        return self.model(input_ids=prompt_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                          **plan_kwargs(self.model, cache_len=0)).logits[0, -1]

    def score(self, step_input: torch.Tensor, tree: Tree | None, cache_len: int) -> torch.Tensor:
        """One forward over root + draft [1, m] after ``cache_len`` cached tokens -> logits [m, V].
        ``tree`` None: a chain (the causal mask is the tree mask)."""
        if tree is None:
            return self.model(input_ids=step_input, past_key_values=self.cache, use_cache=True,
                              **plan_kwargs(self.model, cache_len=cache_len)).logits[0]
        device = step_input.device
        mask = tree.verify_mask(cache_len, self.model.dtype, device, as_bool=self.bool_masks)
        return self.model(input_ids=step_input, attention_mask=mask, position_ids=tree.verify_position_ids(cache_len, device),
                          past_key_values=self.cache, use_cache=True, **plan_kwargs(self.model, mask)).logits[0]

    def keep(self, start: int, positions: list[int]) -> None:
        """Keep the cache up to ``start`` and the entries at ``positions`` (ascending), moved to follow it."""
        compact(self.cache, start, positions)


class LeanTarget(DynamicTarget):
    """`DynamicTarget` whose verify forwards run `specsweep.backends.lean.LeanLlama` on a `BucketCache`: the
    same logits, bit for bit, in fewer calls. The prefill stays transformers' (its cost is once per
    prompt); its entries move into the bucket cache."""

    def __init__(self, model):
        super().__init__(model)
        self.forward = LeanLlama(model)

    def prefill(self, prompt_ids: torch.Tensor, room: int) -> torch.Tensor:
        logits = super().prefill(prompt_ids, room)
        self.cache, self.scored_by_lean = BucketCache(self.cache), False
        return logits

    def score(self, step_input: torch.Tensor, tree: Tree | None, cache_len: int) -> torch.Tensor:
        device = step_input.device
        if tree is None:
            positions = torch.arange(cache_len, cache_len + step_input.shape[1], device=device)[None]
        else:
            positions = tree.verify_position_ids(cache_len, device)
        self.scored_by_lean = True
        return self.forward(step_input, positions, tree, self.cache)

    def hidden(self) -> torch.Tensor:
        return self.forward.hidden[0] if self.scored_by_lean else super().hidden()

    def keep(self, start: int, positions: list[int]) -> None:
        self.cache.keep(start, positions)


class GraphTarget:
    def __init__(self, model, capture: bool = True, width: int | None = None, compile: bool = False):
        self.model, self.capture, self.width = model, capture, width
        self.step_model = torch.compile(model) if compile else model  # runs every forward after the prefill
        self.max_len = 0
        self.inputs: dict[int, dict] = {}  # m -> static inputs of m-row forwards (the graph's, when captured)
        self.graphs: dict[int, tuple] = {}  # m -> (graph, static logits, static final hidden states)
        self.tap = hidden_tap(model)
        self.last_hidden: torch.Tensor | None = None  # [1, rows, H] of the last forward
        # transformers releases before the cache tracked its own length take explicit cache positions
        self.explicit_positions = "cache_position" in inspect.signature(model.forward).parameters

    def prefill(self, prompt_ids: torch.Tensor, room: int) -> torch.Tensor:
        needed = prompt_ids.shape[1] + room + (self.width or 1)
        if needed > self.max_len:  # a new cache moves the buffers the graphs point at: capture again
            self.max_len = max(needed, 2 * self.max_len)
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            self.inputs.clear()
            self.graphs.clear()
        inputs = self._inputs(prompt_ids.shape[1])
        plan = self._fill(inputs, prompt_ids, None, 0)
        logits = self.model(**inputs, **plan, past_key_values=self.cache, logits_to_keep=1).logits[0, -1]
        self.last_hidden, self.rows = self.tap.last, 1
        return logits

    def score(self, step_input: torch.Tensor, tree: Tree | None, cache_len: int) -> torch.Tensor:
        m = step_input.shape[1]
        rows = self.width or m
        if m > rows:
            raise ValueError(f"a forward of {m} tokens exceeds hardware.verify_width={rows}")
        if rows not in self.inputs:
            self.inputs[rows] = self._inputs(rows)
        inputs = self.inputs[rows]
        if not self.capture:
            plan = self._fill(inputs, step_input, tree, cache_len)
            logits = self.step_model(**inputs, **plan, past_key_values=self.cache).logits[0, :m]
            self.last_hidden, self.rows = self.tap.last, m
            return logits
        if rows not in self.graphs:
            self.graphs[rows] = self._record(inputs, cache_len)
        graph, logits, self.last_hidden = self.graphs[rows]
        self._fill(inputs, step_input, tree, cache_len)
        graph.replay()
        self.rows = m
        return logits[0, :m]

    def hidden(self) -> torch.Tensor:
        """The final hidden states [m, H] of the last forward's real rows (a graph's own output buffer
        when replayed)."""
        return self.last_hidden[0, :self.rows]

    def keep(self, start: int, positions: list[int]) -> None:
        move(self.cache, start, positions)  # stale slots after them stay, masked out of later forwards

    def _inputs(self, m: int) -> dict:
        device = self.model.device
        inputs = {"input_ids": torch.zeros(1, m, dtype=torch.long, device=device),
                  "position_ids": torch.zeros(1, m, dtype=torch.long, device=device),
                  "attention_mask": torch.zeros(1, 1, m, self.max_len, dtype=self.model.dtype, device=device),
                  "use_cache": True}
        if self.explicit_positions:
            inputs["cache_position"] = torch.zeros(m, dtype=torch.long, device=device)
        return inputs

    def _fill(self, inputs: dict, ids: torch.Tensor, tree: Tree | None, cache_len: int) -> dict:
        """Copy this forward's tokens, positions and mask into the static inputs (rows past the m
        tokens of ``ids`` are padding: each sees the cache and itself); point the cache's write
        position at ``cache_len`` -> the keyword arguments that give the attention its plan of the
        mask (none unless it is row_invariant; a captured graph replays without them, as
        cuda_graphs and compile take sdpa or eager attention only)."""
        m, rows = ids.shape[1], inputs["input_ids"].shape[1]
        block = torch.eye(rows, dtype=torch.bool)
        positions = torch.arange(cache_len, cache_len + rows)
        if tree is None:
            block[:m, :m] = causal_block(m)
        else:
            block[:m, :m] = tree.verify_block()
            positions[:m] = tree.verify_position_ids(cache_len)[0]
        inputs["input_ids"][:, m:] = 0
        inputs["input_ids"][:, :m] = ids
        inputs["position_ids"].copy_(positions[None])
        inputs["attention_mask"].copy_(attention_mask_4d(after_cache(block, cache_len, self.max_len), self.model.dtype))
        if self.explicit_positions:
            inputs["cache_position"].copy_(torch.arange(cache_len, cache_len + rows))
        set_write_position(self.cache, cache_len)
        return plan_kwargs(self.model, inputs["attention_mask"])

    def _record(self, inputs: dict, cache_len: int) -> tuple:
        """The CUDA graph that replays a forward of the static ``inputs``' rows, its logits and its
        final hidden states (the output layer's input the capture saw: graph memory, rewritten by each
        replay). Warm-up and capture write into slots from ``cache_len`` on; the real forward rewrites them."""
        m = inputs["input_ids"].shape[1]
        dummy = torch.zeros(1, m, dtype=torch.long, device=self.model.device)
        graph, logits = capture_graph(lambda: self._fill(inputs, dummy, None, cache_len),
                                      lambda: self.step_model(**inputs, past_key_values=self.cache).logits)
        return graph, logits, self.tap.last
