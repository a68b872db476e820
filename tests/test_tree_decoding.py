"""Draft trees through the engine: one target forward per tree, lossless for every shape and draft."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers import DynamicCache

from specsweep.backends.cache import compact
from specsweep.backends.target import DynamicTarget
from specsweep.core.draft import Draft, Drafter
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling, sample
from specsweep.core.tree import DynamicTreeSpec, Tree
from specsweep.core.verify import verify_greedy, verify_tree_greedy, verify_tree_stochastic
from specsweep.drafters.bigram import BigramDrafter, count_bigrams
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from tests.conftest import perturbed_copy, tiny_llama

GREEDY = Sampling()
MEDUSA_LIKE = Tree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0, 0]])
SHAPES = {
    "binary": Tree.binary(3),
    "kary": Tree.kary(3, 2),
    "medusa-like": MEDUSA_LIKE,
    "wide": Tree.from_paths([[r] for r in range(6)]),
    "dynamic": DynamicTreeSpec(budget=12, depth=5, k=3),
}


def autoregressive(target, prompt, limit):
    return Engine(target, None, 0, GREEDY, limit, [], runner=DynamicTarget(target)).generate(prompt).output_ids


def prompt_for(seed, vocab, length=10):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_model_draft_trees_are_lossless(shape):
    target = tiny_llama(30, vocab=48, init=0.5)
    drafter = ModelDrafter(perturbed_copy(target, 0.5, 31), GREEDY)
    for seed in range(2):
        prompt = prompt_for(seed, 48)
        result = Engine(target, drafter, shape, GREEDY, 40, [], runner=DynamicTarget(target)).generate(prompt)
        assert result.output_ids == autoregressive(target, prompt, 40)
    assert 0 < result.stats.accepted_tokens < result.stats.draft_tokens


@pytest.mark.parametrize("shape", [s for k, s in SHAPES.items() if k != "dynamic"], ids=[k for k in SHAPES if k != "dynamic"])
def test_table_draft_trees_are_lossless(shape):
    target = tiny_llama(32, vocab=24, init=0.5)
    table = count_bigrams([autoregressive(target, torch.tensor([[t]]), 20) for t in range(24)], 24)
    prompt = prompt_for(4, 24, length=30)
    expected = autoregressive(target, prompt, 50)
    for drafter in (BigramDrafter(table, 24), PromptLookupDrafter(3, 1)):
        result = Engine(target, drafter, shape, GREEDY, 50, [], runner=DynamicTarget(target)).generate(prompt)
        assert result.output_ids == expected
        assert result.stats.accepted_tokens > 0


def test_eager_attention_agrees_with_sdpa_on_trees():
    target = tiny_llama(33, vocab=48, init=0.5)
    eager = tiny_llama(33, vocab=48, init=0.5)
    eager.config._attn_implementation = "eager"
    drafter = ModelDrafter(perturbed_copy(target, 0.5, 34), GREEDY)
    prompt = prompt_for(5, 48)
    assert (Engine(eager, drafter, MEDUSA_LIKE, GREEDY, 30, [], runner=DynamicTarget(eager)).generate(prompt).output_ids
            == autoregressive(target, prompt, 30))


class ChainAsTree(Drafter):
    """Sends a chain proposal through the tree path (tree mask, tree verification, compaction)."""

    def __init__(self, inner):
        self.inner = inner

    def reset(self, prompt_ids):
        self.inner.reset(prompt_ids)

    def propose_tree(self, ids, shape):
        draft = self.inner.propose(ids, shape.depth)
        n = draft.tokens.numel()
        return Draft(draft.tokens, tree=Tree.chain(n)) if n else draft


def test_a_one_chain_tree_gives_exactly_the_chain_results():
    target = tiny_llama(35, vocab=48, init=0.5)
    draft_model = perturbed_copy(target, 0.2, 36)
    prompt = prompt_for(6, 48)
    chain = Engine(target, ModelDrafter(draft_model, GREEDY), 4, GREEDY, 40, [], runner=DynamicTarget(target)).generate(prompt)
    four_deep = Tree.from_paths([[0], [1], [0, 0], [0, 0, 0], [0, 0, 0, 0]])  # not a chain: the tree path runs
    tree = Engine(target, ChainAsTree(ModelDrafter(draft_model, GREEDY)), four_deep, GREEDY, 40, [], runner=DynamicTarget(target)).generate(prompt)
    assert tree.output_ids == chain.output_ids
    assert (tree.stats.draft_tokens, tree.stats.accepted_tokens, tree.stats.accepted_per_step) == (
        chain.stats.draft_tokens, chain.stats.accepted_tokens, chain.stats.accepted_per_step)
    assert 0 < chain.stats.accepted_tokens < chain.stats.draft_tokens
    logits = torch.randn(5, 10)
    draft = logits.argmax(-1)[:4].clone()
    draft[2] = (draft[2] + 1) % 10
    accepted, token = verify_greedy(logits, draft)
    assert verify_tree_greedy(logits, draft, Tree.chain(4)) == (list(range(accepted)), token)


def test_compact_moves_the_accepted_path_into_place():
    cache = DynamicCache()
    keys = torch.arange(10.0).view(1, 1, 10, 1)
    cache.update(keys.clone(), keys.clone() * 10, 0)
    compact(cache, 5, [6, 8, 9])
    assert cache.layers[0].keys.flatten().tolist() == [0, 1, 2, 3, 4, 6, 8, 9]
    assert cache.layers[0].values.flatten().tolist() == [0, 10, 20, 30, 40, 60, 80, 90]


# ---- stochastic tree verification --------------------------------------------------------------

V = 6
TREE = Tree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0]])
NODE_TOKENS = torch.tensor([2, 4, 1, 3, 2, 0, 5])


def broken_tree_no_residual(p, tokens, tree, generator):
    """The bug the test must catch: children tried against p itself, never the residual."""
    node, path = -1, []
    while True:
        for child in tree.children(node):
            if float(torch.rand((), generator=generator)) < float(p[node + 1, int(tokens[child])]):
                path.append(child)
                node = child
                break
        else:
            return path, int(sample(p[node + 1], generator))


def first_two(verifier, p_root, p_next, samples=6000):
    """Counts of the first two emitted tokens; every non-root row of p is p_next (position-only law)."""
    g = torch.Generator().manual_seed(0)
    p = torch.stack([p_root] + [p_next] * TREE.num_nodes)
    counts = torch.zeros(V, V)
    for _ in range(samples):
        path, token = verifier(p, NODE_TOKENS, TREE, g)
        emitted = NODE_TOKENS[path].tolist() + [token]
        second = emitted[1] if len(emitted) > 1 else int(sample(p_next, g))
        counts[emitted[0], second] += 1
    return counts.flatten()


def test_specinfer_tree_verification_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(2)
    p_root, p_next = (torch.randn(2, V, generator=g) * 1.5).softmax(-1)
    expected = (p_root[:, None] * p_next[None, :]).flatten()
    good = first_two(verify_tree_stochastic, p_root, p_next)
    assert chisquare(good, expected * good.sum()).pvalue > 1e-3
    bad = first_two(broken_tree_no_residual, p_root, p_next)
    assert chisquare(bad, expected * bad.sum()).pvalue < 1e-3


def test_engine_tree_sampling_matches_the_target():
    from tests.test_stochastic import exact_law

    target, draft = tiny_llama(11, vocab=V, init=0.6), tiny_llama(12, vocab=V, init=0.6)
    sampling = Sampling(temperature=1.0)
    prompt = torch.tensor([[1, 4, 2, 5]])
    expected = exact_law(target, prompt, 3, sampling)
    generator = torch.Generator().manual_seed(0)
    engine = Engine(target, ModelDrafter(draft, sampling, generator), Tree.kary(2, 2), sampling, 3, [], generator, runner=DynamicTarget(target))
    counts = torch.zeros(V, V)
    for _ in range(1200):
        out = engine.generate(prompt).output_ids
        counts[out[1], out[2]] += 1
    assert chisquare(counts.flatten(), expected * 1200).pvalue > 1e-3


@pytest.mark.parametrize("shape", [Tree.binary(3), DynamicTreeSpec(budget=8, depth=3, k=2)], ids=["binary", "dynamic"])
def test_model_draft_keeps_the_accepted_branch_kv(shape):
    """After a tree draft the draft's own cache keeps the accepted branch (compacted), not re-fed."""
    model = tiny_llama(37, vocab=48, init=0.5)
    ids = prompt_for(7, 48)
    drafter = ModelDrafter(model, GREEDY)
    drafter.reset(ids)
    draft = drafter.propose_tree(ids, shape)
    first = draft.tree.children(-1)[0]
    second = draft.tree.children(first)[0]  # an internal node two levels down: both were fed
    accepted = torch.cat([ids, draft.tokens[[first, second]].view(1, -1), torch.tensor([[5]])], dim=1)
    with torch.inference_mode():  # as inside propose()
        feed = drafter._sync(accepted)
    assert drafter.cached.numel() == ids.shape[1] + 2 and feed.shape[1] == 1  # only the bonus token to feed
    fresh = ModelDrafter(model, GREEDY)
    fresh.reset(accepted)
    assert drafter.propose(accepted, 4).tokens.tolist() == fresh.propose(accepted, 4).tokens.tolist()


def test_bool_tree_masks_give_the_same_output_with_sdpa():
    """The npu profile's bool masks (what NPU SDPA wants), checked where sdpa runs: on this CPU."""
    target = tiny_llama(38, vocab=48, init=0.5)
    drafter = ModelDrafter(perturbed_copy(target, 0.4, 39), GREEDY, bool_masks=True)
    prompt = prompt_for(8, 48)
    for shape in (MEDUSA_LIKE, DynamicTreeSpec(budget=10, depth=4, k=3)):
        result = Engine(target, drafter, shape, GREEDY, 30, [], runner=DynamicTarget(target, bool_masks=True)).generate(prompt)
        assert result.output_ids == autoregressive(target, prompt, 30)
        assert result.stats.accepted_tokens > 0
