"""A draft that is a causal LM with its own KV cache (llama-160m, a 7b sibling, a layer-skipped target)."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache

from specsweep.backends.cache import compact, truncate
from specsweep.backends.row_invariant import plan_kwargs
from specsweep.core.draft import Draft, Drafter, fill_levels, grow_tree
from specsweep.core.sampling import Sampling, greedy_tokens, sample
from specsweep.core.tree import DynamicTreeSpec, Tree, attention_mask_4d
from specsweep.core.verify import verify_greedy


class ModelDrafter(Drafter):
    """Autoregressive drafting, one token per draft forward.

    The drafter remembers which tokens its KV cache holds and, before each proposal, keeps only the
    longest prefix shared with the sequence it is asked to continue: rollback after verification,
    and continuing sequences that a cascade extended tentatively, are the same operation.
    ``confidence_threshold`` stops a proposal early when the draft's top probability falls under it
    (Draft & Verify's adaptive draft length).

    Config (``conf/draft/model.yaml``): ``path``, the model (a local dir or hub id, loaded by the app
    and refused unless it shares the target's tokenizer), and ``confidence_threshold``.
    """

    fills = ("chain", "tree", "dynamic")
    model_paths = ("path",)

    @classmethod
    def build(cls, ctx, *, path, confidence_threshold) -> ModelDrafter:
        del path  # resolved and loaded by the app (model_paths): ctx.model("path")
        return cls(ctx.model("path"), ctx.sampling, ctx.generator, confidence_threshold,
                   bool_masks=ctx.hardware.bool_masks)

    def __init__(self, model, sampling: Sampling, generator: torch.Generator | None = None,
                 confidence_threshold: float | None = None, new_cache: Callable[[], DynamicCache] | None = None,
                 bool_masks: bool = False):
        if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
        self.model, self.sampling, self.generator = model, sampling, generator
        self.stochastic = not sampling.greedy  # sample from q and return it (else greedy, one-hot q)
        self.confidence_threshold = confidence_threshold
        self.new_cache = new_cache or (lambda: DynamicCache(config=model.config))
        self.bool_masks = bool_masks  # tree masks as bool (NPU SDPA) instead of additive float

    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.cache = self.new_cache()
        self.cached = prompt_ids.new_empty(0)  # the token ids whose KV the cache holds, in order
        self.last_tree = None  # (tree, tokens, cache slots) of the tree drafted last, if any

    def _keep_accepted_branch(self, ids: torch.Tensor) -> None:
        """After a tree draft: move the KV of the fed nodes the target accepted (the branch ``ids``
        continues along) into sequence order behind the root; the rest of the tree is dropped."""
        tree, tokens, slots = self.last_tree
        self.last_tree = None
        root_len, branch, node = self.cached.numel(), [], -1
        for token in ids[0, root_len:].tolist():
            child = next((c for c in tree.children(node) if tokens[c] == token), None)
            if child is None or child not in slots:
                break
            branch.append(child)
            node = child
        compact(self.cache, root_len, [slots[c] for c in branch])
        self.cached = ids[0, :root_len + len(branch)]

    def _sync(self, ids: torch.Tensor) -> torch.Tensor:
        """Drop cached KV that ``ids`` does not share; return the tokens still to feed (at least one)."""
        if self.last_tree is not None:
            self._keep_accepted_branch(ids)
        n = min(self.cached.numel(), ids.shape[1] - 1)
        differ = (self.cached[:n] != ids[0, :n]).nonzero()
        if differ.numel():
            n = int(differ[0])
        truncate(self.cache, n)
        self.cached = self.cached[:n]
        return ids[:, n:]

    def _forward(self, feed: torch.Tensor, keep: int) -> torch.Tensor:
        plan = plan_kwargs(self.model, cache_len=self.cache.get_seq_length())  # row_invariant: once per forward
        logits = self.model(input_ids=feed, past_key_values=self.cache, use_cache=True, logits_to_keep=keep,
                            **plan).logits
        self.cached = torch.cat([self.cached, feed[0]])
        return logits[0]

    @torch.inference_mode()
    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        if max_tokens <= 0:
            return Draft(ids.new_empty(0))
        feed = self._sync(ids)
        tokens, probs = [], []
        for _ in range(max_tokens):
            logits = self._forward(feed, 1)[-1]
            if self.stochastic:
                q = self.sampling.probabilities(logits)
                token = sample(q, self.generator)
            else:
                q, token = None, greedy_tokens(logits)
            if self.confidence_threshold is not None:
                top = (q if q is not None else logits.float().softmax(-1)).max()
                if top < self.confidence_threshold:
                    break
            tokens.append(token)
            if q is not None:
                probs.append(q)
            feed = token.view(1, 1)
        if not tokens:
            return Draft(ids.new_empty(0))
        return Draft(torch.stack(tokens), torch.stack(probs) if probs else None)

    @torch.inference_mode()
    def verify_greedy(self, ids: torch.Tensor, proposal: torch.Tensor) -> list[int]:
        """Speculative decoding inside the draft (a cascade level): this model's greedy continuation
        of ``ids``, checked against ``proposal`` in one forward -> accepted prefix + its own next token."""
        feed = torch.cat([self._sync(ids), proposal.view(1, -1)], dim=1)
        logits = self._forward(feed, proposal.numel() + 1)
        accepted, token = verify_greedy(logits, proposal)
        return proposal[:accepted].tolist() + [token]

    # ---- trees: level by level, all nodes of a level in one forward ------------------------------

    @torch.inference_mode()
    def propose_tree(self, ids: torch.Tensor, shape: Tree | DynamicTreeSpec) -> Draft:
        """Fill a fixed shape with each parent's top-k tokens, or grow a dynamic tree (EAGLE-2:
        expand the k likeliest nodes per level, keep the ``budget`` nodes of highest cumulative draft
        probability). Children are deterministic top-k choices (one-hot q at temperature > 0)."""
        if isinstance(shape, Tree) and shape.is_chain:
            return self.propose(ids, shape.num_nodes)
        root_logits = self._forward(self._sync(ids), 1)[-1]
        self.root_len = ids.shape[1]
        self.slots: dict[int, int] = {}  # tree node -> its position in the draft cache
        draft = (self._grow(root_logits, shape, ids.device) if isinstance(shape, DynamicTreeSpec)
                 else fill_levels(root_logits, shape, self._expand, ids.device))
        self.last_tree = (draft.tree, draft.tokens.tolist(), self.slots)  # the next _sync keeps the accepted branch's KV
        return draft

    def _expand(self, nodes: list[int], tokens: list[int], parents: list[int], depth: int) -> torch.Tensor:
        """One draft forward over ``nodes`` (all at ``depth``): each sees the prefix, its ancestors, itself."""
        cache_len = self.cache.get_seq_length()
        allowed = torch.zeros(len(nodes), cache_len + len(nodes), dtype=torch.bool)
        allowed[:, :self.root_len] = True
        for row, node in enumerate(nodes):
            allowed[row, cache_len + row] = True
            ancestor = parents[node]
            while ancestor >= 0:
                allowed[row, self.slots[ancestor]] = True
                ancestor = parents[ancestor]
            self.slots[node] = cache_len + row
        device = self.model.device
        mask = attention_mask_4d(allowed, self.model.dtype, device, self.bool_masks)
        position = torch.full((1, len(nodes)), self.root_len - 1 + depth, dtype=torch.long, device=device)
        feed = torch.tensor([[tokens[n] for n in nodes]], dtype=torch.long, device=device)
        out = self.model(input_ids=feed, attention_mask=mask, position_ids=position,
                         past_key_values=self.cache, use_cache=True, **plan_kwargs(self.model, mask))
        return out.logits[0]

    def _grow(self, root_logits: torch.Tensor, spec: DynamicTreeSpec, device) -> Draft:
        draft, chosen = grow_tree(root_logits, spec, self._expand, device)
        # the cache slots refer to candidate numbers; keep them for the chosen nodes under their new index
        index = {c: i for i, c in enumerate(chosen)}
        self.slots = {index[c]: slot for c, slot in self.slots.items() if c in index}
        return draft
