"""The draft zoo (bigram, layer-skip, cascade): lossless, and each with its clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from specsweep.backends.target import DynamicTarget
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.drafters.bigram import BigramDrafter, count_bigrams, load_csdrafting_json
from specsweep.drafters.cascade import CascadeDrafter
from specsweep.drafters.layer_skip import kept_layers, layer_skip_drafter
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.errors import SpecsweepError
from tests.conftest import perturbed_copy, tiny_llama

GREEDY = Sampling()


def autoregressive(target, prompt, limit):
    return Engine(target, None, 0, GREEDY, limit, [], runner=DynamicTarget(target)).generate(prompt).output_ids


def table_from_target(target, vocab):
    """A bigram table from the target's own greedy continuations: a draft that is often right."""
    sequences = [autoregressive(target, torch.tensor([[t]]), 30) for t in range(0, vocab, 3)]
    return count_bigrams(sequences, vocab)


def test_count_bigrams_ranks_successors_by_frequency():
    table = count_bigrams([[1, 2, 1, 2, 1, 3], [1, 2, 0]], vocab_size=4, top_k=2)
    assert table.successors[1].tolist() == [2, 3]
    assert torch.allclose(table.probs[1], torch.tensor([0.75, 0.25]))
    assert table.successors[3].tolist() == [3, 3] and table.probs[3].sum() == 0  # never followed: itself
    with pytest.raises(SpecsweepError, match="empty corpus"):
        count_bigrams([[5]], vocab_size=8)


def test_bigram_draft_is_lossless_and_accepts():
    target = tiny_llama(20, vocab=32, init=0.5)
    drafter = BigramDrafter(table_from_target(target, 32), 32)
    for seed in range(3):
        prompt = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(seed))
        result = Engine(target, drafter, 4, GREEDY, 40, [], runner=DynamicTarget(target)).generate(prompt)
        assert result.output_ids == autoregressive(target, prompt, 40)
    assert result.stats.accepted_tokens > 0


def test_bigram_table_for_another_vocabulary_is_refused(tmp_path):
    path = tmp_path / "next_token.json"
    path.write_text(json.dumps([1, 2, 0]))
    table = load_csdrafting_json(str(path))
    assert table.successors[:, 0].tolist() == [1, 2, 0]
    with pytest.raises(SpecsweepError, match="built for another tokenizer"):
        BigramDrafter(table, 32000)
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(SpecsweepError, match="CS-Drafting format"):
        load_csdrafting_json(str(path))


def reduced_copy(model, kept):
    """An independent model holding only the kept layers (re-indexed): the reference for the view."""
    ref = copy.deepcopy(model)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in kept])
    for i, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = i
    ref.config.num_hidden_layers = len(kept)
    return ref


@pytest.mark.parametrize("cfg, kept", [({"exit_layer": 2}, [0, 1]), ({"skip_layers": [0, 2]}, [1, 3])])
def test_layer_skip_view_is_the_reduced_model_sharing_weights(cfg, kept):
    target = tiny_llama(21, layers=4, init=0.5)
    drafter = layer_skip_drafter(target, OmegaConf.create(cfg), GREEDY, None)
    assert all(a is b for a, b in zip(drafter.model.model.layers, [target.model.layers[i] for i in kept]))
    assert len(target.model.layers) == 4  # the target itself is untouched
    prompt = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = reduced_copy(target, kept)
    # the cached incremental drafting equals the reduced model's own greedy decoding
    drafter.reset(prompt)
    assert drafter.propose(prompt, 6).tokens.tolist() == autoregressive(ref, prompt, 6)
    result = Engine(target, drafter, 3, GREEDY, 30, [], runner=DynamicTarget(target)).generate(prompt)
    assert result.output_ids == autoregressive(target, prompt, 30)


def test_layer_skip_errors():
    with pytest.raises(SpecsweepError, match="exit_layer=30: out of range"):
        kept_layers(30, exit_layer=30)
    with pytest.raises(SpecsweepError, match="exactly one"):
        kept_layers(30, exit_layer=3, skip_layers=[1])
    with pytest.raises(SpecsweepError, match="indices must be in 0..29"):
        kept_layers(30, skip_layers=[31])


def test_confidence_threshold_shortens_drafts():
    target = tiny_llama(22, init=0.5)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    full = ModelDrafter(target, GREEDY)
    early = ModelDrafter(target, GREEDY, confidence_threshold=0.999)
    for d in (full, early):
        d.reset(prompt)
    assert full.propose(prompt, 5).tokens.numel() == 5
    assert early.propose(prompt, 5).tokens.numel() < 5
    result = Engine(target, ModelDrafter(target, GREEDY, confidence_threshold=0.5), 5, GREEDY, 30, [], runner=DynamicTarget(target)).generate(prompt)
    assert result.output_ids == autoregressive(target, prompt, 30)


@pytest.mark.parametrize("k_matrix", [[[5, 10], [0, 10]], [[2, 3], [0, 4]], [[0, 6], [0, 0]]])
def test_cascade_is_lossless_and_counts_levels(k_matrix):
    target = tiny_llama(23, vocab=32, init=0.5)
    mid = ModelDrafter(perturbed_copy(target, 0.3, 24), GREEDY)
    cascade = CascadeDrafter([mid, BigramDrafter(table_from_target(target, 32), 32)], ["mid", "bigram"], k_matrix)
    for seed in range(2):
        prompt = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(seed))
        result = Engine(target, cascade, 15, GREEDY, 50, [], runner=DynamicTarget(target)).generate(prompt)
        assert result.output_ids == autoregressive(target, prompt, 50)
    levels = cascade.counters()["levels"]
    assert [lv["draft"] for lv in levels] == ["mid", "bigram"]
    if k_matrix[1][1]:
        assert levels[0]["checked_tokens"] > 0  # the model level verified bigram proposals


def test_three_level_cascade_with_prompt_lookup_at_the_bottom():
    target = tiny_llama(25, vocab=16, init=0.5)
    big = ModelDrafter(perturbed_copy(target, 0.2, 26), GREEDY)
    small = ModelDrafter(perturbed_copy(target, 0.6, 27), GREEDY)
    recycling = PromptLookupDrafter(3, 1, weak_ngram=2, weak_tokens=1, recycle_tokens=3)
    cascade = CascadeDrafter([big, small, recycling], ["big", "small", "pld"], [[3, 2, 4], [0, 3, 4], [0, 0, 4]])
    prompt = torch.randint(0, 16, (1, 20), generator=torch.Generator().manual_seed(3))
    assert Engine(target, cascade, 9, GREEDY, 60, [], runner=DynamicTarget(target)).generate(prompt).output_ids == autoregressive(target, prompt, 60)
    assert recycling.recycled  # the cascade passes the target's logits down to its levels


def test_k_matrix_shape_must_match_levels():
    with pytest.raises(SpecsweepError, match="must be 2 x 2"):
        CascadeDrafter([PromptLookupDrafter(), PromptLookupDrafter()], ["a", "b"], [[1, 2, 3]])
    with pytest.raises(SpecsweepError, match="row 0 must propose"):
        CascadeDrafter([PromptLookupDrafter(), PromptLookupDrafter()], ["a", "b"], [[0, 0], [0, 1]])



def test_prompt_lookup_copies_on_into_its_own_draft():
    drafter = PromptLookupDrafter(max_ngram=2)
    ids = torch.tensor([[5, 8, 8, 8]])  # a loop on one token: the occurrence is 1 token back
    drafter.reset(ids)
    assert drafter.propose(ids, 6).tokens.tolist() == [8] * 6
    ids = torch.tensor([[1, 2, 3, 1, 2]])  # period 3
    drafter.reset(ids)
    assert drafter.propose(ids, 7).tokens.tolist() == [3, 1, 2, 3, 1, 2, 3]


def test_token_recycling_fills_weak_and_empty_matches_from_the_targets_choices():
    drafter = PromptLookupDrafter(max_ngram=3, weak_ngram=2, weak_tokens=1, recycle_tokens=4)
    ids = torch.tensor([[10, 11, 12]])
    drafter.reset(ids)
    assert drafter.propose(ids, 8).tokens.numel() == 0  # no match, nothing recycled yet
    logits = torch.zeros(4, 20)
    logits[0, 13], logits[1, 14], logits[2, 12], logits[3, 12] = 1, 1, 1, 1  # after 12 the target chose 13, ...
    drafter.on_scored(torch.tensor([12, 13, 14, 9]), logits)
    assert drafter.propose(ids, 8).tokens.tolist() == [13, 14, 12, 13]  # follows the table, recycle_tokens long
    assert drafter.propose(ids, 2).tokens.tolist() == [13, 14]  # never past the room left
    weak = torch.tensor([[13, 9, 10, 11, 12, 7, 13]])  # only the 1-gram (13) matches: weak, 1 token, then recycled
    drafter.reset(weak)
    assert drafter.propose(weak, 8).tokens.tolist() == [9, 12, 13, 14]  # 9 from the lookup, then recycled
    strong = torch.tensor([[1, 2, 3, 4, 1, 2]])  # a strong match is not extended
    drafter.reset(strong)
    assert drafter.propose(strong, 8).tokens.tolist() == [3, 4, 1, 2, 3, 4, 1, 2]


def test_token_recycling_keys_choices_by_the_last_tokens():
    """With recycle_context=2 the choice after (7, 12) and after (8, 12) are kept apart; a context
    never recorded falls back to the last token alone."""
    drafter = PromptLookupDrafter(max_ngram=1, weak_ngram=2, weak_tokens=0, recycle_tokens=2, recycle_context=2)

    def score(text, chosen):  # one verify step after ``text``: root text[-1], nothing accepted
        ids = torch.tensor([text])
        drafter.propose(ids, 2)  # as the engine: the hooks follow a proposal
        logits = torch.zeros(1, 30)
        logits[0, chosen] = 1
        drafter.on_scored(ids[0, -1:], logits)

    drafter.reset(torch.tensor([[1]]))
    score([1, 7, 12], 20)  # after 7 12: 20
    score([1, 7, 12, 20, 8, 12], 21)  # after 8 12: 21, and after 12 alone now 21
    assert drafter.recycled[(7, 12)] == [20] and drafter.recycled[(8, 12)] == [21] and drafter.recycled[(12,)] == [21]
    for text, first in (([2, 7, 12], 20), ([2, 8, 12], 21), ([2, 9, 12], 21)):
        drafter.reset(torch.tensor([text]))
        assert drafter.propose(torch.tensor([text]), 1).tokens.tolist() == [first]
    with pytest.raises(ValueError, match="recycle_context >= 1"):
        PromptLookupDrafter(recycle_tokens=2, recycle_context=0)


def test_token_recycling_trees_branch_on_the_targets_top_choices():
    drafter = PromptLookupDrafter(max_ngram=3, weak_ngram=2, weak_tokens=1, recycle_tokens=3, recycle_branches=2)
    logits = torch.zeros(4, 20)
    logits[0, [13, 15]] = torch.tensor([2.0, 1.0])  # after 12: 13 first, 15 second
    logits[1, 14] = logits[2, 12] = logits[3, 16] = 1  # 13 -> 14, 14 -> 12, 15 -> 16
    drafter.on_scored(torch.tensor([12, 13, 14, 15]), logits)
    assert drafter.recycled[(12,)] == [13, 15]
    ids = torch.tensor([[10, 11, 12]])  # no match: the two recycled branches after 12
    drafter.reset(ids)
    draft = drafter.propose(ids, 8)
    assert draft.tree is not None  # two branches: a tree, verified in one forward

    def leaves(draft):
        tree = draft.tree
        return {tuple(draft.tokens[list(tree.ancestry(i))].tolist()) for i in range(tree.num_nodes)
                if not tree.children(i)}

    assert leaves(draft) == {(13, 14, 12), (15, 16)}  # 16 has no recorded successor: that branch stops
    assert drafter.propose(ids, 3).tokens.numel() == 3  # never more nodes than the room
    weak = torch.tensor([[12, 13, 9, 11, 7, 12]])  # the 1-gram 12 matched: weak, its continuation 13 is
    drafter.reset(weak)                              # also the first recycled choice, so the paths merge
    assert leaves(drafter.propose(weak, 8)) == {(13, 14, 12), (15, 16)}


def test_prompt_lookup_limits_weak_matches():
    drafter = PromptLookupDrafter(max_ngram=4, min_ngram=1, weak_ngram=3, weak_tokens=1)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 9, 5, 6, 7]])  # last 3 tokens matched earlier: a strong match
    drafter.reset(ids)
    assert drafter.propose(ids, 8).tokens.tolist() == [9, 5, 6, 7, 9, 5, 6, 7]  # the copy runs on into itself
    weak = torch.tensor([[1, 2, 3, 4, 8, 9, 4]])  # only the 1-gram (4) matches
    drafter.reset(weak)
    assert drafter.propose(weak, 8).tokens.tolist() == [8]
