"""Linear layers with their weights reordered once for oneDNN (bf16 on CPUs with AMX / AVX512-BF16).

torch's bf16 CPU linear reorders the weight into oneDNN's blocked layout on every call. For a
one-token decode step that reorder costs about as much as the product itself (a 1536x576 layer:
108 us plain, 64 us packed, on this repo's CPU), so the target's linear layers run about twice as fast
with the weight reordered once at load time, as inductor's freezing pass does for compiled models.
For up to 32 rows, which covers every decode and verify forward of `hardware=cpu-bf16`, the packed
product has the same bits as the plain one (tests/test_prepack.py). A long prefill can round
differently, because oneDNN blocks many rows differently. A packed model's greedy output can
therefore differ from the unpacked model's. Every strategy of a run shares the one packed model, and
tests/test_bf16.py checks the row invariance that losslessness needs on it. Layers with a bias are
left alone: oneDNN adds the bias before rounding to bf16 and torch after (Llama has no biases).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from specsweep.errors import SpecsweepError


def check_supported(device: torch.device, dtype: torch.dtype, setting: str = "hardware.prepack_linear=true") -> None:
    """Refuse ``setting``, which needs oneDNN's bf16 products, where they do not run."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise SpecsweepError(f"{setting} is for bfloat16 on the CPU, not {dtype} on {device.type}")
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise SpecsweepError(f"{setting}: this torch/CPU has no oneDNN bf16 support")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [out, in] reordered once into oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W^T for a weight packed by `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, self.packed_weight)


def prepack_linears(model: nn.Module) -> int:
    """Give every bias-free nn.Linear of ``model`` a packed copy of its weight and a forward using it.
    The plain weight is released (a tied output layer keeps the embedding's). Returns the count."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None and not hasattr(module, "packed_weight"):
            module.packed_weight = pack_weight(module.weight)
            module.weight = None  # the packed copy replaces it: no doubled memory
            module.forward = types.MethodType(_packed_forward, module)
            count += 1
    return count
