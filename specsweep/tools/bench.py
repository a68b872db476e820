"""Side-by-side speed benchmark: HF generate, HF prompt lookup, HF assisted generation, and ours.

    python -m specsweep.tools.bench --offset 124 --limit 40 --max-new-tokens 200 \
        --ours "ar=draft=none" "pld=draft=prompt-lookup tree.depth=8" "best=experiment=best"

Every strategy decodes the same prompts on the same loaded target in one process, interleaved
prompt by prompt (round robin) so that machine noise spreads evenly; speeds are compared as ratios,
with a 95% bootstrap interval over prompts paired with our AR run (`specsweep.app.uncertainty`).
``--repeats N`` decodes every prompt N times, pass after pass (strategies still interleaved in each),
and reports the run-to-run spread of whole passes.
Our strategies are composed from the same Hydra configs as the app. Every output is checked against
our autoregressive output, and HF's too, with the sweeps' audit (`specsweep.app.audit`: exact, ties
where the outputs part at a numeric tie of the target's logits, DIVERGED otherwise; the exit status
is 1 on DIVERGED). For each of ours it reports the analytic bound:
the speedup predicted from the measured cost of a step (draft + verify, in autoregressive steps) and
the measured tokens per step, next to Leviathan et al.'s formula with the same costs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from specsweep import CONF_DIR
from specsweep.app import audit, datasets, models, uncertainty
from specsweep.app.results import environment, lock_hash
from specsweep.app.run import build_engine, check_tree_fits, decoding_settings, resolve_model_dirs
from specsweep.backends import exactness, hardware
from specsweep.core.engine import synchronize
from specsweep.core.stats import predicted_speedup, summarize
from specsweep.errors import SpecsweepError


@dataclass
class Strategy:
    name: str
    run: object  # prompt ids [1, P] -> (output ids, SampleStats | None, {margins, top_logits} | None)
    outputs: list = field(default_factory=list)
    margins: list = field(default_factory=list)  # per prompt: the AR engine's {margins, top_logits}, or None
    stats: list = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    overrides: str = ""
    timed: list = field(default_factory=list)  # per call: {task_id, repeat, new_tokens, wall_s} (uncertainty)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def ours(name: str, overrides: str, common: list[str], target, tokenizer, hw, prompts: list[list[int]]) -> Strategy:
    cfg = compose_cfg(common + overrides.split())
    own = hardware.resolve(cfg.hardware)
    if not own.loads_like(hw):  # one target is shared: how it was loaded is fixed, how it runs is not
        raise SpecsweepError(f"strategy {name!r} runs on hardware={cfg.hardware.name}, the shared target on "
                             f"{hw.dtype} with {hw.attn_implementation}; pass --set hardware={cfg.hardware.name} to run "
                             "every strategy there")
    sampling, shape = decoding_settings(cfg)
    check_tree_fits(own, shape)
    engine = build_engine(cfg, target, tokenizer, own, resolve_model_dirs(cfg), sampling, shape)
    exactness.ensure_exact(engine.runner, target, own, shape if engine.drafter else None, Path(cfg.cache_dir),
                           lock_hash())
    if engine.drafter is not None:
        engine.drafter.prepare(prompts)

    def run(ids):
        result = engine.generate(ids)
        tops = None if result.margins is None else {"margins": result.margins, "top_logits": result.top_logits}
        return result.output_ids, result.stats, tops

    return Strategy(name, run, overrides=overrides)


def hf(name: str, target, eos: list[int], max_new_tokens: int, **generate_kwargs) -> Strategy:
    def run(ids):
        torch.manual_seed(0)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=eos[0], **generate_kwargs)
        return out[0, ids.shape[1]:].tolist(), None, None

    return Strategy(name, run, overrides=" ".join(f"{k}={v}" for k, v in generate_kwargs.items()
                                                   if k != "assistant_model") or "-")


def bounds(stats, ar_step_s: float) -> tuple[float | None, float | None]:
    """Predicted speedups from the measured step costs (draft + verify, in autoregressive steps):
    Leviathan et al.'s tokens per step from the acceptance rate (i.i.d. acceptance assumed), and the
    measured tokens per step (acceptance length + 1). Against the second, the achieved speedup shows
    what the loop loses outside drafting and verification (prefill, bookkeeping, EOS/limit cuts)."""
    m = summarize(stats)
    if not m["draft_tokens"] or not m["verify_steps"]:
        return None, None
    gamma = m["draft_tokens"] / m["verify_steps"]
    step = (m["draft_s"] + m["verify_s"]) / m["verify_steps"] / ar_step_s
    leviathan = predicted_speedup(m["acceptance_rate"], gamma, step)
    return leviathan, m["tokens_per_target_forward"] / step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="humaneval", help="humaneval, or a .jsonl path")
    parser.add_argument("--offset", type=int, default=124, help="HumanEval: the last 40 problems are 124..163")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--ours", nargs="*", default=["ar=draft=none", "default="],
                        help="NAME=OVERRIDES (space-separated Hydra overrides) per strategy of ours")
    parser.add_argument("--hf", nargs="*", default=["generate", "prompt-lookup"],
                        choices=["generate", "prompt-lookup", "assisted-layer-skip"])
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE",
                        help="Hydra overrides for every strategy and the shared target, e.g. hardware.dtype=bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="decode every prompt this many times: pass after pass, strategies interleaved in each")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "specsweep"))
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise SpecsweepError(f"--repeats {args.repeats}: must be >= 1")
    env = environment()  # the code that runs: an edit made while the bench runs is not its commit

    common = [f"decode.max_new_tokens={args.max_new_tokens}", f"cache_dir={args.cache_dir}", *args.set]
    base = compose_cfg(common)
    hw = hardware.resolve(base.hardware)
    target_dir = models.resolve_model_dir(base.target.path, "target.path", args.cache_dir)
    tokenizer = models.load_tokenizer(target_dir)
    target = models.load_model(target_dir, hw)
    eos = models.eos_token_ids(target, tokenizer)
    dataset = OmegaConf.create({"name": "jsonl" if args.dataset.endswith(".jsonl") else args.dataset,
                                "path": args.dataset, "offset": args.offset, "limit": args.limit,
                                "prompt_format": "plain"})
    prompts = [torch.tensor([datasets.encode_prompt(tokenizer, r, "plain")], device=hw.device)
               for r in datasets.load_prompts(dataset)]

    strategies = []
    for spec in args.ours:
        name, _, overrides = spec.partition("=")
        strategies.append(ours(name, overrides, common, target, tokenizer, hw, [p[0].tolist() for p in prompts]))
    if "generate" in args.hf:
        strategies.append(hf("hf-generate", target, eos, args.max_new_tokens))
    if "prompt-lookup" in args.hf:
        strategies.append(hf("hf-prompt-lookup", target, eos, args.max_new_tokens, prompt_lookup_num_tokens=10))
    if "assisted-layer-skip" in args.hf:
        from specsweep.drafters.layer_skip import kept_layers, skip_view

        skip = compose_cfg(["draft=layer-skip"]).draft
        view = skip_view(target, kept_layers(len(target.model.layers), skip.exit_layer, skip.skip_layers))
        strategies.append(hf("hf-assisted-layer-skip", target, eos, args.max_new_tokens, assistant_model=view))

    console = Console()
    warmup = prompts[0][:, :32]
    for s in strategies:
        s.run(warmup)
    # repeat r of every prompt after repeat r - 1 of all; within a prompt, every strategy in turn
    for repeat, i in uncertainty.schedule(len(prompts), args.repeats):
        for s in strategies:
            synchronize(hw.device)
            start = time.perf_counter()
            out, stats, tops = s.run(prompts[i])
            synchronize(hw.device)
            wall = time.perf_counter() - start
            s.seconds += wall
            s.tokens += len(out)
            s.timed.append({"task_id": i, "repeat": repeat, "new_tokens": len(out), "wall_s": wall})
            if repeat == 0:  # repeats decode the same tokens: the first pass is audited
                s.outputs.append(out)
                s.margins.append(tops)
            if stats is not None:
                s.stats.append(stats)
        console.print(f"prompt {i + 1}/{len(prompts)}" + (f" (pass {repeat + 1}/{args.repeats})" if args.repeats > 1
                                                           else "") + " done", style="dim")

    rows = report(strategies, hw.describe()["dtype"])
    table = Table("strategy", "tok/s", "x HF gen", "x our AR [95%]", "run-to-run CV", "acc. len", "acc. rate",
                  "Leviathan", "bound", "of bound", "lossless",
                  title=f"{len(prompts)} prompts x {args.repeats} repeats, {args.max_new_tokens} new tokens")
    for r in rows:
        ci = f" [{r['vs_our_ar_lo']:.2f}, {r['vs_our_ar_hi']:.2f}]" if r.get("vs_our_ar_lo") is not None else ""
        table.add_row(r["strategy"], f"{r['tokens_per_s']:.2f}", _f(r["vs_hf_generate"]),
                      _f(r["vs_our_ar"]) + ci, _f(r["run_to_run_cv"], 3), _f(r["acceptance_length"]),
                      _f(r["acceptance_rate"]), _f(r["leviathan_speedup"]), _f(r["bound_speedup"]),
                      _f(r["fraction_of_bound"]), r["lossless"])
    console.print(table)
    for r in rows:
        if r["lossless"] == audit.DIVERGED:
            console.print(f"[red]DIVERGED[/red] {r['strategy']}: {r['worst_divergence']}")
    write(Path(args.out), rows, argv, len(prompts), args, hw, env)
    return 1 if any(r["lossless"] == audit.DIVERGED for r in rows) else 0


def samples(s: Strategy) -> list[dict]:
    """A strategy's outputs as the audit reads samples (task id = prompt index)."""
    return [{"task_id": i, "output_ids": out, **(tops or {})}
            for i, (out, tops) in enumerate(zip(s.outputs, s.margins))]


def report(strategies: list[Strategy], dtype: str) -> list[dict]:
    """One row per strategy; ``dtype``: the target's (the audit's ulps)."""
    reference = next((s for s in strategies if s.overrides.endswith("draft=none")), strategies[0])
    hf_base = next((s for s in strategies if s.name == "hf-generate"), None)
    ar_tps = reference.tokens / reference.seconds
    ar_step_s = summarize(reference.stats)["verify_s"] / max(summarize(reference.stats)["verify_steps"], 1) \
        if reference.stats else None
    rows = []
    for s in strategies:
        tps = s.tokens / s.seconds
        m = summarize(s.stats) if s.stats else {}
        leviathan, predicted = bounds(s.stats, ar_step_s) if s.stats and ar_step_s else (None, None)
        achieved = tps / ar_tps
        # paired prompt by prompt with our AR (bootstrap over prompts) and the spread of whole passes
        paired = uncertainty.paired_speedup(uncertainty.fold(s.timed), uncertainty.fold(reference.timed)) \
            if s.timed and reference.timed else {}
        interval = paired.get("speedup") or {}
        spread = uncertainty.spread(uncertainty.fold(s.timed)) if s.timed else {}
        rows.append({
            "strategy": s.name, "overrides": s.overrides, "tokens": s.tokens, "seconds": s.seconds,
            "tokens_per_s": tps, "vs_hf_generate": tps / (hf_base.tokens / hf_base.seconds) if hf_base else None,
            "vs_our_ar": achieved, "vs_our_ar_lo": interval.get("lo"), "vs_our_ar_hi": interval.get("hi"),
            "slower_prompts": len(paired.get("slower_than_baseline", [])), "repeats": spread.get("repeats"),
            "run_to_run_cv": spread.get("run_to_run_cv"), "prompt_to_prompt_cv": spread.get("prompt_to_prompt_cv"),
            "acceptance_length": m.get("acceptance_length"),
            "acceptance_rate": m.get("acceptance_rate"), "leviathan_speedup": leviathan,
            "bound_speedup": predicted, "fraction_of_bound": achieved / predicted if predicted else None,
            **(audit.columns(audit.not_audited("the reference", audit.REFERENCE)) if s is reference
               else audit.columns(audit.compare(samples(s), samples(reference), dtype))),
        })
    return rows


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write(out: Path, rows: list[dict], argv, prompts: int, args, hw, env: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M")
    with (out / f"speed_{stamp}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python -m specsweep.tools.bench " + " ".join(f"'{a}'" if " " in a else a for a in argv or sys.argv[1:])
    info = {"date": stamp, "command": command,
            "machine": f"{env['cpu'] or platform.machine()}, {env['cpu_count']} cores, "
                       f"torch {env['torch']} ({torch.get_num_threads()} threads), {hw.describe()['device']}",
            "hardware": hw.describe(), "git_commit": env["git_commit"], "environment": env, "prompts": prompts,
            "max_new_tokens": args.max_new_tokens, "repeats": getattr(args, "repeats", 1), "rows": rows}
    (out / f"speed_{stamp}.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SpecsweepError as error:  # bad input: one line, no traceback
        raise SystemExit(f"error: {error}") from None
