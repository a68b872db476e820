"""Draft kinds by config: ``draft.kind`` -> a Drafter built against the loaded target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specsweep.backends.hardware import Hardware
from specsweep.core.draft import Draft, Drafter
from specsweep.core.sampling import Sampling
from specsweep.core.tree import DynamicTreeSpec, Tree
from specsweep.errors import SpecsweepError

KINDS = ("none", "prompt_lookup", "model", "bigram", "layer_skip", "cascade")
FIXED_TREE_KINDS = ("none", "prompt_lookup", "model", "bigram", "layer_skip")
DYNAMIC_TREE_KINDS = ("none", "model", "layer_skip")  # growing by draft probability needs a model


@dataclass
class BuildContext:
    """What a drafter may need from the run: the target, its tokenizer, decode settings, devices."""

    target: torch.nn.Module
    tokenizer: object
    sampling: Sampling
    generator: torch.Generator
    hardware: Hardware
    load_model: Callable[[str], torch.nn.Module]  # config setting (e.g. "draft.path") -> the loaded draft model
    cache_dir: Path


def _check_kind(cfg, prefix: str) -> None:
    if cfg.get("kind") not in KINDS:
        raise SpecsweepError(f"{prefix}.kind={cfg.get('kind')}: unknown draft kind; known: {', '.join(KINDS)}")


def check_tree_support(cfg, shape: Tree | DynamicTreeSpec) -> None:
    """Refuse a draft/tree pairing the draft cannot fill, before anything is loaded."""
    _check_kind(cfg, "draft")
    if isinstance(shape, Tree) and shape.is_chain:
        return
    kinds = DYNAMIC_TREE_KINDS if isinstance(shape, DynamicTreeSpec) else FIXED_TREE_KINDS
    if cfg.kind not in kinds:
        tree = "dynamic trees" if isinstance(shape, DynamicTreeSpec) else "trees"
        raise SpecsweepError(f"draft={cfg.name} cannot fill {tree}; drafts that can: {', '.join(kinds[1:])}")
    if cfg.get("recycle_tokens"):
        raise SpecsweepError(f"draft.recycle_tokens={cfg.recycle_tokens} extends chains only: use tree=chain, "
                             "or draft.recycle_tokens=0")


def model_paths(cfg, prefix: str = "draft") -> dict[str, str]:
    """Every model a draft config needs, as {setting: path}, so paths are checked before any loading."""
    _check_kind(cfg, prefix)
    if cfg.kind == "model":
        return {f"{prefix}.path": cfg.path}
    if cfg.kind == "cascade":
        paths = {}
        for i, level in enumerate(cfg.levels):
            paths.update(model_paths(level, f"{prefix}.levels.{i}"))
        return paths
    return {}


def build_drafter(cfg, ctx: BuildContext, prefix: str = "draft") -> Drafter | None:
    _check_kind(cfg, prefix)
    try:
        return _build(cfg, ctx, prefix)
    except ValueError as err:  # constructor argument checks
        raise SpecsweepError(f"{prefix}: {err}") from None


def _build(cfg, ctx: BuildContext, prefix: str) -> Drafter | None:
    if cfg.kind == "none":
        return None
    if cfg.kind == "prompt_lookup":
        from specsweep.drafters.datastore import Datastore
        from specsweep.drafters.prompt_lookup import PromptLookupDrafter

        store = cfg.get("datastore")
        store = Datastore(store, cfg.get("datastore_ngram", 4), cfg.max_ngram) if store else None
        return PromptLookupDrafter(cfg.max_ngram, cfg.min_ngram, cfg.get("weak_ngram", 1), cfg.get("weak_tokens"),
                                   cfg.get("recycle_tokens", 0), cfg.get("recycle_branches", 1),
                                   cfg.get("recycle_context", 1), store, cfg.get("datastore_tokens", 15))
    if cfg.kind == "model":
        from specsweep.drafters.model import ModelDrafter

        model = ctx.load_model(f"{prefix}.path")
        return ModelDrafter(model, ctx.sampling, ctx.generator, cfg.get("confidence_threshold"),
                            bool_masks=ctx.hardware.bool_masks)
    if cfg.kind == "bigram":
        from specsweep.drafters import bigram

        table = (bigram.load_csdrafting_json(cfg.table) if cfg.get("table")
                 else bigram.build_table(ctx.tokenizer, cfg.corpus, ctx.cache_dir))
        return bigram.BigramDrafter(table, len(ctx.tokenizer))
    if cfg.kind == "layer_skip":
        from specsweep.drafters.layer_skip import layer_skip_drafter

        return layer_skip_drafter(ctx.target, cfg, ctx.sampling, ctx.generator, ctx.hardware.bool_masks)
    if cfg.kind == "cascade":
        from specsweep.drafters.cascade import CascadeDrafter, check_k_matrix

        check_k_matrix(cfg.k_matrix, len(cfg.levels))  # before any level loads a model
        levels = [build_drafter(level, ctx, f"{prefix}.levels.{i}") for i, level in enumerate(cfg.levels)]
        if any(level is None for level in levels):
            raise SpecsweepError(f"{prefix}.levels: kind none cannot be a cascade level")
        return CascadeDrafter(levels, [level.name for level in cfg.levels], cfg.k_matrix)
    raise AssertionError(cfg.kind)


__all__ = ["BuildContext", "Draft", "Drafter", "build_drafter", "check_tree_support", "model_paths", "KINDS"]
