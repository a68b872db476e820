"""Cost of a verify step on real model shapes, and the speculative-decoding speedups it predicts.

A verify step is one target forward over n new tokens (a chain) on top of a KV cache of P prefix
tokens. It is timed for n = 1..max_tokens on random-weight Llama models (timing depends only on
shapes), in up to four modes: ``eager`` (a DynamicCache, Python dispatch included), ``graph`` (a
StaticCache, the forward captured once per n as a CUDA graph and replayed), ``compile`` (the
static-cache forward through torch.compile) and ``compile-graph`` (compiled, then captured). From the medians come
the verify-cost curve t(n)/t(1), the cost coefficient c = t_draft(1)/t_target(1) of Leviathan et al.
(2023), and predicted speedups for gamma drafted tokens with i.i.d. acceptance rate alpha.

    python -m specsweep.tools.costs --models llama2-7b llama2-13b llama-160m --modes eager graph compile compile-graph
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import inspect
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

from specsweep.app.results import environment, machine_info
from specsweep.backends.cache import set_write_position, truncate
from specsweep.backends.hardware import DTYPES, STATIC_CACHE_ATTENTION
from specsweep.backends.prepack import check_supported, prepack_linears
from specsweep.backends.row_invariant import plan_kwargs
from specsweep.backends.row_invariant import register as register_attention
from specsweep.backends.target import capture_graph
from specsweep.core import stats
from specsweep.core.stats import expected_tokens
from specsweep.core.tree import after_cache, attention_mask_4d, causal_block
from specsweep.errors import SpecsweepError
from specsweep.tools.tree_attention.timing import measure

MODELS = {  # the shapes of the seeds' targets and drafts; "tiny" is for tests
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-160m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),  # the embedded model
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048),
}
DRAFT, TARGETS = "llama-160m", ("llama2-7b", "llama2-13b")  # the seeds' pairs (same tokenizer)
MAX_GAMMA = 8
TABLE_NS = (1, 8, 16, 32, 64)
console = Console(width=None if sys.stdout.isatty() else 160)


def random_llama(shape: dict, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """A Llama of LlamaConfig fields ``shape`` with random weights (timing depends only on shapes),
    allocated and initialised directly on ``device`` in ``dtype``."""
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def step_inputs(model, start: int, n: int, kv_len: int, device: torch.device) -> dict:
    """Inputs for n chained tokens at positions start..start+n-1, attending over ``kv_len`` cache
    columns: an explicit additive 4D mask (as tree verification needs; it also masks a static
    cache's unused slots) and explicit positions, so no forward reads the cache length back; with
    row_invariant attention, the mask's plan (worked out here, untimed)."""
    rows = torch.arange(start, start + n, device=device)
    mask = attention_mask_4d(after_cache(causal_block(n), start, kv_len), model.dtype, device)
    inputs = {"input_ids": torch.randint(model.config.vocab_size, (1, n), device=device),
              "position_ids": rows[None], "attention_mask": mask, "use_cache": True, **plan_kwargs(model, mask)}
    if "cache_position" in inspect.signature(model.forward).parameters:  # older transformers 5.x ask for it
        inputs["cache_position"] = rows
    return inputs


def time_eager(model, prefix: int, ns: list[int], device, args) -> dict[int, list[float]]:
    cache = DynamicCache(config=model.config)
    model(**step_inputs(model, 0, prefix, prefix, device), past_key_values=cache)
    reset = functools.partial(truncate, cache, prefix)  # crop the n appended tokens off again
    return {n: measure(functools.partial(model, **step_inputs(model, prefix, n, prefix + n, device),
                                         past_key_values=cache), device, args.warmup, args.repeats, reset=reset)
            for n in ns}


def time_static(model, prefix: int, ns: list[int], device, args, step_model=None, capture: bool = True
                ) -> dict[int, list[float]]:
    """Forwards over a StaticCache: ``step_model`` (default ``model``; a compiled one for the compile
    modes) runs the n-token steps, replayed as CUDA graphs with ``capture``. The prefill is eager."""
    step_model = model if step_model is None else step_model
    max_len = prefix + max(ns) + 16
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    model(**step_inputs(model, 0, prefix, max_len, device), past_key_values=cache)
    rewind = functools.partial(set_write_position, cache, prefix)
    times = {}
    for n in ns:
        # Each call rewrites slots prefix..prefix+n-1 with the same keys and values: fine for timing.
        forward = functools.partial(step_model, **step_inputs(model, prefix, n, max_len, device), past_key_values=cache)
        if not capture:
            times[n] = measure(forward, device, args.warmup, args.repeats, reset=rewind)
            continue
        graph, static_out = capture_graph(rewind, forward)  # the output is kept until the graph goes
        rewind()
        times[n] = measure(graph.replay, device, args.warmup, args.repeats, reset=rewind)
        del graph, static_out
    return times


# mode -> (compiled with torch.compile, captured as CUDA graphs); eager runs a DynamicCache instead
STATIC_MODES = {"graph": (False, True), "compile": (True, False), "compile-graph": (True, True)}


def any_compiled(modes: list[str]) -> bool:
    return any(STATIC_MODES.get(mode, (False, False))[0] for mode in modes)


def predicted_speedup(alpha: float, gamma: int, c: float, verify_ratio: float) -> float:
    """Leviathan et al.'s E / (gamma c + 1), with the measured t(gamma+1)/t(1) in place of the 1."""
    return stats.predicted_speedup(alpha, gamma, gamma * c + verify_ratio)


def derive(rows: list[dict], alphas: list[float]) -> tuple[list[dict], list[dict], list[dict]]:
    """(coefficients, predictions, best gamma per alpha) from the timing rows."""
    t = {(r["model"], r["mode"], r["dtype"], r["prefix"], r["n"]): r["median_ms"] for r in rows}
    curves = sorted({k[:4] for k in t})
    coefficients = [{"draft": DRAFT, "target": tgt, "mode": mode, "dtype": dt, "prefix": p,
                     "c": t[(DRAFT, mode, dt, p, 1)] / t[(tgt, mode, dt, p, 1)]}
                    for (tgt, mode, dt, p) in curves if tgt in TARGETS and (DRAFT, mode, dt, p, 1) in t]
    predictions = []
    for model, mode, dt, p in curves:
        if model == DRAFT:
            continue
        drafts = [("free", 0.0)] + [(DRAFT, k["c"]) for k in coefficients if (k["target"], k["mode"], k["dtype"],
                                                                               k["prefix"]) == (model, mode, dt, p)]
        for draft, c in drafts:
            for alpha in alphas:
                for gamma in range(1, MAX_GAMMA + 1):
                    if (model, mode, dt, p, gamma + 1) not in t:
                        break
                    ratio = t[(model, mode, dt, p, gamma + 1)] / t[(model, mode, dt, p, 1)]
                    predictions.append({"target": model, "mode": mode, "dtype": dt, "prefix": p, "draft": draft,
                                        "c": c, "alpha": alpha, "gamma": gamma, "verify_ratio": ratio,
                                        "expected_tokens": expected_tokens(alpha, gamma),
                                        "step_cost": gamma * c + ratio,
                                        "speedup": predicted_speedup(alpha, gamma, c, ratio)})
    best = {}
    for pred in predictions:
        key = tuple(pred[k] for k in ("target", "mode", "dtype", "prefix", "draft", "alpha"))
        if key not in best or pred["speedup"] > best[key]["speedup"]:
            best[key] = pred
    return coefficients, predictions, list(best.values())


def machine(device: torch.device) -> dict:
    """``specsweep.app.results.machine_info()`` (CPU model, ISA flags, ONEDNN_MAX_CPU_ISA, threads, GPU, fingerprint)
    plus the device these timings ran on."""
    info = machine_info()
    info.update({"host": platform.node(), "python": platform.python_version(), "cuda": torch.version.cuda,
                 "transformers": transformers.__version__, "device": str(device)})
    info["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu_model"]
    return info


def show(rows: list[dict], coefficients: list[dict], best: list[dict], alphas: list[float]) -> None:
    ns = sorted({r["n"] for r in rows})
    cols = [n for n in TABLE_NS if n in ns] or ns[:5]
    table = Table(title="verify step: median ms (t(n)/t(1))")
    for name in ("model", "mode", "dtype", "prefix", *(f"t({n})" for n in cols)):
        table.add_column(name, justify="right")
    by_curve = {}
    for r in rows:
        by_curve.setdefault((r["model"], r["mode"], r["dtype"], r["prefix"]), {})[r["n"]] = r
    for key, curve in by_curve.items():
        table.add_row(*map(str, key), *(f"{curve[n]['median_ms']:.3f} ({curve[n]['ratio']:.2f}x)" for n in cols))
    console.print(table)
    for k in coefficients:
        console.print(f"c({k['draft']} / {k['target']}, {k['mode']}, {k['dtype']}, P={k['prefix']}) = {k['c']:.4f}")
    table = Table(title="predicted speedup: best gamma per alpha")
    for name in ("target", "mode", "prefix", "draft", "c", *(f"alpha={a:g}" for a in alphas)):
        table.add_column(name, justify="right")
    cells = {}
    for b in best:
        key = (b["target"], b["mode"], str(b["prefix"]), b["draft"], f"{b['c']:.4f}")
        cells.setdefault(key, {})[b["alpha"]] = f"g={b['gamma']}: {b['speedup']:.2f}x"
    for key, by_alpha in cells.items():
        table.add_row(*key, *(by_alpha.get(a, "-") for a in alphas))
    console.print(table)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = sorted({(r["model"], r["mode"], r["dtype"], r["prefix"]) for r in rows})
    for key in curves:
        pts = sorted((r["n"], r["ratio"]) for r in rows if (r["model"], r["mode"], r["dtype"], r["prefix"]) == key)
        ax.plot(*zip(*pts), marker=".", label=f"{key[0]} {key[1]} P={key[3]}")
    ax.set(xlabel="tokens verified in one forward (n)", ylabel="t(n) / t(1)", title="verify-step cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m specsweep.tools.costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["llama2-7b", "llama2-13b", DRAFT])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--prefix", nargs="+", type=int, default=[512], help="KV-cache lengths P")
    parser.add_argument("--max-tokens", type=int, default=64, help="time n = 1..this")
    parser.add_argument("--modes", nargs="+", choices=["eager", *STATIC_MODES], default=["eager", "graph"],
                        help="compile modes compile the step forward once per model (torch's automatic dynamic "
                             "shapes cover every n after the second)")
    parser.add_argument("--attn", choices=["sdpa", "eager", "row_invariant"], default="sdpa",
                        help="attention implementation (row_invariant: as hardware=cpu-bf16)")
    parser.add_argument("--prepack", action="store_true", help="prepack linear weights (bf16 CPU, as hardware=cpu-bf16)")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_costs"))
    args = parser.parse_args(argv)
    if args.max_tokens < 1 or args.warmup < 1 or args.repeats < 1 or min(args.prefix) < 1:
        parser.error("--max-tokens, --warmup, --repeats and --prefix must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.attn not in STATIC_CACHE_ATTENTION and any_compiled(args.modes):
        parser.error(f"--attn {args.attn} cannot be compiled (hardware.compile needs sdpa or eager)")
    if args.prepack:
        try:
            check_supported(torch.device(args.device), DTYPES[args.dtype])
        except SpecsweepError as err:
            parser.error(f"--prepack: {err}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    register_attention()  # makes row_invariant a valid attn_implementation
    modes = list(dict.fromkeys(args.modes))
    for mode in [m for m in modes if m in STATIC_MODES and STATIC_MODES[m][1]]:
        if device.type != "cuda":
            console.print(f"[yellow]{mode} mode skipped: CUDA graphs need a CUDA device, not {device}[/]")
            modes.remove(mode)
    ns = list(range(1, args.max_tokens + 1))
    rows = []
    torch.manual_seed(0)
    for name in dict.fromkeys(args.models):
        model = random_llama(MODELS[name], device, dtype, args.attn)
        if args.prepack:  # with the row blocks cpu-bf16 takes on this machine
            prepack_linears(model, "auto", args.max_tokens)
        compiled = torch.compile(model) if any_compiled(modes) else None
        with torch.inference_mode():
            for mode in modes:
                for prefix in args.prefix:
                    console.print(f"{name} {mode} P={prefix}: n = 1..{args.max_tokens}")
                    if mode == "eager":
                        times = time_eager(model, prefix, ns, device, args)
                    else:
                        compile_step, capture = STATIC_MODES[mode]
                        times = time_static(model, prefix, ns, device, args, compiled if compile_step else None, capture)
                    t1 = statistics.median(times[1])
                    rows += [{"model": name, "mode": mode, "dtype": args.dtype, "prefix": prefix, "n": n,
                              "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                              "repeats": len(ts), "ratio": statistics.median(ts) / t1} for n, ts in times.items()]
        del model, compiled  # free the device before the next (up to 13B) model
        torch._dynamo.reset()  # and the compiled code that holds on to it
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    coefficients, predictions, best = derive(rows, args.alphas)
    show(rows, coefficients, best, args.alphas)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M")
    with open(args.out / f"costs_{stamp}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
    result = {"command": [sys.executable, "-m", "specsweep.tools.costs", *(sys.argv[1:] if argv is None else argv)],
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(device),
              "environment": environment(), "rows": rows, "coefficients": coefficients, "predictions": predictions,
              "best": best}
    (args.out / f"costs_{stamp}.json").write_text(json.dumps(result, indent=1))
    if rows:
        plot(rows, args.out / f"verify_cost_{stamp}.png")
    console.print(f"wrote {args.out}/costs_{stamp}.csv, .json and verify_cost_{stamp}.png")
    return result


if __name__ == "__main__":
    main()
