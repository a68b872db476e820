"""Self-speculative drafting: the target itself with layers skipped (LayerSkip / Draft & Verify).

The draft is a view of the target that runs only the kept decoder layers; every weight is the
target's own (no second copy). Its KV cache holds the kept layers only, addressed by their original
layer indices.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from specsweep.core.sampling import Sampling
from specsweep.drafters.model import ModelDrafter
from specsweep.errors import SpecsweepError


def kept_layers(num_layers: int, exit_layer: int | None = None, skip_layers=None) -> list[int]:
    """Layer indices the draft runs: the first ``exit_layer`` (early exit) or all but ``skip_layers``."""
    if (exit_layer is None) == (skip_layers is None):
        raise SpecsweepError("layer-skip: set exactly one of draft.exit_layer and draft.skip_layers")
    if exit_layer is not None:
        if not 1 <= exit_layer < num_layers:
            raise SpecsweepError(f"draft.exit_layer={exit_layer}: out of range, the target has {num_layers} layers "
                                 f"(use 1..{num_layers - 1})")
        return list(range(exit_layer))
    skip = sorted(set(int(i) for i in skip_layers))
    if any(not 0 <= i < num_layers for i in skip):
        raise SpecsweepError(f"draft.skip_layers={list(skip_layers)}: indices must be in 0..{num_layers - 1}")
    if not skip or len(skip) == num_layers:
        raise SpecsweepError(f"draft.skip_layers={list(skip_layers)}: skip at least one layer and keep at least one")
    return [i for i in range(num_layers) if i not in skip]


class LayerMapCache(DynamicCache):
    """A DynamicCache for a subset of layers: original layer index -> dense slot."""

    def __init__(self, kept: list[int]):
        super().__init__()
        self.slot = {layer: i for i, layer in enumerate(kept)}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, self.slot[layer_idx], *args, **kwargs)


def skip_view(model: torch.nn.Module, kept: list[int]) -> torch.nn.Module:
    """A shallow copy of a decoder-only HF model whose layer list holds only ``kept`` (shared modules)."""
    inner = copy.copy(model.model)
    inner._modules = dict(inner._modules)  # own module table, shared submodules
    inner.layers = torch.nn.ModuleList([model.model.layers[i] for i in kept])
    view = copy.copy(model)
    view._modules = dict(view._modules)
    view.model = inner
    return view


class LayerSkipDrafter(ModelDrafter):
    """A `ModelDrafter` over a view of ``target`` that runs only the kept layers: the first
    ``exit_layer`` (early exit) or all but ``skip_layers`` (exactly one of them is set)."""

    model_paths = ()  # the target is the model

    @classmethod
    def build(cls, ctx, *, exit_layer, skip_layers, confidence_threshold) -> LayerSkipDrafter:
        return cls(ctx.target, ctx.sampling, ctx.generator, exit_layer=exit_layer, skip_layers=skip_layers,
                   confidence_threshold=confidence_threshold, bool_masks=ctx.hardware.bool_masks)

    def __init__(self, target, sampling: Sampling, generator=None, *, exit_layer: int | None, skip_layers,
                 confidence_threshold: float | None = None, bool_masks: bool = False):
        if not hasattr(target, "model") or not hasattr(target.model, "layers"):
            raise SpecsweepError(f"draft=layer-skip: {type(target).__name__} has no model.layers to skip")
        self.kept = kept_layers(len(target.model.layers), exit_layer, skip_layers)
        super().__init__(skip_view(target, self.kept), sampling, generator, confidence_threshold,
                         new_cache=lambda: LayerMapCache(self.kept), bool_masks=bool_masks)
