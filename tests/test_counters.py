"""Acceptance counters on constructed cases, and the run-level metric definitions."""

from __future__ import annotations

import torch

from specsweep.backends.target import DynamicTarget
from specsweep.core.draft import Draft, Drafter
from specsweep.core.engine import Engine, SampleStats
from specsweep.core.sampling import Sampling
from specsweep.core.stats import summarize
from specsweep.drafters.model import ModelDrafter
from tests.conftest import tiny_llama

GREEDY = Sampling()


class AlwaysWrong(Drafter):
    """Proposes the target's greedy token + 1: every draft token is rejected."""

    def __init__(self, target):
        self.target = target

    def propose(self, ids, max_tokens):
        with torch.no_grad():
            best = self.target(ids).logits[0, -1].argmax()
        wrong = (best + 1) % self.target.config.vocab_size
        return Draft(wrong.repeat(max_tokens))


def test_draft_equal_to_target_accepts_everything():
    target = tiny_llama(0, init=0.5)
    stats = Engine(target, ModelDrafter(target, GREEDY), 4, GREEDY, 41, [], runner=DynamicTarget(target)).generate(torch.tensor([[1, 2, 3]])).stats
    # 41 tokens = 1 from the prefill + 8 steps of (4 accepted + 1 bonus)
    assert (stats.new_tokens, stats.verify_steps, stats.draft_tokens, stats.accepted_tokens) == (41, 8, 32, 32)
    metrics = summarize([stats])
    assert metrics["acceptance_rate"] == 1.0
    assert metrics["acceptance_length"] == 4.0 and metrics["tokens_per_target_forward"] == 5.0


def test_always_wrong_draft_accepts_nothing():
    target = tiny_llama(1)
    stats = Engine(target, AlwaysWrong(target), 3, GREEDY, 20, [], runner=DynamicTarget(target)).generate(torch.tensor([[5, 6]])).stats
    assert stats.accepted_tokens == 0 and stats.draft_tokens > 0
    assert stats.verify_steps == 19  # one token per target forward, as autoregressive decoding
    assert summarize([stats])["acceptance_rate"] == 0.0


def test_draft_never_runs_past_the_token_limit():
    target = tiny_llama(2, init=0.5)
    stats = Engine(target, ModelDrafter(target, GREEDY), 8, GREEDY, 5, [], runner=DynamicTarget(target)).generate(torch.tensor([[1]])).stats
    assert stats.new_tokens == 5 and stats.accepted_tokens == stats.draft_tokens == 3


def test_summary_uses_totals():
    a = SampleStats(new_tokens=10, draft_tokens=8, accepted_tokens=6, verify_steps=3, wall_s=1.0)
    b = SampleStats(new_tokens=30, draft_tokens=12, accepted_tokens=2, verify_steps=5, wall_s=3.0)
    m = summarize([a, b])
    assert m["tokens_per_s"] == 10.0  # 40 tokens / 4 s, not the mean of per-sample rates
    assert m["acceptance_rate"] == 8 / 20 and m["acceptance_length"] == 1.0
    assert m["target_forwards"] == 10
    assert summarize([SampleStats(new_tokens=3, verify_steps=2, wall_s=1.0)])["acceptance_rate"] is None
