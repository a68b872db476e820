"""Jacobi and lookahead decoding: the target's own greedy output, its distribution at T > 0, and the
window and block mechanics they are built from."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from scipy.stats import chisquare

from specsweep.backends.target import DynamicTarget
from specsweep.core import engine as engine_module
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling, sample
from specsweep.core.tree import Tree
from specsweep.drafters.jacobi import JacobiDrafter
from specsweep.drafters.lookahead import LookaheadDrafter, window_tree
from tests.conftest import tiny_llama
from tests.test_greedy_lossless import autoregressive, hf_greedy, prompt_for
from tests.test_stochastic import ALPHA, V, exact_law

GREEDY = Sampling()
JACOBI = [dict(variant=v, block=b, init=i) for v, b in (("pj", 1), ("pgj", 1), ("pgj", 5), ("hgj", 3), ("hgj", 8))
          for i in ("pad", "lookup")]
LOOKAHEAD = [dict(window=2, ngram=2, guesses=1), dict(window=5, ngram=4, guesses=5), dict(window=3, ngram=6, guesses=2),
             dict(window=4, ngram=3, guesses=0), dict(window=4, ngram=3, guesses=4, pool_from_text=True)]


def jacobi(limit, **params):
    return JacobiDrafter(max_new_tokens=limit, pad_id=0, **params)


def engine(target, drafter, params, limit, eos=(), sampling=GREEDY, generator=None):
    shape = type(drafter).self_shaped({"max_new_tokens": limit, **params})
    return Engine(target, drafter, shape, sampling, limit, list(eos), generator, runner=DynamicTarget(target))


def looping_target(seed=0):
    """A tiny target that soon repeats itself (low-temperature random weights): Jacobi guesses and
    pooled n-grams then get accepted, so the tests exercise acceptance, not only rejection."""
    return tiny_llama(seed, vocab=32, init=0.6)


def make_drafter(params: dict, limit: int):
    return jacobi(limit, **params) if "variant" in params else LookaheadDrafter(**params)


@pytest.mark.parametrize("params", JACOBI + LOOKAHEAD, ids=lambda p: "-".join(map(str, p.values())))
@pytest.mark.parametrize("seed", [0, 1])
def test_jacobi_and_lookahead_are_the_targets_greedy_output(seed, params):
    target = tiny_llama(seed)
    prompt = prompt_for(seed, 96)
    for limit in (1, 7, 40):
        expected = autoregressive(target, prompt, limit)
        assert expected == hf_greedy(target, prompt, limit)
        assert engine(target, make_drafter(params, limit), params, limit).generate(prompt).output_ids == expected


@pytest.mark.parametrize("make", [lambda: jacobi(60, variant="hgj", block=4, init="pad"),
                                  lambda: LookaheadDrafter(window=4, ngram=3, guesses=3, eos_id=None)])
def test_both_stop_at_eos_like_hf(make):
    target = looping_target(3)
    prompt = prompt_for(3, 32)
    free = autoregressive(target, prompt, 60)
    eos = free[len(free) // 2]
    expected = free[: free.index(eos) + 1]
    assert hf_greedy(target, prompt, 60, [eos]) == expected
    drafter = make()
    params = {"variant": "hgj", "block": 4} if isinstance(drafter, JacobiDrafter) else \
        {"window": 4, "ngram": 3, "guesses": 3}
    assert engine(target, drafter, params, 60, [eos]).generate(prompt).output_ids == expected


def test_on_a_looping_target_lookahead_beats_jacobi_in_tokens_per_forward():
    """Both accept guesses (not a disguised autoregressive run); the n-gram pool accepts more."""
    per_forward = {}
    for name, drafter, params in (("jacobi", jacobi(80, variant="hgj", block=6, init="pad"),
                                   {"variant": "hgj", "block": 6}),
                                  ("lookahead", LookaheadDrafter(window=6, ngram=4, guesses=6),
                                   {"window": 6, "ngram": 4, "guesses": 6})):
        new = forwards = 0
        for seed in range(4):
            target = looping_target(seed)
            stats = engine(target, drafter, params, 80).generate(prompt_for(seed, 32)).stats
            new, forwards = new + stats.new_tokens, forwards + stats.verify_steps + 1
        per_forward[name] = new / forwards
    assert per_forward["jacobi"] > 1.05
    assert per_forward["lookahead"] > per_forward["jacobi"]


def test_pgj_fixes_a_block_in_at_most_block_iterations():
    """Seed 003's Proposition 1: every forward fixes at least one more position of the block."""
    target = tiny_llama(2)
    drafter = jacobi(64, variant="pgj", block=6, init="pad")
    engine(target, drafter, {"variant": "pgj", "block": 6}, 64).generate(prompt_for(2, 96))
    counters = drafter.counters()
    assert counters["blocks_fixed"] >= 8
    assert 1 <= counters["iterations_per_block"] <= 6


def test_jacobi_guesses_are_the_targets_choices_after_the_rejected_guess():
    """After a step, the next draft (past the new root) is the last forward's choices after the
    positions the target rejected: the Jacobi iterate, shifted by what was fixed."""
    drafter = jacobi(32, variant="hgj", block=4, init="pad")
    drafter.reset(torch.tensor([[1, 2]]))
    first = drafter.propose(torch.tensor([[1, 2]]), 4)
    assert first.tokens.tolist() == [0, 0, 0, 0]
    logits = torch.nn.functional.one_hot(torch.tensor([5, 7, 8, 9, 3]), 16).float()  # rows: root, d0..d3
    drafter.on_verified(first, logits, [])  # nothing accepted: the target's next token is 5
    second = drafter.propose(torch.tensor([[1, 2, 5]]), 4)
    assert second.tokens.tolist() == [7, 8, 9, 3]  # choices after d0..d3, at the positions after 5


def test_the_window_is_a_tree_whose_ancestors_are_the_papers_mask():
    """Level l's token j attends to the prefix, B0 up to j and tokens j of levels 1..l."""
    w, n = 5, 4
    tree = window_tree(w, n, guesses=0)
    assert tree.num_nodes == (n - 1) * w - 1 and tree.depth == w + n - 3

    def node(level, j):  # B0[0] is the root (-1); level 0 holds B0[1..]
        if level == 0:
            return j - 1
        return w - 1 + (level - 1) * w + j

    for level in range(1, n - 1):
        for j in range(w):
            expected = {node(0, i) for i in range(1, j + 1)} | {node(k, j) for k in range(1, level + 1)}
            assert set(tree.ancestry(node(level, j))) == expected
            assert tree.depths[node(level, j)] == level + j


def test_lookahead_pools_the_windows_ngrams_and_verifies_them():
    drafter = LookaheadDrafter(window=3, ngram=3, guesses=2)
    prompt = torch.tensor([[4, 4, 4, 4]])
    drafter.reset(prompt)
    ids = prompt
    for step in range(4):
        draft = drafter.propose(ids, 8)
        rows = draft.tokens.numel() + 1
        # a target that always says 6 then 7 alternately by row parity: a fixed pattern to pool
        logits = torch.nn.functional.one_hot(torch.tensor([6 + (i % 2) for i in range(rows)]), 10).float()
        drafter.on_verified(draft, logits, [])
        ids = torch.cat([ids, torch.tensor([[6]])], dim=1)
    assert drafter.pool, "the full window pooled n-grams"
    assert all(len(gram) == 2 and len(kept) <= 2 for kept in drafter.pool.values() for gram in kept)
    draft = drafter.propose(ids, 8)
    guesses = [list(g) for g in drafter.pool.get(6, [])]
    paths = {tuple(draft.tokens[list(draft.tree.ancestry(i))].tolist()) for i in range(draft.tokens.numel())}
    assert guesses and all(tuple(g) in paths for g in guesses)


def test_lookahead_steps_respect_the_depth_the_engine_allows():
    drafter = LookaheadDrafter(window=5, ngram=4, guesses=5, pool_from_text=True)
    prompt = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    drafter.reset(prompt)
    for depth in (1, 2, 6):
        draft = drafter.propose(prompt, depth)
        assert draft.tree.depth <= depth
        assert draft.tokens.numel() <= LookaheadDrafter.self_shaped({"window": 5, "ngram": 4, "guesses": 5}).nodes
        drafter.on_verified(draft, torch.zeros(draft.tokens.numel() + 1, 10), [])


def broken_tree_sampling(p, tokens, tree, generator):
    """A classic bug: a rejected child keeps its mass (the next token is drawn from p itself)."""
    node_tokens, node, path = tokens.tolist(), -1, []
    while True:
        for child in tree.children(node):
            if float(torch.rand((), generator=generator)) < float(p[node + 1][node_tokens[child]]):
                path.append(child)
                node = child
                break
        else:
            return path, int(sample(p[node + 1], generator))


def broken_chain_sampling(p, draft, q, generator):
    for i in range(draft.numel()):
        if float(torch.rand((), generator=generator)) >= float(p[i, draft[i]]):
            return i, int(sample(p[i], generator))
    return draft.numel(), int(sample(p[draft.numel()], generator))


def counts(target, make, params, sampling, prompt, samples):
    """Counts of output tokens 2 and 3 (of 4: the first step drafts up to 2 deep)."""
    generator = torch.Generator().manual_seed(0)
    eng = engine(target, make(), params, 4, sampling=sampling, generator=generator)
    table = torch.zeros(V, V)
    for _ in range(samples):
        out = eng.generate(prompt).output_ids
        table[out[1], out[2]] += 1
    return table.flatten()


@pytest.mark.parametrize("kind", ["jacobi", "lookahead"])
def test_sampling_keeps_the_targets_distribution(monkeypatch, kind):
    target = tiny_llama(11, vocab=V, init=0.6)
    sampling = Sampling(temperature=1.0)
    if kind == "jacobi":  # prompt lookup's first guesses after (..., 2, 5): 1, 4
        params, prompt = {"variant": "hgj", "block": 2}, torch.tensor([[1, 4, 2, 5]])

        def make():
            return jacobi(3, init="lookup", **params)
        broken = ("verify_stochastic", broken_chain_sampling)
    else:
        # every token of the prompt keys a pooled n-gram from the first step on
        params, prompt = {"window": 3, "ngram": 3, "guesses": 3}, torch.tensor([[1, 4, 2, 5, 3, 0, 1, 4]])

        def make():
            return LookaheadDrafter(**params, pool_from_text=True)
        broken = ("verify_tree_stochastic", broken_tree_sampling)
    expected = exact_law(target, prompt, 3, sampling)
    good = counts(target, make, params, sampling, prompt, 1200)
    assert pooled_chisquare(good, expected) > ALPHA
    monkeypatch.setattr(engine_module, broken[0], broken[1])
    bad = counts(target, make, params, sampling, prompt, 1200)
    assert pooled_chisquare(bad, expected) < ALPHA


def pooled_chisquare(observed: torch.Tensor, law: torch.Tensor) -> float:
    """Pearson's test with the cells expected fewer than 5 times pooled into one (the test's
    approximation fails on them: one draw of a 1-in-10^5 pair would reject a correct sampler)."""
    expected = law * observed.sum()
    small = expected < 5
    return float(chisquare(torch.cat([observed[~small], observed[small].sum()[None]]),
                           torch.cat([expected[~small], expected[small].sum()[None]])).pvalue)


def test_the_largest_step_is_the_window_and_every_guess():
    shape = LookaheadDrafter.self_shaped({"window": 5, "ngram": 4, "guesses": 5})
    assert shape.nodes == 14 + 15 and shape.depth == 6 and isinstance(shape.largest, Tree)
    assert JacobiDrafter.self_shaped({"variant": "pj", "block": 8, "max_new_tokens": 64}).nodes == 63
    assert JacobiDrafter.self_shaped({"variant": "pgj", "block": 8, "max_new_tokens": 64}).nodes == 8


@pytest.mark.parametrize("override, message", [
    ("tree=binary", "draft=lookahead shapes every step itself (its own draft.* keys): leave tree=chain"),
    ("draft.window=1", "draft.window=1: must be an integer >= 2"),
    ("draft.guesses=-1", "draft.guesses=-1: must be an integer >= 0"),
    ("+draft.length_policy=cost", "draft=lookahead shapes its steps itself: use draft.length_policy=fixed"),
    ("draft.ngram=9", "exceeds hardware.max_verify_tokens=32"),
])
def test_bad_settings_are_refused_with_one_line(tmp_path, override, message):
    proc = subprocess.run([sys.executable, "-m", "specsweep", "draft=lookahead", "+hardware.max_verify_tokens=32",
                           override, f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_bad_jacobi_variant_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "specsweep", "draft=jacobi", "draft.variant=gauss",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "draft.variant=gauss: choose one of pj, pgj, hgj" in proc.stderr


def test_a_draft_that_shapes_its_own_steps_cannot_be_part_of_another():
    """A union or cascade proposes its parts' chains: Jacobi and lookahead would never see the rows
    of the drafts they proposed."""
    from specsweep.drafters.cascade import CascadeDrafter
    from specsweep.drafters.prompt_lookup import PromptLookupDrafter
    from specsweep.drafters.union import UnionDrafter
    from specsweep.errors import SpecsweepError

    with pytest.raises(SpecsweepError,
                       match="LookaheadDrafter shapes its own steps: it cannot be part of UnionDrafter"):
        UnionDrafter(PromptLookupDrafter(), LookaheadDrafter(), 8)
    with pytest.raises(SpecsweepError,
                       match="JacobiDrafter shapes its own steps: it cannot be part of CascadeDrafter"):
        CascadeDrafter([jacobi(16), PromptLookupDrafter()], ["jacobi", "prompt-lookup"], [[1, 1], [0, 1]])
