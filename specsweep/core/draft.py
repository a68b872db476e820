"""The drafter interface: propose a chain or fill a draft tree, hear how many the target kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from specsweep.core.tree import DynamicTreeSpec, SelfShaped, Tree
from specsweep.errors import SpecsweepError


@dataclass
class Draft:
    """Proposed continuation of the committed sequence: a chain, or a tree when ``tree`` is set."""

    tokens: torch.Tensor  # [n] long, n may be 0 (nothing to propose: the step decodes one token)
    probs: torch.Tensor | None = None  # chains only: [n, V] distributions the tokens were sampled from
    tree: Tree | None = None  # the drafted tree (node i holds tokens[i]); None = a chain
    # what produced it (e.g. prompt lookup's "long_match"): the cost length policy estimates
    # acceptance per kind (specsweep/core/draft_length.py); None = the drafter's only kind
    kind: str | None = None


class Drafter:
    """One draft source. The engine owns the loop; a drafter only proposes and listens.

    A run first calls ``prepare(prompts)``. Per prompt the engine calls ``reset(prompt_ids)``, then
    repeatedly ``propose(ids, k)`` (chains) or ``propose_tree(ids, shape)`` (trees), then
    ``on_scored`` with the target's logits along the accepted path. ``ids`` [1, L] is every
    committed token (prompt + output so far); its last token is the root the draft continues. After
    a step the committed sequence grows by the accepted draft tokens plus the target's own next token.

    A draft kind is a subclass plus one YAML in ``conf/draft/`` whose ``_target_`` names it. The
    class says what it can fill (``fills``) and which of its config keys hold model dirs
    (``model_paths``); the app reads both before anything loads (`specsweep.drafters`). ``build``
    makes the drafter from the YAML's other keys.
    """

    #: the draft shapes it can fill: "chain", "tree" (a fixed shape, `propose_tree`), "dynamic"
    #: (a `DynamicTreeSpec`, grown by draft probability), "self" (it shapes every step itself:
    #: `self_shaped`)
    fills: tuple[str, ...] = ("chain",)
    #: config keys holding a model (a local dir or hub id) the app resolves and loads before the build
    #: (the loaded model: ``ctx.model(key)``)
    model_paths: tuple[str, ...] = ()
    #: True: the engine hands it the target's final hidden state where the target chose the root
    #: (``on_hidden``), for drafts that read it (trained heads)
    reads_hidden: bool = False

    @classmethod
    def build(cls, ctx, **params) -> Drafter:
        """The drafter of one config: ``params`` are its YAML's keys (all but ``_target_``, ``name``
        and ``length_policy``, which are the app's), ``ctx`` what it may need of the run
        (`specsweep.drafters.BuildContext`: target, tokenizer, sampling, generator, hardware, cache
        dir, loaded draft models). By default the constructor takes the keys themselves."""
        return cls(**params)

    @classmethod
    def self_shaped(cls, params: dict) -> SelfShaped | None:
        """Drafts that shape every step themselves (``fills = ("self",)``: Jacobi's block, lookahead's
        window and guesses) say from their config's keys how large a step can get; ``tree=`` then
        plays no part. Their ``propose(ids, max_depth)`` returns a chain or a `Draft` with its tree."""
        return None

    def prepare(self, prompts: list[list[int]]) -> None:
        """Every prompt of the run, before the first is decoded."""

    def reset(self, prompt_ids: torch.Tensor) -> None:
        pass

    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        raise NotImplementedError

    def propose_tree(self, ids: torch.Tensor, shape: Tree | DynamicTreeSpec) -> Draft:
        raise SpecsweepError(f"{type(self).__name__} drafts chains only: use tree=chain")

    def on_scored(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        """The target's logits [m, V] after each of ``inputs`` [m]: the root and the accepted draft
        tokens of the step just verified (their contexts were all the target's own tokens)."""

    def on_verified(self, draft: Draft, logits: torch.Tensor, path: list[int]) -> None:
        """The target's logits [n + 1, V] for the root and every node of ``draft`` (rejected ones
        too) and the accepted path (node indices): for drafts that iterate on the target's own
        predictions (Jacobi, lookahead). Called after every step that sent a draft."""

    def on_hidden(self, hidden: torch.Tensor) -> None:
        """``reads_hidden`` drafts only: the target's final hidden state [H] (its output layer's input)
        at the position whose logits chose the current root, after the prefill and after each verify.
        The next proposal continues the root from it."""

    def counters(self) -> dict:
        """Draft-specific counters for metrics.json (e.g. per-level acceptance of a cascade)."""
        return {}


class ComposedDrafter(Drafter):
    """A draft made of other drafts (a cascade's levels, a union's two sources): every part hears
    what the engine tells the whole. The whole shapes the steps from its parts' chains, so a part
    that shapes its own steps (Jacobi, lookahead: it needs every row of the drafts it proposed)
    cannot be one."""

    def __init__(self, parts: list[Drafter]):
        for part in parts:
            if "self" in type(part).fills:
                raise SpecsweepError(f"{type(part).__name__} shapes its own steps: it cannot be part of "
                                     f"{type(self).__name__}")
        self.parts = list(parts)
        self.reads_hidden = any(part.reads_hidden for part in self.parts)

    def prepare(self, prompts: list[list[int]]) -> None:
        for part in self.parts:
            part.prepare(prompts)

    def reset(self, prompt_ids: torch.Tensor) -> None:
        for part in self.parts:
            part.reset(prompt_ids)

    def on_scored(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        for part in self.parts:
            part.on_scored(inputs, logits)

    def on_hidden(self, hidden: torch.Tensor) -> None:
        for part in self.parts:
            if part.reads_hidden:
                part.on_hidden(hidden)


def fill_tree(tree: Tree, candidates: Callable[[list[int], int], list[int]], device: torch.device) -> Draft:
    """Fill a fixed tree shape from ranked next-token candidates (bigram, prompt lookup).

    ``candidates(path, k)`` ranks up to k next tokens after the committed sequence followed by the
    draft tokens ``path`` (root's child down to the node; empty at the root). A node whose rank has no
    candidate is dropped with its subtree, so the drafted tree is a sub-tree of the shape.
    """
    if not isinstance(tree, Tree):
        raise SpecsweepError("tree=dynamic grows trees by draft probability: use a model draft, or a fixed tree")
    kept: dict[int, int] = {}  # shape node -> drafted node
    parents, ranks, tokens, paths = [], [], [], {-1: []}
    for node in range(-1, tree.num_nodes):
        children = tree.children(node)
        if not children or node not in paths:
            continue
        ranked = candidates(paths[node], max(tree.ranks[c] for c in children) + 1)
        for child in children:
            rank = tree.ranks[child]
            if rank < len(ranked):
                kept[child] = len(tokens)
                parents.append(-1 if node < 0 else kept[node])
                ranks.append(rank)
                tokens.append(ranked[rank])
                paths[child] = paths[node] + [ranked[rank]]
    if not tokens:
        return Draft(torch.empty(0, dtype=torch.long, device=device))
    return Draft(torch.tensor(tokens, dtype=torch.long, device=device), tree=Tree(tuple(parents), tuple(ranks)))


#: expand(nodes, tokens, parents, depth) -> the logits [len(nodes), V] after each of ``nodes`` (all at
#: ``depth`` >= 1; ``tokens``/``parents`` describe every node so far): a drafter's next-token scores
Expand = Callable[[list[int], list[int], list[int], int], torch.Tensor]


def fill_levels(root_logits: torch.Tensor, tree: Tree, expand: Expand, device: torch.device) -> Draft:
    """Fill a fixed tree shape level by level: each node holds its parent's ranked choice (rank r =
    the r-th likeliest token), the internal nodes of a level expanded in one ``expand`` call."""
    tokens = [0] * tree.num_nodes
    logits_of = {-1: root_logits}
    by_depth: dict[int, list[int]] = {}
    for node, d in enumerate(tree.depths):
        by_depth.setdefault(d, []).append(node)
    for depth in range(1, tree.depth + 1):
        level = by_depth[depth]
        for parent in dict.fromkeys(tree.parents[n] for n in level):
            children = tree.children(parent)
            top = logits_of[parent].topk(max(tree.ranks[c] for c in children) + 1).indices.tolist()
            for child in children:
                tokens[child] = top[tree.ranks[child]]
        internal = [n for n in level if tree.children(n)]
        if internal:
            logits_of.update(zip(internal, expand(internal, tokens, list(tree.parents), depth)))
    return Draft(torch.tensor(tokens, dtype=torch.long, device=device), tree=tree)


def grow_tree(root_logits: torch.Tensor, spec: DynamicTreeSpec, expand: Expand,
              device: torch.device) -> tuple[Draft, list[int]]:
    """Grow a dynamic tree (EAGLE-2): per level, expand the k candidates of highest cumulative draft
    log-probability, each adding its top k; keep the ``budget`` best candidates overall. -> the draft
    and the candidate number of each of its nodes (``expand`` saw candidate numbers)."""
    tokens, parents, depths, scores, ranks = [], [], [], [], []

    def add_children(parent: int, logits: torch.Tensor, depth: int) -> None:
        logp, top = logits.float().log_softmax(-1).topk(spec.k)
        base = scores[parent] if parent >= 0 else 0.0
        for rank, (lp, token) in enumerate(zip(logp.tolist(), top.tolist())):
            tokens.append(token)
            parents.append(parent)
            depths.append(depth)
            scores.append(base + lp)
            ranks.append(rank)

    add_children(-1, root_logits, 1)
    frontier = list(range(len(tokens)))
    for depth in range(2, spec.depth + 1):
        frontier = sorted(frontier, key=lambda c: -scores[c])[:spec.k]
        rows = expand(frontier, tokens, parents, depth - 1)
        first_new = len(tokens)
        for node, row in zip(frontier, rows):
            add_children(node, row, depth)
        frontier = list(range(first_new, len(tokens)))
    # a child never scores above its parent, so the best `budget` (ties: shallower first) keep every ancestor
    chosen = sorted(sorted(range(len(tokens)), key=lambda c: (-scores[c], depths[c]))[:spec.budget],
                    key=lambda c: (depths[c], c))
    index = {c: i for i, c in enumerate(chosen)}
    tree = Tree(tuple(index[parents[c]] if parents[c] >= 0 else -1 for c in chosen), tuple(ranks[c] for c in chosen))
    return Draft(torch.tensor([tokens[c] for c in chosen], dtype=torch.long, device=device), tree=tree), chosen
