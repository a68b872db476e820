"""Tree attention: the n draft-tree nodes attend the prefix plus their own ancestors.

Every implementation has one signature, ``attend(q, k, v, tree, prefix_len) -> out``:

* ``q``: the tree nodes' queries, ``[B, Hq, n, D]``;
* ``k``, ``v``: prefix then tree nodes, ``[B, Hkv, prefix_len + n, D]``, ``Hq`` a multiple of
  ``Hkv`` (grouped-query attention: query head h uses kv head ``h // (Hq // Hkv)``);
* ``out``: ``[B, Hq, n, D]``; node i sees the whole prefix (which ends with the root), its
  ancestors and itself (`specsweep.core.tree.Tree.attention_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from specsweep.core.tree import Tree
from specsweep.tools.tree_attention import flex, masked_sdpa, sequential, split

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Tree, int], torch.Tensor]


def _always_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class TreeAttention:
    name: str
    attend: Attend
    available: Callable[[torch.device], tuple[bool, str]] = _always_available  # (ok, reason if not)
    summary: str = ""


IMPLEMENTATIONS: dict[str, TreeAttention] = {
    "sequential": TreeAttention("sequential", sequential.attend, summary="one SDPA call per root-to-leaf path"),
    "masked_sdpa": TreeAttention("masked_sdpa", masked_sdpa.attend, summary="one SDPA call, tree bool mask"),
    "split": TreeAttention("split", split.attend, summary="unmasked prefix + masked tree, merged by log-sum-exp"),
    "flex": TreeAttention("flex", flex.attend, flex.available, summary="compiled FlexAttention, tree BlockMask"),
}


def get(name: str) -> TreeAttention:
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown tree attention {name!r}; expected one of {', '.join(IMPLEMENTATIONS)}") from None
