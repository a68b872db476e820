"""Tree-derived index and mask tensors, built once per (tree, prefix length, device).

Every transformer layer of a verification step attends with the same tree, so the engine (and
the benchmark) pays for these tensors once, not per call.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from specsweep.core.tree import Tree, after_cache, causal_block


class PathPlan(NamedTuple):
    """One root-to-leaf path as an independent sequence: its nodes, its keys, its causal mask."""

    nodes: torch.Tensor  # [l] node indices (query rows, output rows)
    keys: torch.Tensor  # [prefix_len + l] key rows: the whole prefix, then the path's nodes
    causal: torch.Tensor  # bool [l, prefix_len + l], aligned bottom-right


@lru_cache(maxsize=128)
def tree_mask(tree: Tree, prefix_len: int, device: torch.device) -> torch.Tensor:
    """Bool [n, prefix_len + n]: the whole prefix, then each node's ancestors and itself."""
    return after_cache(tree.ancestor_mask(), prefix_len).to(device)


@lru_cache(maxsize=128)
def ancestor_mask(tree: Tree, device: torch.device) -> torch.Tensor:
    return tree.ancestor_mask(device)


@lru_cache(maxsize=128)
def path_plans(tree: Tree, prefix_len: int, device: torch.device) -> tuple[PathPlan, ...]:
    plans = []
    for path in tree.paths:
        nodes = torch.tensor(path, dtype=torch.long)
        keys = torch.cat([torch.arange(prefix_len), nodes + prefix_len])
        causal = after_cache(causal_block(len(path)), prefix_len)
        plans.append(PathPlan(nodes.to(device), keys.to(device), causal.to(device)))
    return tuple(plans)
