"""PyTorch FlexAttention with the tree as a mask_mod (a BlockMask skips fully masked blocks).

FlexAttention is only fast compiled: each new shape compiles a fused kernel once (seconds on
CPU, excluded from timings by warm-up). Uncompiled it materialises the full score matrix.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from specsweep.backends.hardware import missing_cxx_compiler
from specsweep.core.tree import Tree
from specsweep.tools.tree_attention.layout import ancestor_mask

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = None

# Every (batch, heads, length) is a new static shape; the default limit (8) would silently
# drop a benchmark sweep back to eager mode.
_RECOMPILE_LIMIT = 256


def available(device: torch.device) -> tuple[bool, str]:
    if flex_attention is None:
        return False, f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if device.type not in ("cpu", "cuda"):
        return False, f"FlexAttention needs torch.compile, which does not support {device.type}"
    if device.type == "cpu" and (compiler := missing_cxx_compiler()):
        return False, f"torch.compile on CPU needs a C++ compiler ({compiler} not found)"
    return True, ""


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: Tree, prefix_len: int) -> torch.Tensor:
    mask = block_mask(tree, prefix_len, q.device)
    return _compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@lru_cache(maxsize=128)
def block_mask(tree: Tree, prefix_len: int, device: torch.device) -> BlockMask:
    """The tree mask over [prefix + tree] keys for the n tree queries, as a BlockMask."""
    ancestors = ancestor_mask(tree, device)

    def tree_mask_mod(batch, head, q_idx, kv_idx):
        tree_kv = kv_idx - prefix_len
        return (tree_kv < 0) | ancestors[q_idx, tree_kv.clamp(min=0)]

    n = tree.num_nodes
    return create_block_mask(tree_mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=prefix_len + n, device=device)


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)
