"""The decode job: config -> models -> engine -> per-sample records -> results files.

Everything that can be checked cheaply (options, paths, tree, decode settings, tokenizers) is checked
before a model is loaded or a token generated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specsweep.app import datasets, models, prediction, uncertainty
from specsweep.app import resume as resumption
from specsweep.app.results import METRICS, SAMPLES, environment, git_commit, lock_hash, machine_fingerprint, write_json, write_jsonl
from specsweep.app.signals import sigterm_raises
from specsweep.app.tracking import make_tracker
from specsweep.backends import exactness, hardware
from specsweep.backends.prepack import row_blocks
from specsweep.backends.target import make_runner
from specsweep.core.draft_length import POLICIES, LengthPolicy, VerifyCosts
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.core.stats import summarize
from specsweep.core.tree import SelfShaped, StepShape, Tree, draft_nodes
from specsweep.drafters import BuildContext, build_drafter, check_draft, model_paths, step_shape
from specsweep.errors import SpecsweepError
from specsweep.evaluation import pass_at_1

log = logging.getLogger(__name__)


def decoding_settings(cfg: DictConfig) -> tuple[Sampling, StepShape]:
    """Validated sampling settings and the draft shape of every step."""
    try:
        sampling = Sampling(float(cfg.decode.temperature), int(cfg.decode.top_k), float(cfg.decode.top_p))
        shape = step_shape(cfg.draft, Tree.from_config(cfg.tree))
    except ValueError as err:
        raise SpecsweepError(str(err)) from None
    if cfg.decode.max_new_tokens < 1:
        raise SpecsweepError(f"decode.max_new_tokens must be >= 1, got {cfg.decode.max_new_tokens}")
    check_draft(cfg.draft, shape)
    policy = length_policy_name(cfg)
    if policy not in POLICIES:
        raise SpecsweepError(f"draft.length_policy={policy}: choose one of {', '.join(POLICIES)}")
    if policy == "cost" and isinstance(shape, SelfShaped):
        raise SpecsweepError(f"draft.length_policy=cost cuts the chains of tree=chain; draft={cfg.draft.name} "
                             "shapes its steps itself: use draft.length_policy=fixed")
    if policy == "cost" and not (isinstance(shape, Tree) and shape.is_chain):
        raise SpecsweepError("draft.length_policy=cost cuts chains: use tree=chain (tree.depth is the longest draft)")
    return sampling, shape


def length_policy_name(cfg: DictConfig) -> str:
    """``draft.length_policy``: the engine's setting a draft config may carry (absent: fixed)."""
    return cfg.draft.get("length_policy", "fixed")


def shape_record(shape: StepShape) -> dict:
    """The draft shape in metrics.json: node budget and depth (what seed 001 plots against)."""
    return {"tree_nodes": draft_nodes(shape), "tree_depth": shape.depth}


def resolve_model_dirs(cfg: DictConfig) -> dict[str, Path]:
    """Local dirs of the target and of every model the draft needs, checked before anything loads."""
    paths = {"target.path": cfg.target.path, **model_paths(cfg.draft)}
    return {k: models.resolve_model_dir(v, k, cfg.cache_dir, cfg.download) for k, v in paths.items()}


def check_tree_fits(hw: hardware.Hardware, shape: StepShape) -> None:
    hw.check_verify_size(draft_nodes(shape) + 1, "tree")  # a verify forward holds the root and every node


def load_draft_model(cfg: DictConfig, model_dirs: dict[str, Path], target_tokenizer, hw: hardware.Hardware,
                     setting: str):
    """The draft model at ``setting`` (e.g. draft.path), refused unless it shares the target's tokenizer."""
    models.check_same_tokenizer(target_tokenizer, models.load_tokenizer(model_dirs[setting]),
                                f"{setting}={OmegaConf.select(cfg, setting)}")
    return models.load_model(model_dirs[setting], hw)


def build_engine(cfg: DictConfig, target, tokenizer, hw: hardware.Hardware, model_dirs: dict[str, Path],
                 sampling: Sampling, shape: StepShape) -> Engine:
    """The drafter of ``cfg.draft`` and the engine around it; drafter and engine share one generator."""
    generator = torch.Generator(device=hw.device)
    load = partial(load_draft_model, cfg, model_dirs, tokenizer, hw)
    ctx = BuildContext(target, tokenizer, sampling, generator, hw, load, Path(cfg.cache_dir))
    return Engine(target, build_drafter(cfg.draft, ctx), shape, sampling, cfg.decode.max_new_tokens,
                  models.eos_token_ids(target, tokenizer), generator, runner=make_runner(target, hw),
                  length_policy=length_policy(cfg, hw, shape))


def cost_key(target: str, hw: hardware.Hardware) -> dict:
    """What a verify-cost curve depends on: the machine, the locked environment, the target and the
    hardware profile as resolved (dtype, attention, runner, threads)."""
    return {"machine": machine_fingerprint(), "lock": lock_hash(), "target": str(target), "hardware": hw.describe()}


def cost_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / "costs" / f"{digest}.json"


def length_policy(cfg: DictConfig, hw: hardware.Hardware, shape: StepShape) -> LengthPolicy | None:
    """`draft.length_policy: cost`: the policy, its verify-cost curve cached in cache_dir/costs/ for
    this machine, lock, target and hardware profile (None for `fixed`)."""
    if length_policy_name(cfg) != "cost":
        return None
    key = cost_key(cfg.target.path, hw)
    return LengthPolicy(VerifyCosts(shape.num_nodes + 1, cost_path(Path(cfg.cache_dir), key), key))


@dataclass
class Checked:
    """A decode job's settings, every one checked before anything is loaded (`check_decode`)."""

    sampling: Sampling
    shape: StepShape
    evaluate: bool
    prompts: list[dict]
    hardware: hardware.Hardware
    model_dirs: dict[str, Path]


def check_decode(cfg: DictConfig) -> Checked:
    """Decode settings, draft and tree pairing, prompts, hardware, tree size and model dirs: what
    can be checked cheaply, checked (a bad value raises SpecsweepError with one line)."""
    sampling, shape = decoding_settings(cfg)
    evaluate = pass_at_1.enabled(cfg.evaluate, cfg.dataset.name)
    prompts = datasets.load_prompts(cfg.dataset)
    hw = hardware.resolve(cfg.hardware)
    check_tree_fits(hw, shape)
    uncertainty.repeats_setting(cfg)
    return Checked(sampling, shape, evaluate, prompts, hw, resolve_model_dirs(cfg))


def run_decode(cfg: DictConfig, run_dir: Path, choices: dict, group: str | None = None) -> dict:
    checked = check_decode(cfg)
    with sigterm_raises():  # SIGTERM unwinds the job: finished samples stay, W&B and sandboxes close
        return decode(cfg, checked, run_dir, choices, group)


def decode(cfg: DictConfig, checked: Checked, run_dir: Path, choices: dict, group: str | None) -> dict:
    sampling, shape, evaluate, prompts = checked.sampling, checked.shape, checked.evaluate, checked.prompts
    hw, model_dirs = checked.hardware, checked.model_dirs
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # samples.jsonl of the same config, commit and lock: continue after its last finished sample
    repeats = uncertainty.repeats_setting(cfg)
    order = uncertainty.schedule(len(prompts), repeats)  # (repeat, prompt index) in decode order
    resume = resumption.begin(run_dir, {"config": resolved, "git_commit": git_commit(), "lock_sha256": lock_hash()},
                              [prompts[i] for _, i in order])

    tokenizer = models.load_tokenizer(model_dirs["target.path"])
    encoded = [datasets.encode_prompt(tokenizer, r, cfg.dataset.prompt_format) for r in prompts]
    target = models.load_model(model_dirs["target.path"], hw)
    engine = build_engine(cfg, target, tokenizer, hw, model_dirs, sampling, shape)
    generator, drafter = engine.generator, engine.drafter
    probe = exactness.ensure_exact(engine.runner, target, hw, shape if drafter else None, Path(cfg.cache_dir),
                                   lock_hash())
    if drafter is not None:
        drafter.prepare(encoded)
    # the verify-cost curve the predicted speedup reads (timed now, untimed, where not cached)
    key = cost_key(cfg.target.path, hw)
    curve_path = cost_path(Path(cfg.cache_dir), key)
    seconds = (prediction.verify_curve(curve_path, key, engine.max_draft + 1, engine.runner,
                                       torch.tensor([encoded[0]], device=hw.device), hw.device)
               if drafter is not None and encoded else {1: 1.0})  # autoregressive: t(1)/t(1) is all it uses

    header = {**shape_record(shape), "config": resolved, "choices": choices, "hardware": hw.describe(),
              "row_blocks": row_blocks(target), "exactness": probe, **environment()}
    samples = resume.samples
    stats = [resumption.stats_of(s) for s in samples]  # resumed samples count with their own timings
    with make_tracker(cfg.logger, resolved, choices, run_dir, group) as tracker, _progress() as progress:
        task = progress.add_task("decoding", total=len(order), completed=len(samples), rate="")
        for count, sample in enumerate(samples):
            tracker.log_sample(count, sample)  # this start's W&B run holds the whole series
        for count in range(len(samples), len(order)):
            repeat, index = order[count]
            record, prompt_ids = prompts[index], encoded[index]
            generator.manual_seed(cfg.seed + index)  # each sample reproducible on its own (every repeat alike)
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=hw.device)
            result = engine.generate(ids)
            stats.append(result.stats)
            samples.append({
                "task_id": record["task_id"],
                "repeat": repeat,
                "prompt_ids": prompt_ids,
                "output_ids": result.output_ids,
                "text": tokenizer.decode(result.output_ids, skip_special_tokens=True),
                **vars(result.stats),
                "start": resume.start,  # the process start that decoded it (metrics.json: resume.starts)
                # draft=none runs: the target's top-2 logit margins, the reference of the sweep's audit
                **({"margins": result.margins, "top_logits": result.top_logits} if result.margins is not None else {}),
            })
            write_jsonl(run_dir / SAMPLES, samples)  # rewritten whole, atomically: never half a file
            tracker.log_sample(count, samples[-1])
            progress.update(task, advance=1, rate=f"{summarize(stats)['tokens_per_s']:.1f} tok/s")

        metrics = {**summarize(stats), "repeats": repeats, "draft_counters": drafter.counters() if drafter else {},
                   **header, "resume": resume.record()}
        metrics["predicted"] = prediction.predict(samples, seconds, curve_path if drafter is not None else None)
        if engine.length_policy is not None:  # the curve used, the lengths chosen; the refined curve cached
            metrics["draft_length"] = engine.length_policy.record()
            engine.length_policy.costs.save()
        if evaluate:  # after decoding: scoring is outside every timer; the first pass only (repeats alike)
            fields, metrics["evaluation"] = pass_at_1.score_samples(samples[:len(prompts)], prompts, cfg.evaluation,
                                                                    cfg.dataset.prompt_format)
            metrics["pass_at_1"] = metrics["evaluation"]["pass_at_1"]
            for sample, scored in zip(samples, fields):
                sample.update(scored)
            write_jsonl(run_dir / SAMPLES, samples)
        metrics["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(run_dir / METRICS, metrics)
        tracker.finish(metrics, samples)
    Console().print(metrics_table(metrics, choices))
    return metrics


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn())


def metrics_table(metrics: dict, choices: dict) -> Table:
    title = " ".join(f"{k}={v}" for k, v in choices.items())
    table = Table("metric", "value", title=title)
    for key in ("samples", "new_tokens", "tokens_per_s", "acceptance_rate", "acceptance_length",
                "tokens_per_target_forward", "draft_tokens", "accepted_tokens", "wall_s", "draft_s", "verify_s",
                "pass_at_1"):
        if key not in metrics:
            continue
        value = metrics[key]
        table.add_row(key, "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
    return table
