"""Search a layer-skip set by Bayesian optimisation: Optuna's TPE through Hydra's Optuna sweeper.

``python -m specsweep -m experiment=layer_skip_bo`` (settings: ``conf/experiment/layer_skip_bo.yaml``);
the greedy counterpart is ``experiment=layer_skip_search`` (`specsweep.tools.layer_search`).

* A trial is one job of this app (`job`). The sweeper (``hydra/sweeper: optuna``, TPE, seeded by
  ``seed``) proposes a skip set as one value in [0, 1] per layer, ``bo.skip.layerNN``, and the layer
  is skipped where its value is below ``bo.skip_prior``; `skip_space` asks for one per layer of the
  target it reads from the target's config, so the search space is always the target's own layers,
  whatever their number (no list of 30 keys written for one model).
* Why values and not one boolean per layer: TPE's random start draws each parameter uniformly, so
  booleans give sets of half the layers, and TPE then stays among large sets that no cost makes
  pay. Uniform values below ``skip_prior`` (0.2) skip a fifth of the layers at the start: a prior on
  the set's size, which TPE then sharpens (docs/drafts.md has both spaces measured). By hand, with
  no ``-m``, ``bo.skip.layerNN=true`` skips a layer as well.
* Score and objective: the greedy search's own. The skip set's teacher-forced top-1 agreement with
  the full target over the target's greedy continuations of the same calibration prompts (HumanEval
  0..5 by default, disjoint from the benchmarks' 124..163), and Leviathan's predicted speedup from it
  with the draft step's and the verify's costs measured on this machine (`layer_costs`, cached, so
  both searches rank sets by the same costs), at the best draft length in 1..``max_gamma``. The
  objective is this prediction, not a measured tokens/s: a measured tokens/s per trial costs a
  decode per trial and is noisy on a shared CPU (run-to-run spread of a few percent, as large as the
  gaps between neighbouring skip sets), while the prediction is exactly what the greedy search
  maximises, so the two are compared on one objective at equal numbers of evaluations.
* An invalid set is not scored: its objective is 0.0, below every valid set's (a valid set's
  predicted speedup is > 0), and its trial says why. Invalid: no layer skipped, every layer, or
  more than ``max_skip`` (null by default: no cap).
* Cost: the model, the calibration continuations and the full model's top-1 load once per process
  (`context`, cached by what they depend on; Hydra's basic launcher runs every trial in this
  process, and the sweep's start loads them there first, so a bad setting stops the sweep in one
  line), and a set scored before is not scored again, so a trial costs one agreement scoring.
  ``evaluations`` counts the distinct valid sets scored, as the greedy search counts its candidates.
* End of the sweep (`BOSummary`, this experiment's sweep summary): ``bo.json`` (every trial: skip
  set, agreement, predicted speedup, evaluations so far; the best; the sweeper's settings) and
  ``layer-skip-<target name>.yaml``, the best set as a ready draft config (the greedy search's
  format), in the sweep dir, and in ``conf/draft/`` with ``bo.install=true``.

With the locked optuna 2.10.1 (hydra-optuna-sweeper 1.3.0 still requires optuna < 3) and SQLAlchemy
2.x only the in-memory study works (``hydra.sweeper.storage: null``); Optuna's RDB storage fails its
schema-version check there, so a storage setting is refused.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from specsweep.app import models, summary
from specsweep.app.results import ERROR, environment, write_atomic, write_json
from specsweep.drafters.layer_skip import kept_layers
from specsweep.errors import SpecsweepError
from specsweep.tools.layer_search import (
    CONF_DRAFT,
    Calibration,
    console,
    draft_config_text,
    load_calibration,
)

log = logging.getLogger(__name__)

TRIAL_JSON = "trial.json"
BO_JSON = "bo.json"
SKIP_KEY = re.compile(r"layer(\d+)$")
INVALID_OBJECTIVE = 0.0  # below every valid set's predicted speedup (> 0)


@dataclass
class Context(Calibration):
    """What every trial of one sweep shares: the loaded target with its calibration, and the
    agreement of every skip set scored so far (kept layers -> agreement)."""

    scores: dict[tuple[int, ...], float] = field(default_factory=dict)


# per process, keyed by what they depend on (`_key`): trials of one sweep run in one process
_contexts: dict[str, Context] = {}
_layer_counts: dict[str, int] = {}


def _key(*parts) -> str:
    return json.dumps([OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts],
                      sort_keys=True, default=str)


def check_settings(bo: DictConfig, target=None) -> None:
    """Refuse bad ``bo`` settings, and a target without layers to skip, in one line."""
    if bo.max_skip is not None and bo.max_skip < 1:
        raise SpecsweepError(f"bo.max_skip={bo.max_skip}: must be >= 1 (or null: no cap)")
    if bo.max_gamma < 1:
        raise SpecsweepError(f"bo.max_gamma={bo.max_gamma}: must be >= 1")
    if not 0 < bo.skip_prior < 1:
        raise SpecsweepError(f"bo.skip_prior={bo.skip_prior}: must be in (0, 1) (the share of layers a random "
                             "proposal skips)")
    if bo.continuation_tokens < 1:
        raise SpecsweepError(f"bo.continuation_tokens={bo.continuation_tokens}: must be >= 1")
    if target is not None:
        if not (hasattr(target, "model") and hasattr(target.model, "layers")):
            raise SpecsweepError(f"layer_skip_bo: {type(target).__name__} has no model.layers to skip")
        check_layers(bo, len(target.model.layers))


def check_layers(bo: DictConfig, count: int) -> None:
    if bo.max_skip is not None and bo.max_skip >= count:
        raise SpecsweepError(f"bo.max_skip={bo.max_skip}: the target has {count} layers (use 1..{count - 1}, or null)")


def context(cfg: DictConfig) -> Context:
    """The target and its calibration for ``cfg``: loaded once per process."""
    bo = cfg.bo
    key = _key(cfg.target.path, str(cfg.cache_dir), cfg.download, cfg.hardware, cfg.dataset,
               bo.calibration, bo.continuation_tokens, bo.max_gamma)  # max_gamma: the verify rows timed
    if key not in _contexts:
        check_settings(bo)
        calibrated = load_calibration(cfg, bo, check_settings)
        _contexts[key] = Context(**vars(calibrated))
    return _contexts[key]


def num_layers(cfg: DictConfig) -> int:
    """The target's decoder layers, from its config (no weights loaded)."""
    key = _key(cfg.target.path, str(cfg.cache_dir))
    if key not in _layer_counts:
        from transformers import AutoConfig

        model_dir = models.resolve_model_dir(cfg.target.path, "target.path", cfg.cache_dir, cfg.download)
        config = AutoConfig.from_pretrained(model_dir)
        count = getattr(config, "num_hidden_layers", None)
        if not isinstance(count, int) or count < 1:
            raise SpecsweepError(f"target.path={cfg.target.path}: its config names no num_hidden_layers to skip")
        _layer_counts[key] = count
    return _layer_counts[key]


def param_name(layer: int, count: int) -> str:
    """The sweeper's parameter for ``layer`` (zero-padded so they sort: layer03 of 30)."""
    return f"bo.skip.layer{layer:0{len(str(count - 1))}d}"


def skip_space(cfg: DictConfig, trial) -> None:
    """``hydra.sweeper.custom_search_space``: one value in [0, 1] per layer of the target, the layer
    skipped below ``bo.skip_prior``. The sweeper turns the trial's parameters into overrides; ``++``
    adds each key to ``bo.skip``."""
    count = num_layers(cfg)
    for layer in range(count):
        trial.suggest_float(f"++{param_name(layer, count)}", 0.0, 1.0)


def skipped_layers(skip: DictConfig | dict, count: int, skip_prior: float) -> list[int]:
    """The layers ``bo.skip`` marks skipped: true, or a value in [0, 1] below ``skip_prior`` (the
    sweeper's); a key that is not a layer of the target, or another value, is refused."""
    skipped = []
    for name, value in (skip or {}).items():
        match = SKIP_KEY.match(str(name))
        if match is None or int(match.group(1)) >= count:
            raise SpecsweepError(f"bo.skip.{name}: not a layer of the target (bo.skip.layerNN, NN in 0..{count - 1})")
        if isinstance(value, bool):
            skip_it = value
        elif isinstance(value, (int, float)) and 0 <= value <= 1:
            skip_it = value < skip_prior
        else:
            raise SpecsweepError(f"bo.skip.{name}={value}: expected true, false or a value in [0, 1] "
                                 f"(skipped below bo.skip_prior={skip_prior})")
        if skip_it:
            skipped.append(int(match.group(1)))
    return sorted(skipped)


def invalid_reason(skipped: list[int], count: int, max_skip: int | None) -> str | None:
    if not skipped:
        return "no layer skipped (that is the target itself, not a draft)"
    if len(skipped) == count:
        return "every layer skipped (nothing left to draft with)"
    if max_skip is not None and len(skipped) > max_skip:
        return f"{len(skipped)} layers skipped, more than bo.max_skip={max_skip}"
    return None


def score(ctx: Context, skipped: list[int], max_gamma: int, max_skip: int | None = None) -> dict:
    """One trial's record: the set's agreement and predicted speedup, or why it is invalid."""
    count = ctx.scorer.num_layers
    record = {"skipped": skipped, "num_layers": count}
    invalid = invalid_reason(skipped, count, max_skip)
    if invalid:
        return {**record, "invalid": invalid, "agreement": None, "predicted_speedup": None,
                "objective": INVALID_OBJECTIVE, "scored": False, "score_s": 0.0}
    kept = kept_layers(count, None, skipped)
    start = time.perf_counter()
    scored = tuple(kept) not in ctx.scores
    if scored:
        with torch.inference_mode():
            ctx.scores[tuple(kept)] = ctx.scorer.agreement(kept)
    estimate = ctx.costs.estimate(ctx.scores[tuple(kept)], len(kept), max_gamma)
    return {**record, "invalid": None, **estimate, "objective": estimate["predicted_speedup"], "scored": scored,
            "score_s": time.perf_counter() - start}


def _job_num() -> int | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)


def job(cfg: DictConfig, run_dir: Path, choices: dict | None = None, group: str | None = None) -> float:
    """`experiment=layer_skip_bo`'s job (the app's job signature): score ``bo.skip``, write
    trial.json, return the objective (a float, as the sweeper needs)."""
    ctx = context(cfg)
    check_layers(cfg.bo, ctx.scorer.num_layers)
    skipped = skipped_layers(cfg.bo.get("skip"), ctx.scorer.num_layers, cfg.bo.skip_prior)
    record = {"trial": _job_num(), **score(ctx, skipped, cfg.bo.max_gamma, cfg.bo.max_skip), "target": cfg.target.name,
              "target_path": cfg.target.path, "positions": ctx.scorer.positions,
              "calibration": {"dataset": ctx.dataset.name, "offset": ctx.dataset.offset,
                              "task_ids": [r["task_id"] for r in ctx.records]},
              "continuation_tokens": cfg.bo.continuation_tokens, "max_gamma": cfg.bo.max_gamma,
              "max_skip": cfg.bo.max_skip, "skip_prior": cfg.bo.skip_prior, "costs": ctx.costs.describe(),
              "hardware": ctx.hardware}
    write_json(run_dir / TRIAL_JSON, record)
    if record["invalid"]:
        log.info("skip set %s: invalid (%s), objective %.1f%s", skipped, record["invalid"], record["objective"],
                 "" if record["trial"] is not None else "; `-m` runs the search")
    else:
        log.info("skip %d layer(s) %s: agreement %.3f, predicted speedup %.3f at gamma %d%s", len(skipped), skipped,
                 record["agreement"], record["predicted_speedup"], record["best_gamma"],
                 "" if record["scored"] else " (scored before)")
    return float(record["objective"])


# ---- the sweep: checks before it, bo.json and the draft config after it ----------------------------

def check_sweep(config: DictConfig) -> None:
    """The sweeper settings this search needs, refused in one line before any trial."""
    sweeper = config.hydra.sweeper
    if "n_trials" not in sweeper:
        raise SpecsweepError("experiment=layer_skip_bo runs under hydra/sweeper=optuna (its default): "
                             f"not {sweeper.get('_target_')}")
    for key in ("n_trials", "n_jobs"):
        value = sweeper[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SpecsweepError(f"hydra.sweeper.{key}={value}: must be an integer >= 1")
    direction = str(getattr(sweeper.direction, "name", sweeper.direction))
    if direction.rsplit(".", 1)[-1] != "maximize":
        raise SpecsweepError(f"hydra.sweeper.direction={direction}: the objective is a speedup, use maximize")
    if sweeper.get("storage") is not None:
        raise SpecsweepError(f"hydra.sweeper.storage={sweeper.storage}: only the in-memory study (null) works with "
                             "the locked optuna 2.10.1 and SQLAlchemy 2 (its RDB storage fails its version check)")
    check_settings(config.bo)
    if config.bo.get("skip"):
        raise SpecsweepError("bo.skip: the sweeper sets it per trial; leave it empty in a multirun")


def _basic_launcher(config: DictConfig) -> bool:
    return str(config.hydra.launcher.get("_target_", "")).endswith("BasicLauncher")


def load_trials(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """(the trials' records in job order, the job dirs without one: {job, error})."""
    trials, failed = [], []
    for path in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        if (path / TRIAL_JSON).is_file():
            record = json.loads((path / TRIAL_JSON).read_text())
            trials.append({**record, "trial": int(path.name), "job_dir": str(path)})
        elif (path / ".hydra").is_dir():
            error = json.loads((path / ERROR).read_text()).get("error") if (path / ERROR).is_file() else "no trial.json"
            failed.append({"job": path.name, "error": error, "log": str(path)})
    return trials, failed


def with_evaluations(trials: list[dict]) -> list[dict]:
    """``evaluations`` on each trial: the distinct valid skip sets scored up to and including it
    (an invalid set costs none; a set seen before is not scored again)."""
    seen: set[tuple[int, ...]] = set()
    for record in trials:
        if not record["invalid"]:
            seen.add(tuple(record["skipped"]))
        record["evaluations"] = len(seen)
    return trials


def improvements(trials: list[dict]) -> list[dict]:
    """The trials where the best objective so far rose (the first of equals)."""
    rows, best = [], None
    for record in trials:
        if not record["invalid"] and (best is None or record["predicted_speedup"] > best):
            best = record["predicted_speedup"]
            rows.append(record)
    return rows


def _command(config: DictConfig) -> str:
    """The sweep's command line: its overrides, hydra.* ones (n_trials, ...) included."""
    hydra = [o for o in config.hydra.overrides.hydra if not o.startswith("hydra.mode=")]  # -m says it
    return " ".join(["python -m specsweep -m", *config.hydra.overrides.task, *hydra])


def summarize(config: DictConfig, sweep_dir: Path, wall_s: float | None = None, env: dict | None = None) -> dict | None:
    """bo.json and the best set's draft config in ``sweep_dir``; None where no trial left a record.
    ``env``: `environment()` as the sweep started (its code, lock and CPU); None: as it is now."""
    trials, failed = load_trials(sweep_dir)
    if not trials:
        return None
    trials = with_evaluations(trials)
    rising = improvements(trials)
    first = trials[0]
    sweeper = config.hydra.sweeper
    sampler = OmegaConf.to_container(sweeper.sampler, resolve=True)
    results_file = sweep_dir / "optimization_results.yaml"
    optimization_results = yaml.safe_load(results_file.read_text()) if results_file.is_file() else None
    result = {"method": "Optuna TPE through hydra-optuna-sweeper", "command": _command(config),
              "target": first["target"], "target_path": first["target_path"], "num_layers": first["num_layers"],
              "calibration": first["calibration"], "continuation_tokens": first["continuation_tokens"],
              "positions": first["positions"], "max_gamma": first["max_gamma"], "max_skip": first["max_skip"],
              "skip_prior": first["skip_prior"], "costs": first["costs"],
              "sweeper": {"n_trials": sweeper.n_trials, "n_jobs": sweeper.n_jobs, "sampler": sampler,
                          "study_name": sweeper.get("study_name")},
              "trials": [{k: v for k, v in t.items() if k not in ("target", "target_path", "calibration", "hardware",
                                                                    "positions", "continuation_tokens", "max_gamma",
                                                                    "max_skip", "skip_prior", "num_layers", "costs")}
                         for t in trials],
              "failed": failed, "best": None, "improvements": [
                  {k: r[k] for k in ("trial", "evaluations", "skipped", "agreement", "predicted_speedup")}
                  for r in rising],
              "evaluations": trials[-1]["evaluations"], "optimization_results": optimization_results,
              "draft_config": None, "installed": None, "hardware": first["hardware"],
              "environment": env or environment(), "wall_s": wall_s}
    if rising:
        best = rising[-1]
        result["best"] = {k: best[k] for k in ("trial", "evaluations", "skipped", "agreement", "cost_ratio",
                                               "best_gamma", "predicted_speedup")}
        result["draft_config"], result["installed"] = _write_draft(config, result, sweep_dir)
    write_json(sweep_dir / BO_JSON, result)
    return result


def _write_draft(config: DictConfig, result: dict, sweep_dir: Path) -> tuple[str, str | None]:
    best, name = result["best"], f"layer-skip-{result['target']}"
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    calibration = result["calibration"]
    notes = [f"Layer-skip draft for target={result['target']}, written by the layer-skip BO search on {when}:",
             f"  {result['command']}",
             (f"Optuna TPE (seed {result['sweeper']['sampler'].get('seed')}) over one value per layer (skipped "
              f"below bo.skip_prior={result['skip_prior']}), "
             f"{len(result['trials'])} trials ({result['evaluations']} skip sets scored), on {result['positions']} "
             f"continuation tokens of {len(calibration['task_ids'])} {calibration['dataset']} prompts from offset "
             f"{calibration['offset']}."),
             (f"Skips {len(best['skipped'])}/{result['num_layers']} layers: in-sample top-1 agreement "
             f"{best['agreement']:.3f}, predicted speedup {best['predicted_speedup']:.2f}x at "
             f"tree.depth={best['best_gamma']}; found at trial {best['trial']} (evaluation {best['evaluations']})."),
             f"Use: python -m specsweep draft={name} tree.depth={best['best_gamma']}"]
    text = draft_config_text(name, best["skipped"], notes)
    path = sweep_dir / f"{name}.yaml"
    write_atomic(path, text)
    installed = None
    if config.bo.install:
        installed = CONF_DRAFT / path.name
        write_atomic(installed, text)
    return str(path), None if installed is None else str(installed)


def _table(result: dict) -> Table:
    table = Table("trial", "evaluations", "k", "skipped layers", "agreement", "c", "γ", "speedup",
                  title=f"layer-skip BO on {result['target']}: each rise of the best predicted speedup "
                        f"({len(result['trials'])} trials, {result['evaluations']} sets scored, "
                        f"{result['positions']} calibration tokens)")
    by_trial = {t["trial"]: t for t in result["trials"]}
    for row in result["improvements"]:
        t = by_trial[row["trial"]]
        table.add_row(str(t["trial"]), str(t["evaluations"]), str(len(t["skipped"])), str(t["skipped"]),
                      f"{t['agreement']:.3f}", f"{t['cost_ratio']:.2f}", str(t["best_gamma"]),
                      f"{t['predicted_speedup']:.3f}")
    return table


class BOSummary(Callback):
    """experiment=layer_skip_bo's sweep summary (in place of the decoding sweeps'): checks the
    sweeper settings and loads the target before the first trial; writes bo.json and the draft
    config after the last."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.start, self.environment = time.perf_counter(), environment()
        try:
            check_sweep(config)
            if _basic_launcher(config):  # the trials run in this process: load once, now
                context(config)
            else:
                check_layers(config.bo, num_layers(config))
        except SpecsweepError as err:
            print(f"specsweep: error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        start = getattr(self, "start", None)
        result = summarize(config, sweep_dir, None if start is None else time.perf_counter() - start,
                           getattr(self, "environment", None)) if sweep_dir.is_dir() else None
        failed = [] if result is None else result["failed"]
        summary.failed_jobs[:] = [f["job"] for f in failed]
        if result is None:
            console.print(f"layer-skip BO: no trial left {TRIAL_JSON} in {sweep_dir}")
            return
        console.print(_table(result))
        for row in failed:
            console.print(f"[red]failed[/red] trial {row['job']}: {row['error']} (see {row['log']})")
        best = result["best"]
        if best is None:
            console.print("every trial's skip set was invalid (none or all layers skipped)")
        else:
            if best["predicted_speedup"] <= 1.0:
                console.print("no skip set tried is predicted to beat autoregressive decoding")
            console.print(f"best: skip {best['skipped']}, predicted speedup {best['predicted_speedup']:.3f} at "
                          f"tree.depth={best['best_gamma']} (trial {best['trial']}, evaluation {best['evaluations']}"
                          f" of {result['evaluations']}); draft config: {result['draft_config']}"
                          + (f" (installed as {result['installed']})" if result["installed"] else ""))
        console.print(f"every trial: {sweep_dir / BO_JSON}")
