"""At temperature > 0 speculative sampling keeps the target's distribution (chi-square tests).

Every test here also runs a deliberately broken verifier and requires the test to reject it,
so none of them can pass vacuously.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from specsweep.backends.target import DynamicTarget
from specsweep.core import engine as engine_module
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling, sample
from specsweep.core.verify import verify_stochastic
from specsweep.drafters.bigram import BigramDrafter, BigramTable
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.drafters.recycling import TokenRecycling
from tests.conftest import tiny_llama

V = 6
ALPHA = 1e-3  # p-value below which a distribution is declared different


def random_dist(g, rows, sharp=2.0):
    return (torch.randn(rows, V, generator=g) * sharp).softmax(-1)


def broken_no_residual(p, draft, q, generator):
    """The classic bug: on rejection, resample from p instead of the residual max(0, p - q)."""
    n = draft.numel()
    for i in range(n):
        qi = 1.0 if q is None else float(q[i, draft[i]])
        if torch.rand(1, generator=generator).item() >= min(1.0, float(p[i, draft[i]]) / qi):
            return i, int(sample(p[i], generator))
    return n, int(sample(p[n], generator))


def first_two_tokens(verifier, p, q, deterministic, samples=6000, seed=0):
    """Counts of the first two emitted tokens (a V*V table) over many verification rounds."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(samples):
        draft = torch.stack([sample(q[i], g) for i in range(q.shape[0])])
        accepted, nxt = verifier(p, draft, None if deterministic else q, g)
        emitted = draft[:accepted].tolist() + [nxt]
        if len(emitted) >= 2:
            counts[emitted[0], emitted[1]] += 1
        else:  # the second token comes from the next round, whose target law at this position is p[1]
            counts[emitted[0], int(sample(p[1], g))] += 1
    return counts


@pytest.mark.parametrize("deterministic", [False, True])
def test_verifier_keeps_target_distribution(deterministic):
    g = torch.Generator().manual_seed(1)
    # position-only "models": p_i / q_i do not depend on earlier tokens, so the exact law of the
    # first two emitted tokens is p0 x p1
    p, q = random_dist(g, 3), random_dist(g, 2)
    if deterministic:  # a deterministic draft proposes a fixed token: q is one-hot
        q = torch.nn.functional.one_hot(torch.tensor([2, 4]), V).float()
    expected = (p[0][:, None] * p[1][None, :]).flatten()
    good = first_two_tokens(verify_stochastic, p, q, deterministic).flatten()
    assert chisquare(good, expected * good.sum()).pvalue > ALPHA
    bad = first_two_tokens(broken_no_residual, p, q, deterministic).flatten()
    assert chisquare(bad, expected * bad.sum()).pvalue < ALPHA


def exact_law(target, prompt, positions, sampling):
    """P(tokens 2..positions) under the target alone, marginalising token 1, by enumeration."""
    with torch.no_grad():
        law = {}
        for seq in itertools.product(range(V), repeat=positions):
            ids = torch.cat([prompt, torch.tensor([seq])], dim=1)
            probs = sampling.probabilities(target(ids).logits[0, prompt.shape[1] - 1:-1])
            law[seq] = float(torch.prod(probs[torch.arange(positions), torch.tensor(seq)]))
    table = torch.zeros([V] * (positions - 1))
    for seq, prob in law.items():
        table[seq[1:]] += prob
    return table.flatten()


def engine_counts(target, make_drafter, sampling, prompt, samples):
    generator = torch.Generator().manual_seed(0)
    eng = Engine(target, make_drafter(generator), 2, sampling, 3, [], generator, runner=DynamicTarget(target))
    counts = torch.zeros(V, V)
    for _ in range(samples):
        out = eng.generate(prompt).output_ids
        counts[out[1], out[2]] += 1
    return counts.flatten()


@pytest.mark.parametrize("draft_kind", ["model", "bigram", "recycling"])
def test_engine_samples_from_the_target(monkeypatch, draft_kind):
    target, draft = tiny_llama(11, vocab=V, init=0.6), tiny_llama(12, vocab=V, init=0.6)
    sampling = Sampling(temperature=1.0)
    if draft_kind == "model":  # samples from its own q
        def make_drafter(generator):
            return ModelDrafter(draft, sampling, generator)
    elif draft_kind == "recycling":  # deterministic, and learnt from the target's logits as it goes
        def make_drafter(generator):
            return PromptLookupDrafter(1, 1, weak_ngram=2, weak_tokens=0, recycling=TokenRecycling(2))
    else:  # deterministic: the successor of each token is fixed (one-hot q)
        table = BigramTable(torch.tensor([[3], [0], [5], [1], [2], [4]]), torch.ones(V, 1))

        def make_drafter(generator):
            return BigramDrafter(table, V)
    prompt = torch.tensor([[1, 4, 2, 5]])
    expected = exact_law(target, prompt, 3, sampling)
    good = engine_counts(target, make_drafter, sampling, prompt, 1200)
    assert chisquare(good, expected * good.sum()).pvalue > ALPHA
    monkeypatch.setattr(engine_module, "verify_stochastic", broken_no_residual)
    bad = engine_counts(target, make_drafter, sampling, prompt, 1200)
    assert chisquare(bad, expected * bad.sum()).pvalue < ALPHA


def test_top_k_top_p_warp():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.count_nonzero(Sampling(1.0, top_k=2).probabilities(logits)) == 2
    probs = Sampling(1.0, top_p=0.7).probabilities(logits)  # top token holds 0.64 < 0.7: keep two
    assert torch.count_nonzero(probs) == 2 and torch.isclose(probs.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0.0)
