"""Linear layers with their weights reordered once for oneDNN (bf16 on CPUs with AMX / AVX512-BF16),
and the row blocking that keeps a row's bits independent of how many rows share the product.

torch's bf16 CPU linear reorders the weight into oneDNN's blocked layout on every call. For a
one-token decode step that reorder costs about as much as the product itself (a 1536x576 layer:
108 us plain, 64 us packed, on an Intel AMX CPU), so the target's linear layers run about twice as
fast with the weight reordered once at load time, as inductor's freezing pass does for compiled
models. Layers with a bias are left alone: oneDNN adds the bias before rounding to bf16 and torch
after (Llama has no biases).

Row blocking. Greedy speculative decoding is token for token the target's own only if a token
scored in an n-row verify gets the bits of the same token scored in a one-row step. Whether a
oneDNN product keeps them depends on the kernel the CPU runs: with AMX every shape of the embedded
target does for up to 32 rows; with the AVX512-BF16 kernels (AMD Zen 4/5, or
``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``) the 1536->576 product rounds differently from 4 rows on,
and with emulated bf16 (``AVX512_CORE``) every shape does. Padding a product's rows to a multiple of
a small block (2 on both, measured; 16 too) restores one-row bits for every row count up to 32. So
each packed weight carries a row block, chosen per shape on the machine at load time
(`choose_row_block`): the smallest of `ROW_BLOCKS` (then the largest verify) whose padded products
keep one-row bits for every row count up to the largest verify. The whole forward is then checked
by `specsweep.backends.exactness`.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from specsweep.errors import SpecsweepError

ROW_BLOCKS = (1, 2, 4, 8, 16)  # tried in this order before the last resort, one block as wide as the largest verify


def check_supported(device: torch.device, dtype: torch.dtype, setting: str = "hardware.prepack_linear=true") -> None:
    """Refuse ``setting``, which needs oneDNN's bf16 products, where they do not run."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise SpecsweepError(f"{setting} is for bfloat16 on the CPU, not {dtype} on {device.type}")
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise SpecsweepError(f"{setting}: this torch/CPU has no oneDNN bf16 support")
    try:  # the ISA oneDNN may use can be capped below bf16 (ONEDNN_MAX_CPU_ISA)
        pack_weight(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError as err:
        raise SpecsweepError(f"{setting}: oneDNN cannot pack bf16 weights on this CPU "
                             f"({str(err).splitlines()[0]}); use hardware=cpu (fp32)") from None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [out, in] reordered once into oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, row_block: int = 1) -> torch.Tensor:
    """x [..., n, in] @ W^T for a weight packed by `pack_weight`, the n rows padded with zeros to a
    multiple of ``row_block`` (the padding rows' outputs are dropped)."""
    n = x.shape[-2]
    pad = -n % row_block
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad))
    out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
    return out[..., :n, :] if pad else out


def keeps_row_bits(packed: torch.Tensor, in_features: int, max_rows: int, row_block: int, seed: int = 0) -> bool:
    """Whether every row of an n-row product (n = 2..max_rows, padded to ``row_block``) has the bits
    of the same row multiplied alone, on random bf16 inputs."""
    x = torch.randn(max_rows, in_features, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    alone = torch.cat([packed_linear(x[i:i + 1], packed, row_block) for i in range(max_rows)])
    return all(torch.equal(packed_linear(x[:n], packed, row_block), alone[:n]) for n in range(2, max_rows + 1))


_chosen: dict[tuple, int] = {}  # (in, out, max_rows, threads) -> row block: a process's kernels are fixed but for threads


def choose_row_block(packed: torch.Tensor, in_features: int, out_features: int, max_rows: int) -> int:
    """The smallest row block that keeps one-row bits for up to ``max_rows`` rows on this machine
    (`keeps_row_bits` on this packed weight; decided once per shape), else ``max_rows`` (every
    verify product then has one shape; `specsweep.backends.exactness` proves or refuses the whole forward)."""
    key = (in_features, out_features, max_rows, torch.get_num_threads())
    if key not in _chosen:
        blocks = [b for b in ROW_BLOCKS if b < max_rows]
        _chosen[key] = next((b for b in blocks if keeps_row_bits(packed, in_features, max_rows, b)), max_rows)
    return _chosen[key]


def row_block_for(packed: torch.Tensor, in_features: int, out_features: int, row_block: int | str,
                  max_rows: int | None) -> int:
    """`hardware.row_block` for one packed weight: an int as given, ``auto`` chosen on this machine
    for verifies of up to ``max_rows`` rows."""
    if row_block != "auto":
        return int(row_block)
    return 1 if max_rows is None or max_rows < 2 else choose_row_block(packed, in_features, out_features, max_rows)


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, self.packed_weight, self.row_block)


def prepack_linears(model: nn.Module, row_block: int | str = 1, max_rows: int | None = None) -> int:
    """Give every bias-free nn.Linear of ``model`` a packed copy of its weight and a forward using it.
    The plain weight is released (a tied output layer keeps the embedding's). ``row_block``: rows
    of every product padded to a multiple of it, or ``auto`` (`row_block_for`, with ``max_rows``
    the largest verify forward; kept as ``model.row_blocking`` for products fused from its linears,
    `specsweep.backends.lean`). Returns the count."""
    model.row_blocking = (row_block, max_rows)
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None and not hasattr(module, "packed_weight"):
            module.packed_weight = pack_weight(module.weight)
            module.row_block = row_block_for(module.packed_weight, module.in_features, module.out_features,
                                             row_block, max_rows)
            module.weight = None  # the packed copy replaces it: no doubled memory
            module.forward = types.MethodType(_packed_forward, module)
            count += 1
    return count


def row_blocks(model: nn.Module) -> dict[str, int]:
    """The row block of each packed linear shape of ``model`` ("in->out": block), for the results."""
    return {f"{m.in_features}->{m.out_features}": m.row_block for m in model.modules()
            if hasattr(m, "packed_weight") and hasattr(m, "row_block")}
