"""Per-position acceptance, bootstrap intervals, paired speedups, repeats and the predicted speedup,
on hand-made step records and samples (plus the engine's per-step counters on a tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from specsweep.app import prediction, uncertainty
from specsweep.backends.target import DynamicTarget
from specsweep.core.draft import Draft, Drafter
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.core.stats import curve_speedup, position_counts, position_metrics, summarize
from specsweep.core.tree import Tree
from specsweep.drafters.model import ModelDrafter
from specsweep.errors import SpecsweepError
from tests.conftest import tiny_llama

GREEDY = Sampling()


def test_alpha_k_from_hand_made_steps():
    # steps (depth, accepted): (4, 4) offers 1..4 and keeps them; (4, 0) offers 1 only; (4, 2) offers
    # 1..3, keeps 1..2; (2, 1) offers 1..2, keeps 1; a step without a draft (0, 0) offers nothing
    offered, accepted = position_counts([[4, 4, 4], [2, 0]], [[4, 0, 2], [1, 0]])
    assert offered == [4, 3, 2, 1] and accepted == [3, 2, 1, 1]
    assert sum(accepted) == 4 + 0 + 2 + 1  # each accepted token counted at its own position
    m = position_metrics([[4, 4, 4], [2, 0]], [[4, 0, 2], [1, 0]], off_top_steps=1)
    assert m["alpha_by_position"] == [0.75, 2 / 3, 0.5, 1.0]
    assert m["off_top_share"] == 1 / 3  # 3 steps accepted a token, 1 of them off the top branch
    assert position_metrics([[0, 0]], [[0, 0]], 0) == {}  # autoregressive: no position offered


class AlwaysWrong(Drafter):
    """Chains of the target's greedy token + 1: only position 1 is ever offered."""

    def __init__(self, target):
        self.target = target

    def propose(self, ids, depth):
        with torch.no_grad():
            best = self.target(ids).logits[0, -1].argmax()
        return Draft(((best + 1) % self.target.config.vocab_size).repeat(depth))


class RightOnSecondRank(Drafter):
    """Two children of the root: rank 0 wrong, rank 1 the target's greedy token."""

    fills = ("tree",)

    def __init__(self, target):
        self.target = target

    def propose_tree(self, ids, shape):
        with torch.no_grad():
            best = self.target(ids).logits[0, -1].argmax()
        wrong = (best + 1) % self.target.config.vocab_size
        return Draft(torch.stack([wrong, best]), tree=Tree((-1, -1), (0, 1)))


def test_engine_records_per_step_depths_and_off_top_steps():
    target = tiny_llama(0, init=0.5)
    same = Engine(target, ModelDrafter(target, GREEDY), 4, GREEDY, 41, [], runner=DynamicTarget(target))
    stats = same.generate(torch.tensor([[1, 2, 3]])).stats
    assert stats.drafted_per_step == stats.depth_per_step == [4] * 8
    assert summarize([stats])["alpha_by_position"] == [1.0] * 4

    wrong = Engine(target, AlwaysWrong(target), 3, GREEDY, 20, [], runner=DynamicTarget(target))
    m = summarize([wrong.generate(torch.tensor([[5, 6]])).stats])
    assert m["alpha_by_position"] == [0.0, None, None] and m["offered_by_position"][1:] == [0, 0]

    tree = Engine(target, RightOnSecondRank(target), Tree.kary(2, 1), GREEDY, 12, [], runner=DynamicTarget(target))
    stats = tree.generate(torch.tensor([[7, 8]])).stats
    assert set(stats.drafted_per_step) <= {0, 2} and set(stats.depth_per_step) <= {0, 1}
    assert stats.off_top_steps == sum(1 for a in stats.accepted_per_step if a) > 0
    assert summarize([stats])["off_top_share"] == 1.0


def samples(walls, new=100, repeat=0, drafted=0, accepted=0, steps=50, passed=None):
    """One sample per prompt (task i) with these wall times."""
    return [{"task_id": f"t{i}", "repeat": repeat, "new_tokens": new, "wall_s": w, "draft_tokens": drafted,
             "accepted_tokens": accepted, "verify_steps": steps, **({} if passed is None else {"passed": passed[i]})}
            for i, w in enumerate(walls)]


def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time():
    # prompts' times from a known distribution: the truth is new / E[wall] = 100 / exp(0.5 * 0.3^2)
    rng = np.random.default_rng(1)
    truth = 100 / np.exp(0.5 * 0.3 ** 2)
    covered = 0
    for _ in range(200):
        p = uncertainty.fold(samples(rng.lognormal(0.0, 0.3, size=40)))
        record = uncertainty.job_intervals(p, uncertainty.resamples(40, draws=400, seed=int(rng.integers(1 << 30))))
        covered += record["tokens_per_s"]["lo"] <= truth <= record["tokens_per_s"]["hi"]
    assert 0.88 <= covered / 200 <= 0.99


def test_a_job_paired_with_itself_has_speedup_exactly_one_and_zero_width():
    job = samples([1.0, 2.0, 0.5, 3.0])
    record = uncertainty.analyse(job, job)
    assert record["speedup"] == {"value": 1.0, "lo": 1.0, "hi": 1.0}
    assert record["slower_than_baseline"] == [] and all(x == 1.0 for _, x in record["prompt_speedups"])
    p = uncertainty.fold(job)
    assert uncertainty.distinguishable(uncertainty.speedup_difference(p, p, p)) is False


def test_paired_speedups_name_the_slower_prompts_and_tell_real_differences():
    base = uncertainty.fold(samples([1.0, 2.0, 4.0, 1.0, 3.0, 2.0]))
    fast = uncertainty.fold(samples([0.5, 1.0, 2.0, 0.5, 1.5, 1.25]))  # 2x on all prompts but t5 (1.6x)
    mixed = uncertainty.fold(samples([0.5, 1.0, 2.0, 0.5, 1.5, 2.5]))  # and 0.8x on t5
    record = uncertainty.paired_speedup(mixed, base)
    assert record["slower_than_baseline"] == ["t5"] and record["paired_prompts"] == 6
    assert record["speedup"]["lo"] <= record["speedup"]["value"] <= record["speedup"]["hi"]
    twice = uncertainty.fold(samples([0.5, 1.0, 2.0, 0.5, 1.5, 1.0]))
    assert uncertainty.paired_speedup(twice, base)["speedup"] == {"value": 2.0, "lo": 2.0, "hi": 2.0}
    assert uncertainty.distinguishable(uncertainty.speedup_difference(twice, base, base)) is True
    # fast and mixed differ on one prompt of six: a resample without t5 shows no difference
    assert uncertainty.distinguishable(uncertainty.speedup_difference(fast, mixed, base)) is False


def test_intervals_are_deterministic_and_cover_the_point():
    job = samples([1.0, 2.0, 0.7, 1.3, 0.9], drafted=80, accepted=40, passed=[1, 0, 1, 1, 0])
    a, b = uncertainty.analyse(job, None), uncertainty.analyse(job, None)
    assert a == b
    for key in ("tokens_per_s", "acceptance_rate", "acceptance_length", "pass_at_1"):
        assert a[key]["lo"] <= a[key]["value"] <= a[key]["hi"], key
    assert a["pass_at_1"]["value"] == 0.6 and a["acceptance_rate"]["value"] == 0.5


def test_repeats_separate_run_to_run_from_prompt_to_prompt_spread():
    first = samples([1.0, 2.0, 4.0], repeat=0)
    second = samples([1.1, 2.2, 4.4], repeat=1)  # the machine 10% slower in the second pass
    spread = uncertainty.spread(uncertainty.fold(first + second))
    assert spread["repeats"] == 2
    assert spread["tokens_per_s_by_repeat"] == pytest.approx([300 / 7, 300 / 7.7])
    assert spread["within_prompt_cv"] == pytest.approx(spread["run_to_run_cv"])  # every prompt 10% slower
    assert spread["prompt_to_prompt_cv"] > 5 * spread["run_to_run_cv"]
    assert uncertainty.spread(uncertainty.fold(first))["run_to_run_cv"] is None
    assert uncertainty.schedule(2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # pass after pass
    with pytest.raises(SpecsweepError, match="repeats=0"):
        uncertainty.repeats_setting(OmegaConf.create({"repeats": 0}))


def test_predicted_speedup_from_a_cost_curve(tmp_path):
    ratios = {1: 1.0, 3: 1.5, 5: 2.0}
    assert curve_speedup([[0, 0, 0]], [[0, 0, 0]], ratios) == 1.0  # autoregressive
    # steps: 4 drafted, 4 accepted (5 tokens, cost 2); 2 drafted, 0 accepted (1 token, cost 1.5)
    assert curve_speedup([[4, 2]], [[4, 0]], ratios) == 6 / 3.5
    assert curve_speedup([[4, 2]], [[4, 0]], ratios, draft_steps=0.5) == 6 / 4.0
    assert curve_speedup([[3]], [[0]], ratios) is None  # the curve has no t(4)
    path = tmp_path / "costs.json"
    path.write_text('{"seconds": {"1": 0.01, "3": 0.015, "5": 0.02}}')
    record = prediction.predict([{"drafted_per_step": [4, 2], "accepted_per_step": [4, 0], "draft_s": 0.005}],
                                prediction.cached_seconds(path), path)
    assert record["speedup"] == pytest.approx(6 / 3.5) and record["speedup_with_draft"] == pytest.approx(6 / 4.0)
