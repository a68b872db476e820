"""Greedy speculative decoding reproduces the target's own greedy output, token for token."""

from __future__ import annotations

import pytest
import torch

from specsweep.backends.target import DynamicTarget
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling, greedy_tokens
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.drafters.recycling import TokenRecycling
from tests.conftest import perturbed_copy, tiny_llama

GREEDY = Sampling()


def autoregressive(target, prompt, limit, eos=()):
    return Engine(target, None, 0, GREEDY, limit, list(eos), runner=DynamicTarget(target)).generate(prompt).output_ids


def hf_greedy(target, prompt, limit, eos=()):
    out = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=limit, min_new_tokens=0,
                          eos_token_id=list(eos) or None, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def prompt_for(seed, vocab, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_break_ties_as_argmax_does(device, dtype):
    """HF generate takes argmax: on ties (frequent in bf16) the first maximal index, which
    ``max(-1).indices`` must pick too, on every row length and position of the tie."""
    logits = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0)).to(dtype)
    for row in range(64):
        first, second = sorted(torch.randperm(49152, generator=torch.Generator().manual_seed(row))[:2].tolist())
        logits[row, first] = logits[row, second] = 10.0 + row % 3
    logits = logits.to(device)
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert torch.equal(greedy_tokens(logits[:5]), logits[:5].argmax(-1))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_model_draft_matches_autoregressive_and_hf(seed, gamma):
    target = tiny_llama(seed)
    draft = perturbed_copy(target, noise=0.5, seed=seed + 100)  # agrees often, not always
    prompt = prompt_for(seed, target.config.vocab_size)
    for limit in (1, 7, 40):
        expected = autoregressive(target, prompt, limit)
        assert expected == hf_greedy(target, prompt, limit)
        result = Engine(target, ModelDrafter(draft, GREEDY), gamma, GREEDY, limit, [], runner=DynamicTarget(target)).generate(prompt)
        assert result.output_ids == expected
        assert result.stats.new_tokens == len(expected) == limit


def test_unrelated_draft_is_still_lossless():
    target, draft = tiny_llama(3), tiny_llama(4)
    prompt = prompt_for(3, 96)
    expected = autoregressive(target, prompt, 50)
    result = Engine(target, ModelDrafter(draft, GREEDY), 4, GREEDY, 50, [], runner=DynamicTarget(target)).generate(prompt)
    assert result.output_ids == expected
    assert result.stats.accepted_tokens < result.stats.draft_tokens


@pytest.mark.parametrize("gamma", [2, 5])
def test_eos_in_the_middle_stops_like_hf(gamma):
    target = tiny_llama(5)
    draft = perturbed_copy(target, noise=0.3, seed=7)
    prompt = prompt_for(5, 96)
    free = autoregressive(target, prompt, 60)
    eos = free[len(free) // 2]  # a token the target emits mid-way: generation must stop at its first use
    expected = free[: free.index(eos) + 1]
    assert autoregressive(target, prompt, 60, [eos]) == expected == hf_greedy(target, prompt, 60, [eos])
    for drafter in (ModelDrafter(draft, GREEDY), PromptLookupDrafter(3, 1)):
        assert Engine(target, drafter, gamma, GREEDY, 60, [eos], runner=DynamicTarget(target)).generate(prompt).output_ids == expected


@pytest.mark.parametrize("gamma", [1, 4, 10])
def test_prompt_lookup_matches_autoregressive(gamma):
    target = tiny_llama(6, vocab=16)  # small vocab: repeats, so lookups hit
    prompt = prompt_for(6, 16, length=30)
    expected = autoregressive(target, prompt, 80)
    result = Engine(target, PromptLookupDrafter(3, 1), gamma, GREEDY, 80, [], runner=DynamicTarget(target)).generate(prompt)
    assert result.output_ids == expected
    assert result.stats.accepted_tokens > 0


@pytest.mark.parametrize("gamma, branches, context", [(1, 1, 1), (3, 1, 1), (12, 1, 1), (3, 3, 1), (5, 1, 3), (3, 3, 2)])
def test_token_recycling_matches_autoregressive(gamma, branches, context):
    target = tiny_llama(6, vocab=48)
    drafter = PromptLookupDrafter(4, 1, weak_ngram=3, weak_tokens=1,
                                  recycling=TokenRecycling(gamma, branches=branches, context=context))
    engine = Engine(target, drafter, gamma, GREEDY, 60, [], runner=DynamicTarget(target))
    for seed in (6, 7):  # the recycled table carries over to the second prompt
        prompt = prompt_for(seed, 48, length=20)
        result = engine.generate(prompt)
        assert result.output_ids == autoregressive(target, prompt, 60) == hf_greedy(target, prompt, 60, [])
    assert drafter.recycling.table and result.stats.accepted_tokens > 0


def test_engine_is_reusable_across_prompts():
    target = tiny_llama(8)
    engine = Engine(target, ModelDrafter(perturbed_copy(target, 0.5, 9), GREEDY), 4, GREEDY, 30, [], runner=DynamicTarget(target))
    for seed in range(3):
        prompt = prompt_for(seed, 96, length=5 + 7 * seed)
        assert engine.generate(prompt).output_ids == autoregressive(target, prompt, 30)
