"""Search a layer-skip draft: which layers can the target skip and still agree with itself?

``python -m specsweep experiment=layer_skip_search`` (settings: ``conf/experiment/layer_skip_search.yaml``).

* Calibration: the target's own greedy continuations of a few prompts. By default HumanEval problems
  0..5; the benchmarks hold out the last 40 problems (124..163), so calibration never sees them.
* Score of a skip set: teacher-forced top-1 agreement of the skip view (`skip_view`) with the full
  target at every continuation position, pooled over the calibration sequences. Under greedy
  decoding this is the per-token chance that a drafted token is accepted.
* Search: greedy backward elimination. Each round tries skipping each remaining layer (after the
  first round: the ``candidates`` most promising ones) and keeps the one that leaves agreement
  highest, up to ``max_skip`` layers; every round is recorded.
* Speed: a draft token of a set keeping k layers costs c(k) one-row target forwards and a verify of
  gamma + 1 rows v(gamma + 1), both measured on this machine (`specsweep.tools.layer_costs`: the
  embedding and LM head every draft step runs are counted), so with agreement a the expected speedup
  is (1 - a^(gamma+1)) / ((1 - a)(gamma c(k) + v(gamma + 1))) (Leviathan et al., 2023). The chosen set
  is the one on the trajectory (and the gamma in 1..max_gamma) that maximises it. Early exit with the
  same number of layers is scored alongside for comparison. All figures are in-sample.

Writes ``search.json`` and a ready draft config ``layer-skip-<target name>.yaml`` into the run dir
(and into ``conf/draft/`` with ``search.install=true``).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from specsweep import CONF_DIR
from specsweep.app import datasets, models
from specsweep.app.results import environment, write_atomic, write_json
from specsweep.backends import hardware
from specsweep.backends.target import DynamicTarget
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling, greedy_tokens
from specsweep.drafters.layer_skip import LayerSkipDrafter, skip_view
from specsweep.errors import SpecsweepError
from specsweep.tools.layer_costs import SkipCosts, skip_costs

log = logging.getLogger(__name__)

SEARCH_JSON = "search.json"
CONF_DRAFT = CONF_DIR / "draft"
FIRST_HELD_OUT = 124  # the benchmarks hold out the last 40 HumanEval problems (124..163)

# Hydra jobs log to files: don't squeeze tables into the 80 columns rich assumes off a terminal.
console = Console(width=None if sys.stdout.isatty() else 160)


def _swap_hidden(hidden: torch.Tensor):
    """A forward pre-hook that feeds ``hidden`` to the module instead of its real input."""
    def hook(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return hook


def _record_input(store: list):
    def hook(module, args, kwargs):
        store.append(args[0] if args else kwargs["hidden_states"])
    return hook


class AgreementScorer:
    """Teacher-forced top-1 agreement of skip views with the full target on calibration sequences.

    ``sequences``: [1, P+T] prompt + continuation ids; ``prompt_lens``: P of each. The logits at
    positions P-1 .. P+T-2 predict the continuation; only those are scored.
    """

    def __init__(self, target, sequences: list[torch.Tensor], prompt_lens: list[int]):
        self.target = target
        self.num_layers = len(target.model.layers)
        self.sequences = sequences
        self.scored = [slice(p - 1, s.shape[1] - 1) for s, p in zip(sequences, prompt_lens)]
        self.positions = sum(s.stop - s.start for s in self.scored)
        if self.positions == 0:
            raise SpecsweepError("layer_skip_search: the target ended every calibration prompt at once; "
                                 "no continuation tokens to score (use other prompts)")
        every = list(range(self.num_layers))
        self.reference = [self._top1(every, i) for i in range(len(sequences))]

    def _top1(self, kept: list[int], index: int, resume: torch.Tensor | None = None) -> torch.Tensor:
        """Top-1 ids of the view over ``kept`` at the scored positions of sequence ``index``.

        ``resume``: the hidden state to feed the first kept layer (the final norm when ``kept`` is
        empty) instead of what the layers before it would compute, so a shared prefix is not rerun.
        """
        view = skip_view(self.target, kept)
        handle = None
        if resume is not None:
            consumer = self.target.model.layers[kept[0]] if kept else self.target.model.norm
            handle = consumer.register_forward_pre_hook(_swap_hidden(resume), with_kwargs=True)
        try:
            hidden = view.model(input_ids=self.sequences[index], use_cache=False).last_hidden_state
        finally:
            if handle is not None:
                handle.remove()
        return greedy_tokens(view.lm_head(hidden[0, self.scored[index]]))

    def _agreement(self, top1: list[torch.Tensor]) -> float:
        return sum(int((t == r).sum()) for t, r in zip(top1, self.reference)) / self.positions

    def agreement(self, kept: list[int]) -> float:
        return self._agreement([self._top1(kept, i) for i in range(len(self.sequences))])

    def removal_scores(self, kept: list[int], layers: list[int]) -> dict[int, float]:
        """Agreement of ``kept`` minus each one of ``layers``. One forward of ``kept`` records every
        layer's input; dropping layer k then only reruns the layers after k from that input."""
        inputs = []  # inputs[i][j]: hidden state entering kept[j], sequence i
        for i in range(len(self.sequences)):
            store: list[torch.Tensor] = []
            handles = [self.target.model.layers[k].register_forward_pre_hook(_record_input(store), with_kwargs=True)
                       for k in kept]
            try:
                skip_view(self.target, kept).model(input_ids=self.sequences[i], use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
            inputs.append(store)
        scores = {}
        for j, layer in enumerate(kept):
            if layer not in layers:
                continue
            scores[layer] = self._agreement([self._top1(kept[j + 1:], i, resume=inputs[i][j])
                                             for i in range(len(self.sequences))])
        return scores


def greedy_search(scorer: AgreementScorer, costs: SkipCosts, max_skip: int, max_gamma: int,
                  candidates: int | None = None) -> list[dict]:
    """Greedy backward elimination; step k (1..max_skip) skips k layers and contains step k-1's set.

    The first round tries every layer. Later rounds try only the ``candidates`` layers whose latest
    removal score is highest (None: every layer): a layer that hurt a lot one round rarely becomes
    the best choice the next, and later rounds then cost candidates/layers as much.
    """
    kept, trajectory, latest, evaluations = list(range(scorer.num_layers)), [], {}, 0
    for step in range(1, max_skip + 1):
        start = time.perf_counter()
        pool = kept if candidates is None or not latest else sorted(kept, key=latest.get, reverse=True)[:candidates]
        scores = scorer.removal_scores(kept, pool)
        latest.update(scores)
        evaluations += len(scores)
        layer = max(scores, key=scores.get)  # ties: the lowest layer index
        kept.remove(layer)
        skipped = sorted(set(range(scorer.num_layers)) - set(kept))
        trajectory.append({**costs.estimate(scores[layer], len(kept), max_gamma), "skipped": skipped,
                           "removed": layer, "candidates": scores, "evaluations": evaluations})
        log.info("skip %d layer(s): +layer %d, agreement %.3f (%d candidates, %.0f s)", step, layer, scores[layer],
                 len(scores), time.perf_counter() - start)
    return trajectory


def early_exits(scorer: AgreementScorer, costs: SkipCosts, max_skip: int, max_gamma: int) -> list[dict]:
    """Early exit with the same layer counts as the trajectory: the first num_layers - k layers."""
    rows = []
    for k in range(1, max_skip + 1):
        exit_layer = scorer.num_layers - k
        agreement = scorer.agreement(list(range(exit_layer)))
        rows.append({**costs.estimate(agreement, exit_layer, max_gamma), "exit_layer": exit_layer})
    return rows


def check_settings(search, target) -> int:
    """Refuse bad settings before minutes of generation; returns the target's number of layers."""
    if not hasattr(target, "model") or not hasattr(target.model, "layers"):
        raise SpecsweepError(f"layer_skip_search: {type(target).__name__} has no model.layers to skip")
    num_layers = len(target.model.layers)
    if not 1 <= search.max_skip < num_layers:
        raise SpecsweepError(f"search.max_skip={search.max_skip}: the target has {num_layers} layers "
                             f"(use 1..{num_layers - 1})")
    if search.max_gamma < 1:
        raise SpecsweepError(f"search.max_gamma={search.max_gamma}: must be >= 1")
    if search.candidates is not None and search.candidates < 1:
        raise SpecsweepError(f"search.candidates={search.candidates}: must be >= 1 (or null: every layer)")
    if search.continuation_tokens < 1:
        raise SpecsweepError(f"search.continuation_tokens={search.continuation_tokens}: must be >= 1")
    return num_layers


def calibration(target, tokenizer, records: list[dict], prompt_format: str, tokens: int, device):
    """The target's own greedy continuations: ([1, P+T] sequences, prompt lengths)."""
    engine = Engine(target, None, 0, Sampling(), tokens, models.eos_token_ids(target, tokenizer), runner=DynamicTarget(target))
    sequences, prompt_lens = [], []
    for record in records:
        prompt = datasets.encode_prompt(tokenizer, record, prompt_format)
        output = engine.generate(torch.tensor([prompt], dtype=torch.long, device=device)).output_ids
        sequences.append(torch.tensor([prompt + output], dtype=torch.long, device=device))
        prompt_lens.append(len(prompt))
    return sequences, prompt_lens


def draft_config_text(name: str, skipped: list[int], notes: list[str]) -> str:
    header = "".join(f"# {line}\n" for line in notes)
    return (f"{header}_target_: {LayerSkipDrafter.__module__}.{LayerSkipDrafter.__qualname__}\n"
            f"name: {name}\nexit_layer: null\n"
            f"skip_layers: {json.dumps(skipped)}\nconfidence_threshold: null\n")


def _command() -> str:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["python -m specsweep", *overrides])


def _table(result: dict) -> Table:
    chosen = result["chosen"]["skipped"]
    table = Table("k", "skipped layers", "agreement", "c", "γ", "speedup", "exit_layer", "agreement", "γ", "speedup",
                  title=f"layer-skip search on {result['target']} ({result['positions']} calibration tokens; "
                        "speedup = predicted; right: early exit, same cost)")
    for k, (row, exit_row) in enumerate(zip(result["trajectory"], result["early_exit"]), 1):
        table.add_row(str(k), str(row["skipped"]), f"{row['agreement']:.3f}", f"{row['cost_ratio']:.2f}",
                      str(row["best_gamma"]), f"{row['predicted_speedup']:.3f}", str(exit_row["exit_layer"]),
                      f"{exit_row['agreement']:.3f}", str(exit_row["best_gamma"]),
                      f"{exit_row['predicted_speedup']:.3f}", style="bold" if row["skipped"] == chosen else None)
    return table


def job(cfg: DictConfig, run_dir: Path, choices: dict | None = None, group: str | None = None) -> dict:
    """`experiment=layer_skip_search`'s job (the app's job signature)."""
    return run(cfg, run_dir)


@dataclass
class Calibration:
    """A loaded target with its calibration: the scorer (target, sequences, reference top-1), the
    measured costs, the prompts' records, the dataset settings they came from and the hardware profile."""

    scorer: AgreementScorer
    costs: SkipCosts
    records: list[dict]
    dataset: DictConfig
    hardware: dict


def load_calibration(cfg: DictConfig, settings: DictConfig, check=check_settings) -> Calibration:
    """The target and its greedy continuations of ``settings.calibration`` {offset, limit} (replacing
    the dataset's own), ``settings.continuation_tokens`` long; ``check(settings, target)`` refuses bad
    settings once the target is loaded, before minutes of generation."""
    dataset = OmegaConf.merge(cfg.dataset, {"offset": settings.calibration.offset,
                                            "limit": settings.calibration.limit})
    records = datasets.load_prompts(dataset)
    if dataset.name == "humaneval" and dataset.offset + len(records) > FIRST_HELD_OUT:
        log.warning("calibration prompts overlap the benchmarks' held-out HumanEval problems (%d..163)",
                    FIRST_HELD_OUT)
    hw = hardware.resolve(cfg.hardware)
    model_dir = models.resolve_model_dir(cfg.target.path, "target.path", cfg.cache_dir, cfg.download)
    tokenizer = models.load_tokenizer(model_dir)
    target = models.load_model(model_dir, hw)
    check(settings, target)
    with torch.inference_mode():
        sequences, prompt_lens = calibration(target, tokenizer, records, dataset.prompt_format,
                                             settings.continuation_tokens, hw.device)
        scorer = AgreementScorer(target, sequences, prompt_lens)
    costs = skip_costs(target, cfg.target.path, hw, Path(cfg.cache_dir), sequences[0], settings.max_gamma)
    return Calibration(scorer, costs, records, dataset, hw.describe())


def run(cfg: DictConfig, run_dir: Path) -> dict:
    search = cfg.search
    start, env = time.perf_counter(), environment()  # the code, lock and CPU the search ran on
    calibrated = load_calibration(cfg, search)
    scorer, records, dataset, num_layers = (calibrated.scorer, calibrated.records, calibrated.dataset,
                                            calibrated.scorer.num_layers)
    with torch.inference_mode():
        trajectory = greedy_search(scorer, calibrated.costs, search.max_skip, search.max_gamma, search.candidates)
        exits = early_exits(scorer, calibrated.costs, search.max_skip, search.max_gamma)
    chosen = max(trajectory, key=lambda row: row["predicted_speedup"])

    name = f"layer-skip-{cfg.target.name}"
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    notes = [f"Layer-skip draft for target={cfg.target.name}, written by the layer-skip search on {when}:",
             f"  {_command()}",
             f"Greedy backward elimination, scored on {scorer.positions} continuation tokens of {len(records)} "
             f"{dataset.name} prompts from offset {dataset.offset}.",
             f"Skips {len(chosen['skipped'])}/{num_layers} layers: in-sample top-1 agreement "
             f"{chosen['agreement']:.3f}, predicted speedup {chosen['predicted_speedup']:.2f}x "
             f"at tree.depth={chosen['best_gamma']}.",
             f"Use: python -m specsweep draft={name} tree.depth={chosen['best_gamma']}"]
    config_path = run_dir / f"{name}.yaml"
    text = draft_config_text(name, chosen["skipped"], notes)
    write_atomic(config_path, text)
    installed = None
    if search.install:
        installed = CONF_DRAFT / config_path.name
        write_atomic(installed, text)

    result = {"target": cfg.target.name, "target_path": cfg.target.path, "num_layers": num_layers,
              "calibration": {"dataset": dataset.name, "offset": dataset.offset,
                              "task_ids": [r["task_id"] for r in records]},
              "continuation_tokens": search.continuation_tokens, "positions": scorer.positions,
              "max_gamma": search.max_gamma, "candidates": search.candidates,
              "costs": calibrated.costs.describe(), "trajectory": trajectory, "early_exit": exits,
              "chosen": {k: chosen[k] for k in ("skipped", "agreement", "cost_ratio", "best_gamma",
                                                "predicted_speedup", "evaluations")},
              "draft_config": str(config_path), "installed": None if installed is None else str(installed),
              "hardware": calibrated.hardware, "environment": env, "wall_s": time.perf_counter() - start}
    write_json(run_dir / SEARCH_JSON, result)
    console.print(_table(result))
    if chosen["predicted_speedup"] <= 1.0:
        console.print("no skip set on this trajectory is predicted to beat autoregressive decoding")
    console.print(f"draft config: {config_path}" + (f" (installed as {installed})" if installed else ""))
    return result
