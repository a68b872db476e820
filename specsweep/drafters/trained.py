"""Drafting from trained heads (`specsweep.drafters.heads`): ``draft=medusa`` and ``draft=speculator``.

Per step the heads read the target's final hidden state where it chose the root (the engine hands
it over: ``reads_hidden``) and propose the next ``heads`` tokens: a chain (greedy, or sampled from
the heads' distributions q so that speculative sampling keeps the target's distribution), a fixed
tree (each node's children are its top-ranked tokens: Medusa heads rank by depth alone, a speculator
stage per parent) or a dynamic tree grown by cumulative draft probability. No target forward is
added: a step costs the heads' small products only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specsweep.backends.prepack import pack_weight, packed_linear
from specsweep.core.draft import Draft, Drafter, fill_levels, grow_tree
from specsweep.core.sampling import Sampling, greedy_tokens, sample
from specsweep.core.tree import DynamicTreeSpec, Tree
from specsweep.drafters.heads import load_checkpoint, output_rows, target_fingerprint
from specsweep.errors import SpecsweepError


class _Output:
    """The draft vocabulary's rows of the target's output layer: h [N, H] -> logits [N, V'] (packed
    once for oneDNN when the target runs prepacked bf16 products)."""

    def __init__(self, rows: torch.Tensor, packed: bool):
        self.packed = pack_weight(rows) if packed else None
        self.rows = None if packed else rows

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return packed_linear(h, self.packed) if self.packed is not None else h @ self.rows.T


class HeadsDrafter(Drafter):
    """Shared by both kinds: the checkpoint, the vocabulary map, chains and trees; a kind supplies
    ``_chain`` (a chain's tokens, each taken by ``choose`` from a head's logits), ``_first`` (the
    first head's logits) and ``_children`` (draft-vocabulary logits after tree nodes)."""

    fills = ("chain", "tree", "dynamic")
    reads_hidden = True
    kind: str = ""

    @classmethod
    def build(cls, ctx, *, heads, checkpoint) -> HeadsDrafter:
        name = Path(str(ctx.target.name_or_path)).name
        network, vocab, record = load_checkpoint(Path(checkpoint), cls.kind, target_fingerprint(ctx.target), name)
        record = {"checkpoint": str(checkpoint), "trained_heads": network.heads, "vocab": int(vocab.numel()),
                  "trained_top1": record.get("metrics", {}).get("top1")}
        return cls(ctx.target, network, vocab, heads, ctx.sampling, ctx.generator,
                   packed=ctx.hardware.prepack_linear, record=record)

    def __init__(self, target, network, vocab: torch.Tensor, heads: int, sampling: Sampling,
                 generator: torch.Generator | None = None, *, packed: bool = False, record: dict | None = None):
        if not isinstance(heads, int) or isinstance(heads, bool) or not 1 <= heads <= network.heads:
            raise SpecsweepError(f"draft.heads={heads}: the checkpoint has {network.heads} trained heads "
                                 f"(use 1..{network.heads})")
        device, dtype = target.device, target.dtype
        self.network = network.to(device=device, dtype=dtype)
        self.heads, self.sampling, self.generator = heads, sampling, generator
        self.vocab = vocab.to(device)  # draft vocabulary index -> token id
        self.vocab_size = target.config.vocab_size
        self.output = _Output(output_rows(target, vocab), packed and dtype == torch.bfloat16 and device.type == "cpu")
        self.embed = target.get_input_embeddings()
        self.record = record or {}  # what metrics.json's draft_counters say of the checkpoint
        self.hidden: torch.Tensor | None = None

    def on_hidden(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden

    def counters(self) -> dict:
        """The checkpoint and its heads' held-out top-1 agreement from training (per head used)."""
        top1 = self.record.get("trained_top1")
        return {**self.record, "heads_used": self.heads, "trained_top1": top1[:self.heads] if top1 else None}

    def _full(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., V'] -> over the target's vocabulary (-inf elsewhere)."""
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.vocab] = logits
        return full

    # ---- chains -------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        n = min(max_tokens, self.heads)
        if n <= 0:
            return Draft(ids.new_empty(0))
        probs = None if self.sampling.greedy else []
        tokens = list(self._chain(ids[0, -1], n, lambda logits: self._choose(logits, probs)))
        return Draft(torch.stack(tokens), torch.stack(probs) if probs else None, kind=self.kind)

    def _choose(self, logits: torch.Tensor, probs: list | None) -> torch.Tensor:
        """The token a chain takes from one head's logits [V']: greedy, or sampled from q, which is
        kept in ``probs`` (the verifier needs it)."""
        if probs is None:
            return self.vocab[greedy_tokens(logits)]
        q = self.sampling.probabilities(self._full(logits))
        probs.append(q)
        return sample(q, self.generator)

    # ---- trees --------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose_tree(self, ids: torch.Tensor, shape: Tree | DynamicTreeSpec) -> Draft:
        if isinstance(shape, Tree) and shape.is_chain:
            return self.propose(ids, shape.num_nodes)
        device = ids.device
        root_logits = self._full(self._first(ids[0, -1]))
        if isinstance(shape, DynamicTreeSpec):
            spec = DynamicTreeSpec(shape.budget, min(shape.depth, self.heads), shape.k)
            return grow_tree(root_logits, spec, self._expand, device)[0]
        return fill_levels(root_logits, shape.truncated(self.heads), self._expand, device)

    def _expand(self, nodes: list[int], tokens: list[int], parents: list[int], depth: int) -> torch.Tensor:
        """Full-vocabulary logits after each of ``nodes`` (at ``depth``; draft tokens are token ids)."""
        return self._full(self._children(nodes, tokens, parents, depth))


class MedusaDrafter(HeadsDrafter):
    """``draft=medusa``: head k's logits depend on the hidden state only, so one product serves a
    whole chain and every tree level."""

    kind = "medusa"

    def _logits(self, n: int) -> torch.Tensor:
        return self.output(self.network.states(self.hidden[None], n)[0])  # [n, V']

    def _chain(self, root, n, choose):
        for row in self._logits(n):
            yield choose(row)

    def _first(self, root: torch.Tensor) -> torch.Tensor:
        self.level_logits = self._logits(self.heads)
        return self.level_logits[0]

    def _children(self, nodes, tokens, parents, depth) -> torch.Tensor:
        return self.level_logits[depth].expand(len(nodes), -1)


class SpeculatorDrafter(HeadsDrafter):
    """``draft=speculator``: stage k continues stage k-1's state with the token it chose."""

    kind = "speculator"

    def _chain(self, root, n, choose):
        state, token = self.hidden[None], root
        for k in range(n):
            state = self.network.step(k, state, self.embed(token.view(1)))
            token = choose(self.output(state)[0])
            yield token

    def _first(self, root: torch.Tensor) -> torch.Tensor:
        self.node_state = {-1: self.network.step(0, self.hidden[None], self.embed(root.view(1)))}
        return self.output(self.node_state[-1])[0]

    def _children(self, nodes, tokens, parents, depth) -> torch.Tensor:
        """Stage ``depth`` over the nodes at ``depth``: each parent's state and the node's token."""
        state = torch.cat([self.node_state[parents[n]] for n in nodes])
        token_ids = torch.tensor([tokens[n] for n in nodes], device=state.device)
        states = self.network.step(depth, state, self.embed(token_ids))
        for n, s in zip(nodes, states):
            self.node_state[n] = s[None]
        return self.output(states)
