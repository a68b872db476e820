"""Draft kinds by config: ``draft.kind`` -> a Drafter built against the loaded target."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from specsweep.drafters.base import Draft, Drafter
from specsweep.errors import SpecsweepError
from specsweep.hardware import Hardware
from specsweep.sampling import Sampling

KINDS = ("none", "prompt_lookup", "model")


@dataclass
class BuildContext:
    """What a drafter may need from the run: the target, its tokenizer, decode settings, devices."""

    target: torch.nn.Module
    tokenizer: object
    sampling: Sampling
    generator: torch.Generator
    hardware: Hardware
    model_dirs: dict[str, Path]  # config setting (e.g. "draft.path") -> resolved local dir


def model_paths(cfg, prefix: str = "draft") -> dict[str, str]:
    """Every model a draft config needs, as {setting: path}, so paths are checked before any loading."""
    if cfg.kind not in KINDS:
        raise SpecsweepError(f"draft.kind={cfg.kind}: unknown draft kind; known: {', '.join(KINDS)}")
    return {f"{prefix}.path": cfg.path} if cfg.kind == "model" else {}


def build_drafter(cfg, ctx: BuildContext, prefix: str = "draft") -> Drafter | None:
    if cfg.kind == "none":
        return None
    if cfg.kind == "prompt_lookup":
        from specsweep.drafters.prompt_lookup import PromptLookupDrafter

        try:
            return PromptLookupDrafter(max_ngram=cfg.max_ngram, min_ngram=cfg.min_ngram)
        except ValueError as err:
            raise SpecsweepError(f"{prefix}: {err}") from None
    if cfg.kind == "model":
        from specsweep.drafters.model import ModelDrafter
        from specsweep.models import check_same_tokenizer, load_model, load_tokenizer

        model_dir = ctx.model_dirs[f"{prefix}.path"]
        check_same_tokenizer(ctx.tokenizer, load_tokenizer(model_dir), f"{prefix}.path={cfg.path}")
        model = load_model(model_dir, ctx.hardware.dtype, ctx.hardware.device, ctx.hardware.attn_implementation)
        return ModelDrafter(model, ctx.sampling, ctx.generator)
    raise SpecsweepError(f"draft.kind={cfg.kind}: unknown draft kind; known: {', '.join(KINDS)}")


__all__ = ["BuildContext", "Draft", "Drafter", "build_drafter", "model_paths", "KINDS"]
