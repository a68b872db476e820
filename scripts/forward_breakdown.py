"""Where one bf16 forward of the embedded target goes, module by module, as `hardware=cpu-bf16` runs
it (row_invariant attention, prepacked linears), 1 thread, after 350 cached tokens; 1 and 6 rows.

    python results/cpu_costs/forward_breakdown.py

Each module's forward is wrapped with a clock (about 1 us each), so the parts add up to a little
more than a bare forward. Also prints the bytes of the weights each part streams per forward.
"""
import collections
import time
from pathlib import Path

import torch
import transformers.models.llama.modeling_llama as llama
from transformers import AttentionInterface, DynamicCache

from specsweep.app import models
from specsweep.backends import hardware, row_invariant
from specsweep.backends.cache import truncate

torch.set_num_threads(1)
model_dir = models.resolve_model_dir("embedded:smollm2-135m-instruct", "target.path", Path.home() / ".cache" / "specsweep")
model = models.load_model(model_dir, hardware.Hardware(torch.device("cpu"), torch.bfloat16, "row_invariant", prepack_linear=True))
spent = collections.Counter()


def clocked(name, forward):
    def run(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        spent[name] += time.perf_counter() - start
        return out
    return run


llama.create_causal_mask = clocked("mask", llama.create_causal_mask)
for layer in model.model.layers:
    layer.self_attn.forward = clocked("attention block", layer.self_attn.forward)
    layer.mlp.forward = clocked("MLP", layer.mlp.forward)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.forward = clocked("RMSNorm", norm.forward)
    layer.forward = clocked("decoder layers", layer.forward)
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
        proj.forward = clocked("q/k/v/o projections", proj.forward)
model.lm_head.forward = clocked("lm_head", model.lm_head.forward)
AttentionInterface.register("row_invariant", clocked("attention function", row_invariant.row_invariant_attention))

c = model.config  # bf16 weights each part streams per forward, in MB
kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
streamed = {"MLP": 3 * c.hidden_size * c.intermediate_size * 2 * c.num_hidden_layers / 1e6,
            "q/k/v/o projections": 2 * c.hidden_size * (c.hidden_size + kv) * 2 * c.num_hidden_layers / 1e6,
            "lm_head": c.vocab_size * c.hidden_size * 2 / 1e6}
prefix, repeats = 350, 20
with torch.inference_mode():
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.randint(1000, (1, prefix)), past_key_values=cache)
    for rows in (1, 6, 16):
        ids = torch.randint(1000, (1, rows))
        for _ in range(5):
            model(input_ids=ids, past_key_values=cache)
            truncate(cache, prefix)
        spent.clear()
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, past_key_values=cache)
            truncate(cache, prefix)
        total = (time.perf_counter() - start) / repeats * 1e3
        print(f"{rows} rows: {total:.2f} ms per forward")
        for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
            ms = seconds / repeats * 1e3
            rate = f", {streamed[name]:.0f} MB of weights at {streamed[name] / ms:.1f} GB/s" if name in streamed else ""
            print(f"  {name:22s} {ms:6.2f} ms{rate}")
