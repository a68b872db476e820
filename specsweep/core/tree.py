"""Draft trees as data: shapes, paths, attention masks and position ids.

A tree of draft tokens hangs under a *root*: the last committed token, which is not a draft token.
Nodes are numbered ``0..n-1`` so that a parent always precedes its children (the constructors
here use breadth-first order);
``parents[i] == -1`` means node ``i`` is a child of the root. ``ranks[i]`` is the node's top-k rank
among its siblings (0 = the draft's most likely token), so a node is named by its *rank path*
from the root, as in Medusa's ``medusa_choices`` (``[0, 1]`` = 2nd candidate under the 1st one).

Two mask conventions are provided (see `Tree.attention_mask` and `Tree.verify_mask`):

* **prefix + tree**: the prefix already holds the root as its last token; the block is the
  ``n`` nodes. Node ``i`` sits at position ``prefix_len + depth_i - 1``.
* **cache + root + tree** (what the engine feeds the target): after a KV cache of ``cache_len``
  tokens comes the root (not cached yet) and then the ``n`` nodes, ``n + 1`` tokens in all. The root
  sits at ``cache_len``, node ``i`` at ``cache_len + depth_i``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from specsweep import CONF_DIR

SHAPES = ("chain", "binary", "kary", "medusa", "custom", "dynamic")

# Medusa's mc_sim_7b_63 ships as data next to the other tree configs (in the source checkout).
MEDUSA_TREE_FILE = CONF_DIR / "tree" / "medusa.yaml"


class TreeError(ValueError):
    """A malformed tree or tree config."""


def _require_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TreeError(f"tree {name} must be an integer, got {value!r}")
    if value < 1:
        raise TreeError(f"tree {name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class DynamicTreeSpec:
    """A tree the drafter grows anew each step (e.g. by draft confidence), within these limits.

    `Tree.from_config` returns this for ``shape: dynamic`` because no fixed tree exists up front.
    """

    budget: int  # most draft tokens (nodes) per step
    depth: int  # deepest level
    k: int  # most children per node

    def __post_init__(self) -> None:
        for name in ("budget", "depth", "k"):
            _require_positive(name, getattr(self, name))


@dataclass(frozen=True)
class SelfShaped:
    """The steps of a draft that shapes each one itself (Jacobi's block, lookahead's window and
    guesses, `Drafter.self_shaped`): at most ``nodes`` draft tokens, ``depth`` deep. ``largest`` is the
    largest step's tree (None: chains), what the exactness probe verifies."""

    nodes: int
    depth: int
    largest: Tree | None = None

    def __post_init__(self) -> None:
        for name in ("nodes", "depth"):
            _require_positive(name, getattr(self, name))


@dataclass(frozen=True)
class Tree:
    """An immutable, hashable draft tree; see the module docstring for the conventions."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...] | None = None  # None = number siblings 0, 1, ... in node order

    def __post_init__(self) -> None:
        parents = tuple(int(p) for p in self.parents)
        if not parents:
            raise TreeError("a tree needs at least one node")
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise TreeError(f"node {i} has parent {p}: parents must be -1 (root) or an earlier node")
        if self.ranks is None:
            seen: dict[int, int] = {}
            ranks = []
            for p in parents:
                ranks.append(seen.get(p, 0))
                seen[p] = ranks[-1] + 1
        else:
            ranks = [int(r) for r in self.ranks]
        if len(ranks) != len(parents):
            raise TreeError(f"{len(parents)} parents but {len(ranks)} ranks")
        if any(r < 0 for r in ranks):
            raise TreeError(f"ranks must be >= 0, got {ranks}")
        if len(set(zip(parents, ranks))) != len(parents):
            raise TreeError("duplicate node: two siblings share a rank")
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "ranks", tuple(ranks))

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def chain(cls, depth: int) -> Tree:
        """A single path of ``depth`` nodes (plain speculative decoding)."""
        depth = _require_positive("depth", depth)
        return cls(tuple(range(-1, depth - 1)), (0,) * depth)

    @classmethod
    def kary(cls, k: int, depth: int) -> Tree:
        """The full k-ary tree: every node has the draft's top-k tokens as children."""
        k, depth = _require_positive("k", k), _require_positive("depth", depth)
        levels = (itertools.product(range(k), repeat=d) for d in range(1, depth + 1))
        return cls.from_paths(itertools.chain.from_iterable(levels))

    @classmethod
    def binary(cls, depth: int) -> Tree:
        return cls.kary(2, depth)

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]]) -> Tree:
        """Build from rank paths (Medusa's format); every listed path is one node.

        Nodes are ordered by depth, then by the order given, so parents precede children.
        """
        listed: list[tuple[int, ...]] = []
        for path in paths:
            if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) or not path:
                raise TreeError(f"a tree path must be a non-empty list of ranks, got {path!r}")
            if any(isinstance(r, bool) or not isinstance(r, int) for r in path):
                raise TreeError(f"tree path ranks must be integers, got {list(path)}")
            listed.append(tuple(path))
        if not listed:
            raise TreeError("a tree needs at least one path")
        if len(set(listed)) != len(listed):
            duplicate = next(p for p in listed if listed.count(p) > 1)
            raise TreeError(f"duplicate tree path {list(duplicate)}")
        ordered = sorted(listed, key=len)  # stable: depth first, then the order given
        index_of = {p: i for i, p in enumerate(ordered)}
        for p in ordered:
            if len(p) > 1 and p[:-1] not in index_of:
                raise TreeError(f"orphan path {list(p)}: its prefix {list(p[:-1])} is not listed")
        parents = tuple(index_of[p[:-1]] if len(p) > 1 else -1 for p in ordered)
        return cls(parents, tuple(p[-1] for p in ordered))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Tree | DynamicTreeSpec:
        """Build from a ``conf/tree/*.yaml`` mapping; ``shape: dynamic`` gives a `DynamicTreeSpec`.

        Keys: ``shape`` (one of `SHAPES`), ``depth``, ``k``, ``paths`` (inline rank paths),
        ``path_file`` (YAML/JSON: a list of paths, or a mapping with a ``paths`` key; relative to
        the current directory), ``budget`` (dynamic). ``medusa`` without paths uses mc_sim_7b_63.
        """
        shape = _get(cfg, "shape")
        if shape == "chain":
            return cls.chain(_get(cfg, "depth"))
        if shape == "binary":
            return cls.kary(2, _get(cfg, "depth"))
        if shape == "kary":
            return cls.kary(_get(cfg, "k"), _get(cfg, "depth"))
        if shape in ("medusa", "custom"):
            default_file = MEDUSA_TREE_FILE if shape == "medusa" else None
            tree = cls.from_paths(_paths_from_config(cfg, default_file))
            depth = cfg.get("depth")  # optional: the shape's first `depth` levels only
            return tree.truncated(_require_positive("depth", depth)) if depth is not None else tree
        if shape == "dynamic":
            return DynamicTreeSpec(_get(cfg, "budget"), _get(cfg, "depth"), _get(cfg, "k"))
        raise TreeError(f"unknown tree shape {shape!r}; expected one of {', '.join(SHAPES)}")

    # ---- structure ----------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Depth of each node; the root's children have depth 1."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return tuple(depths)

    @cached_property
    def depth(self) -> int:
        return max(self.depths)

    def children(self, i: int) -> tuple[int, ...]:
        """Children of node ``i`` (``i = -1`` for the root), in node order."""
        return self.child_lists[i + 1]

    @cached_property
    def child_lists(self) -> tuple[tuple[int, ...], ...]:
        """``child_lists[i + 1]``: children of node i (index 0: the root's), computed once."""
        lists: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for j, p in enumerate(self.parents):
            lists[p + 1].append(j)
        return tuple(tuple(c) for c in lists)

    def truncated(self, depth: int) -> Tree:
        """The nodes up to ``depth`` (parents precede children, so indices stay consistent)."""
        if depth >= self.depth:
            return self
        keep = [i for i, d in enumerate(self.depths) if d <= depth]
        index = {old: new for new, old in enumerate(keep)}
        return Tree(tuple(index.get(self.parents[i], -1) for i in keep), tuple(self.ranks[i] for i in keep))

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, self.num_nodes - 1))

    def ancestry(self, i: int) -> tuple[int, ...]:
        """Node indices from the root's child down to ``i`` (inclusive)."""
        path = []
        while i >= 0:
            path.append(i)
            i = self.parents[i]
        return tuple(reversed(path))

    @cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """Root-to-leaf node-index paths, one per leaf, in leaf order."""
        has_child = set(self.parents)
        return tuple(self.ancestry(i) for i in range(self.num_nodes) if i not in has_child)

    @cached_property
    def rank_paths(self) -> tuple[tuple[int, ...], ...]:
        """Each node's rank path from the root (the inverse of `from_paths`)."""
        return tuple(tuple(self.ranks[j] for j in self.ancestry(i)) for i in range(self.num_nodes))

    # ---- tensors ------------------------------------------------------------------------------

    def ancestor_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[n, n]``: True where node i may attend node j (j is i or an ancestor of i)."""
        mask = torch.eye(self.num_nodes, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] |= mask[p]
        return mask.to(device)

    def attention_mask(
        self, prefix_len: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Additive ``[1, 1, n, prefix_len + n]`` mask for the n nodes after a prefix.

        The prefix ends with the root. Entries are 0 where allowed (the whole prefix, the node's
        ancestors and itself) and ``torch.finfo(dtype).min`` elsewhere.
        """
        return attention_mask_4d(after_cache(self.ancestor_mask(), prefix_len), dtype, device)

    def position_ids(self, prefix_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[1, n]`` positions for the nodes after a prefix ending with the root: prefix_len + depth - 1."""
        return (torch.tensor(self.depths, dtype=torch.long) + (prefix_len - 1)).unsqueeze(0).to(device)

    def verify_block(self) -> torch.Tensor:
        """Bool ``[n + 1, n + 1]``: what root + nodes see of each other. Row 0 is the root (itself);
        row ``1 + i`` is node ``i`` (the root, its ancestors and itself)."""
        n = self.num_nodes
        block = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        block[:, 0] = True
        block[1:, 1:] = self.ancestor_mask()
        return block

    def verify_mask(
        self, cache_len: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
        as_bool: bool = False,
    ) -> torch.Tensor:
        """Additive ``[1, 1, n + 1, cache_len + n + 1]`` mask for the block root + nodes after a KV cache:
        every row sees the cache, then its `verify_block` row."""
        return attention_mask_4d(after_cache(self.verify_block(), cache_len), dtype, device, as_bool)

    def verify_position_ids(self, cache_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[1, n + 1]`` positions of root + nodes after a KV cache: cache_len + [0, depths...]."""
        return (torch.tensor((0, *self.depths), dtype=torch.long) + cache_len).unsqueeze(0).to(device)


def causal_block(n: int) -> torch.Tensor:
    """Bool ``[n, n]``: a chain's tokens, each seeing itself and the ones before it."""
    return torch.ones(n, n, dtype=torch.bool).tril()


def after_cache(block: torch.Tensor, cache_len: int, width: int | None = None) -> torch.Tensor:
    """Bool ``[q, width]`` (default ``cache_len + k``) from a bool ``block`` [q, k] of what q new
    tokens see of each other: every row sees the ``cache_len`` cached keys, then its ``block`` row,
    then nothing (slots past the new tokens, e.g. a static cache's unused or stale ones)."""
    q, k = block.shape
    width = cache_len + k if width is None else width
    allowed = torch.zeros(q, width, dtype=torch.bool, device=block.device)
    allowed[:, :cache_len] = True
    allowed[:, cache_len:cache_len + k] = block
    return allowed


def attention_mask_4d(allowed: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None = None,
                      as_bool: bool = False) -> torch.Tensor:
    """``[1, 1, q, kv]`` mask from a bool ``[q, kv]`` (True = may attend): additive float (0 / dtype
    min; right with sdpa and eager), or the bool itself (what NPU SDPA wants; right with sdpa only).
    It is made where ``allowed`` is, then moved to ``device`` (None: stays)."""
    if as_bool:
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    # DictConfig.get() turns a mandatory `???` into None; name it instead.
    if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key):
        raise TreeError(f"tree `{key}` is required but unset (???): set tree.{key}=...")
    return cfg.get(key)


def _paths_from_config(cfg: Mapping[str, Any], default_file: Path | None) -> list:
    paths, path_file = _get(cfg, "paths"), _get(cfg, "path_file")
    if paths is not None and path_file is not None:
        raise TreeError("give a tree either inline `paths` or a `path_file`, not both")
    if paths is None:
        path_file = path_file or default_file
        if path_file is None:
            raise TreeError(f"tree shape {_get(cfg, 'shape')!r} needs `paths` or `path_file`")
        paths = load_paths(path_file)
    # OmegaConf ListConfigs are Sequences already; plain lists make error messages readable.
    return [list(p) if isinstance(p, Sequence) and not isinstance(p, str) else p for p in paths]


def load_paths(path_file: str | Path) -> list:
    """Rank paths from a YAML or JSON file: a list of paths, or a mapping with a ``paths`` key."""
    path = Path(path_file)
    if not path.is_file():
        raise TreeError(f"tree path_file not found: {path.resolve()}")
    data = yaml.safe_load(path.read_text())  # JSON is valid YAML
    if isinstance(data, Mapping):
        data = data.get("paths")
    if not isinstance(data, list):
        raise TreeError(f"{path}: expected a list of rank paths (or a mapping with `paths`)")
    return data


#: what a run drafts per step
StepShape = Tree | DynamicTreeSpec | SelfShaped


def draft_nodes(shape: StepShape) -> int:
    """The most draft tokens one step of ``shape`` holds (the root not counted)."""
    if isinstance(shape, SelfShaped):
        return shape.nodes
    return shape.budget if isinstance(shape, DynamicTreeSpec) else shape.num_nodes
