"""The decode loop: prefill, draft, verify in one target forward, accept, roll the KV cache back.

``Engine.generate`` times exactly what seed 000 times: from the prompt ids entering the function to
its return at the token limit or EOS, the draft included, the device synchronised before each clock
read; detokenisation is the caller's business.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specsweep.core.draft import Draft, Drafter
from specsweep.core.draft_length import LengthPolicy
from specsweep.core.runner import Runner
from specsweep.core.sampling import Sampling, greedy_tokens, sample
from specsweep.core.tree import DynamicTreeSpec, SelfShaped, StepShape, Tree, draft_nodes
from specsweep.core.verify import verify_greedy, verify_stochastic, verify_tree_greedy, verify_tree_stochastic


@dataclass
class SampleStats:
    """Counters of one generation (definitions in the README)."""

    new_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0  # target forwards after the prefill
    wall_s: float = 0.0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)
    # per step, for per-position acceptance and the predicted speedup (specsweep.core.stats): the draft
    # tokens sent (a tree's nodes) and the draft's depth (a chain's length); 0 where nothing was drafted
    drafted_per_step: list[int] = field(default_factory=list)
    depth_per_step: list[int] = field(default_factory=list)
    off_top_steps: int = 0  # tree steps whose accepted path takes a child of sibling rank > 0


@dataclass
class Generation:
    output_ids: list[int]
    stats: SampleStats
    # autoregressive runs only (else None): per output token, the target's top-1 minus top-2 logit and
    # its top-1 logit where it chose that token, for the losslessness audit's tie test (specsweep.app.audit)
    margins: list[float] | None = None
    top_logits: list[float] | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


class Engine:
    """Speculative decoding of one target with one drafter (``drafter=None``: autoregressive).

    ``shape`` is the draft per step: an int (a chain of that many tokens), a `Tree`, a
    `DynamicTreeSpec` or `SelfShaped` (the drafter shapes each step). Trees are verified in one
    target forward with a tree attention mask.
    ``runner`` holds the target's KV cache and runs its forwards (`specsweep.backends.target`).
    ``length_policy`` (`draft.length_policy: cost`) cuts each chain proposal to the length that pays
    for its verify cost, and times the verify steps it runs (`specsweep.core.draft_length`).
    """

    def __init__(
        self,
        target,
        drafter: Drafter | None,
        shape: int | StepShape,
        sampling: Sampling,
        max_new_tokens: int,
        eos_token_ids: list[int],
        generator: torch.Generator | None = None,
        *,
        runner: Runner,
        length_policy: LengthPolicy | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"decode.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.target, self.drafter = target, drafter
        if drafter is None:
            self.shape, self.max_draft = None, 0  # autoregressive: nothing to draft
        else:
            self.shape = Tree.chain(shape) if isinstance(shape, int) else shape
            self.max_draft = draft_nodes(self.shape)
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.eos = set(eos_token_ids)
        self.device = target.device
        self.generator = generator  # shared with a sampling drafter: one random stream per run
        self.runner = runner  # the hardware profile's (specsweep.backends.target.make_runner)
        self.length_policy = length_policy if drafter is not None else None
        self.reads_hidden = drafter is not None and drafter.reads_hidden

    def _choose(self, logits: torch.Tensor) -> int:
        if self.sampling.greedy:
            return int(greedy_tokens(logits))
        return int(sample(self.sampling.probabilities(logits), self.generator))

    def _propose(self, ids: torch.Tensor, room: int) -> Draft:
        """The drafter's proposal for this step, never deeper than ``room`` tokens."""
        shape = self.shape
        if isinstance(shape, SelfShaped):
            return self.drafter.propose(ids, min(shape.depth, room))
        if isinstance(shape, Tree) and shape.is_chain:
            return self.drafter.propose(ids, min(shape.num_nodes, room))
        if isinstance(shape, DynamicTreeSpec):
            return self.drafter.propose_tree(ids, DynamicTreeSpec(shape.budget, min(shape.depth, room), shape.k))
        return self.drafter.propose_tree(ids, shape.truncated(room))

    def _verify_chain(self, logits: torch.Tensor, draft: Draft) -> tuple[list[int], int]:
        if self.sampling.greedy:
            accepted, token = verify_greedy(logits, draft.tokens)
        else:
            p = self.sampling.probabilities(logits)
            accepted, token = verify_stochastic(p, draft.tokens, draft.probs, self.generator)
        return list(range(accepted)), token

    def _verify_tree(self, logits: torch.Tensor, draft: Draft) -> tuple[list[int], int]:
        if self.sampling.greedy:
            return verify_tree_greedy(logits, draft.tokens, draft.tree)
        return verify_tree_stochastic(self.sampling.probabilities(logits), draft.tokens, draft.tree, self.generator)

    def _score(self, root: torch.Tensor, draft: Draft | None, cache_len: int) -> torch.Tensor:
        """One target forward over root + draft -> logits [n + 1, V] (row 0 scores the root)."""
        if draft is None or draft.tokens.numel() == 0:
            return self.runner.score(root, None, cache_len)
        return self.runner.score(torch.cat([root, draft.tokens.view(1, -1)], dim=1), draft.tree, cache_len)

    @torch.inference_mode()
    def generate(self, prompt_ids: torch.Tensor) -> Generation:
        """``prompt_ids`` [1, P] long on the target's device -> the new tokens and their counters."""
        stats, clock, sync = SampleStats(), time.perf_counter, lambda: synchronize(self.device)
        limit, prompt_len = self.max_new_tokens, prompt_ids.shape[1]
        # committed tokens live in one preallocated buffer: no per-step concatenation
        ids = torch.empty(1, prompt_len + limit + 1, dtype=torch.long, device=self.device)
        ids[:, :prompt_len] = prompt_ids
        policy = self.length_policy
        if policy is not None and policy.costs.needs_calibration:  # no cached curve: before the timer
            policy.costs.calibrate(self.runner, prompt_ids, sync)
            policy.costs.save()
        sync()
        start = clock()

        first = self.runner.prefill(prompt_ids, limit + self.max_draft)
        token = self._choose(first)
        tops = [first.topk(2).values] if self.drafter is None else None  # read after the clock stops
        output = [token]
        ids[0, prompt_len] = token
        if self.drafter is not None:
            self.drafter.reset(prompt_ids)
            if self.reads_hidden:
                self.drafter.on_hidden(self.runner.hidden()[-1])
        sync()
        stats.prefill_s = clock() - start

        while len(output) < limit and token not in self.eos:
            length = prompt_len + len(output)
            t0 = clock()
            # never draft past the limit: every accepted token is then kept (EOS aside)
            room = limit - len(output) - 1
            draft = self._propose(ids[:, :length], room) if self.drafter is not None and room > 0 else None
            if policy is not None and draft is not None:
                draft = policy.cut(draft)
            n = 0 if draft is None else draft.tokens.numel()
            sync()
            t1 = clock()
            cache_len = length - 1  # the root (last committed token) is not in the target's cache yet
            logits = self._score(ids[:, cache_len:length], draft, cache_len)
            if n:
                path, token = (self._verify_chain if draft.tree is None else self._verify_tree)(logits, draft)
                # keep the root's and the accepted nodes' KV, in sequence order; drop the rest
                self.runner.keep(cache_len + 1, [cache_len + 1 + i for i in path])
                new = draft.tokens[path].tolist() + [token] if path else [token]
            else:
                path, token = [], self._choose(logits[-1])
                new = [token]
                if tops is not None:
                    tops.append(logits[-1].topk(2).values)
            accepted = len(path)
            if draft is not None:
                # the root's and the accepted nodes' logits (a chain's are the first rows: no copy)
                scored = logits[:accepted + 1] if draft.tree is None else logits[[0] + [1 + i for i in path]]
                self.drafter.on_scored(torch.cat([ids[0, cache_len:length], draft.tokens[path]]), scored)
                if n:
                    self.drafter.on_verified(draft, logits, path)
            if self.reads_hidden:  # where the target chose the next root: the deepest accepted node's row
                self.drafter.on_hidden(self.runner.hidden()[1 + path[-1] if path else 0])
            for i, t in enumerate(new):  # stop at the first EOS, even inside the accepted draft
                if t in self.eos:
                    new, accepted = new[: i + 1], min(accepted, i + 1)
                    break
            new = new[: limit - len(output)]
            token = new[-1]
            ids[0, length:length + len(new)] = torch.tensor(new, device=self.device)
            output.extend(new)
            sync()
            t2 = clock()
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            stats.verify_steps += 1
            stats.draft_tokens += n
            stats.accepted_tokens += accepted
            stats.accepted_per_step.append(accepted)
            stats.drafted_per_step.append(n)
            if n and draft.tree is not None:  # python ints only: the tree's depth is cached
                stats.depth_per_step.append(draft.tree.depth)
                stats.off_top_steps += any(draft.tree.ranks[i] for i in path)
            else:
                stats.depth_per_step.append(n)
            if policy is not None:
                policy.observe(draft, len(path), t2 - t1)

        sync()
        stats.wall_s = clock() - start
        stats.new_tokens = len(output)
        return Generation(output, stats, *_margins(tops))


def _margins(tops: list[torch.Tensor] | None) -> tuple[list[float] | None, list[float] | None]:
    """Top-2 logit values per step -> (top-1 minus top-2, top-1), exact in float64."""
    if tops is None:
        return None, None
    top = torch.stack(tops).double().cpu()
    return (top[:, 0] - top[:, 1]).tolist(), top[:, 0].tolist()
