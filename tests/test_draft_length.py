"""draft.length_policy=cost: the chooser, the acceptance estimator, the verify-cost curve and its
cache, and greedy decoding with the policy equal to autoregressive decoding."""

from __future__ import annotations

import json

import pytest
import torch

from specsweep.app.run import cost_key, cost_path, decoding_settings
from specsweep.backends.hardware import Hardware
from specsweep.backends.target import DynamicTarget, GraphTarget
from specsweep.core.draft import Draft
from specsweep.core.draft_length import Acceptance, LengthPolicy, VerifyCosts, choose_length, monotone
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.drafters.recycling import TokenRecycling
from specsweep.errors import SpecsweepError
from specsweep.tools import replay
from specsweep.tools.bench import compose_cfg
from tests.conftest import perturbed_copy, tiny_llama

GREEDY = Sampling()
AMD = {1: 1.0, 16: 1.78, 32: 2.42}  # a Zen 5 without AMX, bf16 (DESIGN.md)


def ratios(curve: dict[int, float], rows: int = 32) -> list[float]:
    return VerifyCosts.from_ratios(curve, rows).ratios()


# ---- the chooser ---------------------------------------------------------------------------------

def test_a_flat_curve_drafts_everything_that_might_be_accepted():
    assert choose_length([0.6] * 31, ratios({1: 1.0, 32: 1.0})) == 31
    assert choose_length([0.01] * 5, [1.0] * 7) == 5


def test_a_steep_curve_drafts_less():
    p = [0.6] * 31
    flat, amx, amd = (choose_length(p, ratios(c)) for c in ({1: 1.0, 32: 1.0}, {1: 1.0, 16: 1.2, 32: 1.5}, AMD))
    linear = choose_length(p, ratios({1: 1.0, 32: 32.0}))  # each row costs a whole step: nothing pays
    assert flat == 31 > amx > amd > linear == 0
    # (1 + E[accepted | n]) / t(n + 1) by hand on the AMD curve: 0.6 per token peaks at n = 4
    table = ratios(AMD)
    values = [(1 + sum(0.6 ** k for k in range(1, n + 1))) / table[n + 1] for n in range(32)]
    assert amd == values.index(max(values)) == 4


def test_the_chooser_stops_where_acceptance_falls_off():
    # certain for 8 tokens, then hopeless: 8 on any curve that rises
    p = [1.0] * 8 + [0.01] * 23
    assert choose_length(p, ratios({1: 1.0, 16: 1.2, 32: 1.5})) == 8
    assert choose_length(p, ratios(AMD)) == 8
    assert choose_length([], ratios(AMD)) == 0
    assert choose_length([0.0, 0.9], [1.0, 1.0, 1.0, 1.0]) == 0  # ties go to the shorter draft


# ---- the acceptance estimator --------------------------------------------------------------------

def test_acceptance_is_learned_per_kind_and_position():
    est = Acceptance({"a": 0.5, "b": 0.8}, strength=2.0)
    assert est.probabilities("a", 3) == [0.5, 0.5, 0.5]  # the prior; unseen depths as the one before
    assert est.probabilities("b:7", 1) == [0.8]  # "b:7" is a kind of its own with b's prior
    for _ in range(8):
        est.observe("a", 4, 1)  # token 1 right, token 2 wrong; tokens 3 and 4 never tested
    p = est.probabilities("a", 4)
    assert p[0] == pytest.approx((8 + 2 * 0.5) / (8 + 2))
    assert p[1] == pytest.approx((0 + 2 * p[0]) / (8 + 2))
    assert p[2] == p[3] == pytest.approx(p[1])  # untested: inherit the position before
    assert est.probabilities("b", 2) == [0.8, 0.8]  # other kinds unaffected
    est.observe("b", 3, 3)  # all accepted: the 4th position was not tested
    assert est.offered["b"] == [1, 1, 1] and est.accepted["b"] == [1, 1, 1]
    est.observe("b", 0, 0)  # nothing drafted: nothing learned
    assert est.steps["b"] == 1
    assert est.describe(2)["a"]["steps"] == 8


def test_the_policy_cuts_learns_and_records():
    costs = VerifyCosts.from_ratios(AMD, 32)
    policy = LengthPolicy(costs, Acceptance({"good": 0.9, "bad": 0.9}))
    tokens = torch.arange(31)
    for _ in range(100):
        good = policy.cut(Draft(tokens, kind="good"))
        policy.observe(good, good.tokens.numel(), None)  # always all right
        bad = policy.cut(Draft(tokens, kind="bad"))
        policy.observe(bad, 0, None)  # always wrong from the first token
    assert good.tokens.numel() == 31 and good.kind == "good"
    assert bad.tokens.numel() == 0
    record = policy.record()
    # the prior's 0.9 per token pays for 13 on this curve; seen right 31 times in a row, all 31
    assert record["lengths_by_kind"]["good"] == {13: 1, 31: 99}
    assert record["lengths"][31] == 99 and record["proposed"] == {31: 200}
    assert record["curve"]["ratio"][16] == pytest.approx(1.78)
    assert not costs.steps  # untimed (replay): the curve stays as given
    policy.observe(bad, 0, 0.05)
    assert costs.steps == {1: 1}  # a timed step is recorded by its row count
    tree = Draft(torch.arange(3), tree=object())
    assert policy.cut(tree) is tree  # trees are not cut


# ---- the verify-cost curve -----------------------------------------------------------------------

def test_the_curve_is_a_running_median_per_row_count_interpolated_between():
    costs = VerifyCosts(8)
    assert costs.needs_calibration and costs.ratios() == [1.0] * 9  # nothing known: flat
    costs.seed({1: 0.040, 8: 0.060}, "test")
    assert costs.ratios()[1:] == pytest.approx([1.0 + 0.5 * (m - 1) / 7 for m in range(1, 9)])
    assert costs.needs_calibration  # rows 2..7 were never timed
    for seconds in (0.050, 0.051, 0.049, 0.090, 0.050):  # an outlier does not move a median
        costs.record(4, seconds)
    assert costs.medians[4] == pytest.approx(0.050)
    for _ in range(40):  # the seeded value is displaced by the run's own steps
        costs.record(1, 0.030)
    assert costs.medians[1] == pytest.approx(0.030)
    costs.record(99, 1.0)  # beyond the rows of this run: ignored
    assert 99 not in costs.medians


def test_a_noisy_curve_is_made_non_decreasing():
    assert monotone([1.0, 1.14, 1.09, 1.04, 1.1]) == pytest.approx([1.0, 1.09, 1.09, 1.09, 1.1])
    costs = VerifyCosts(3)
    costs.seed({1: 0.040, 2: 0.039, 3: 0.050}, "test")
    assert costs.ratios() == pytest.approx([1.0, 1.0, 1.0, 0.050 / 0.0395])


def test_the_cache_key_and_round_trip(tmp_path):
    cpu = Hardware(torch.device("cpu"), torch.bfloat16, "row_invariant", prepack_linear=True)
    key = cost_key("embedded:smollm2-135m-instruct", cpu)
    assert set(key) == {"machine", "lock", "target", "hardware"} and key["hardware"]["dtype"] == "bfloat16"
    path = cost_path(tmp_path, key)
    assert path.parent == tmp_path / "costs" and path.suffix == ".json"
    assert path == cost_path(tmp_path, json.loads(json.dumps(key)))  # stable
    assert path != cost_path(tmp_path, cost_key("other", cpu))
    assert path != cost_path(tmp_path, cost_key("embedded:smollm2-135m-instruct", Hardware(torch.device("cpu"),
                                                                                           torch.float32, "sdpa")))
    costs = VerifyCosts(4, path, key)
    assert costs.needs_calibration
    costs.seed({1: 0.04, 2: 0.041, 3: 0.043, 4: 0.05}, "test")
    costs.record(2, 0.042)
    costs.save()
    again = VerifyCosts(4, path, key)
    assert not again.needs_calibration and again.source == f"cache {path}"
    assert again.ratios() == pytest.approx(costs.ratios())
    assert json.loads(path.read_text())["key"]["target"] == "embedded:smollm2-135m-instruct"
    assert VerifyCosts(6, path, key).needs_calibration  # a longer run needs rows the cache lacks
    path.write_text("not json")
    assert VerifyCosts(4, path, key).needs_calibration  # unreadable: measured again


# ---- in the engine -------------------------------------------------------------------------------

def autoregressive(target, prompt, limit):
    return Engine(target, None, 0, GREEDY, limit, [], runner=DynamicTarget(target)).generate(prompt).output_ids


@pytest.mark.parametrize("curve", [{1: 1.0, 32: 1.0}, AMD, {1: 1.0, 32: 8.0}])
def test_greedy_decoding_with_the_length_policy_equals_autoregressive(curve):
    target = tiny_llama(11, vocab=24, init=0.6)  # a small vocabulary: prompt lookup matches often
    draft = perturbed_copy(target, noise=0.5, seed=12)
    for seed in range(3):
        prompt = torch.randint(0, 24, (1, 10), generator=torch.Generator().manual_seed(seed))
        expected = autoregressive(target, prompt, 60)
        for drafter in (PromptLookupDrafter(4, 1, weak_ngram=2, recycling=TokenRecycling(7, context=2)),
                        ModelDrafter(draft, GREEDY)):
            policy = LengthPolicy(VerifyCosts.from_ratios(curve, 8))
            result = Engine(target, drafter, 7, GREEDY, 60, [], length_policy=policy, runner=DynamicTarget(target)).generate(prompt)
            assert result.output_ids == expected
            assert result.stats.draft_tokens == sum(n * c for counts in policy.chosen.values()
                                                    for n, c in counts.items())
    if curve[32] == 8.0:  # so steep that long drafts never pay: the policy did cut
        assert max(policy.record()["lengths"]) < 7


@pytest.mark.parametrize("runner", ["dynamic", "static"])
def test_without_a_cached_curve_the_engine_measures_one_before_the_timer(tmp_path, runner):
    target = tiny_llama(13, vocab=24, init=0.6)
    prompt = torch.randint(0, 24, (1, 10), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "costs" / "k.json"
    costs = VerifyCosts(6, path, {"test": True})
    runner = DynamicTarget(target) if runner == "dynamic" else GraphTarget(target, capture=False)
    engine = Engine(target, PromptLookupDrafter(3, 1), 5, GREEDY, 40, [], runner=runner,
                    length_policy=LengthPolicy(costs))
    result = engine.generate(prompt)
    assert result.output_ids == autoregressive(target, prompt, 40)
    assert costs.source == "calibrated" and not costs.needs_calibration and path.is_file()
    assert sum(costs.steps.values()) == result.stats.verify_steps  # then every verify step refines it
    cached = VerifyCosts(6, path)
    assert not cached.needs_calibration and cached.source.startswith("cache")


def test_prompt_lookup_names_the_kind_of_each_proposal(tmp_path):
    store = tmp_path / "store.jsonl"
    store.write_text(json.dumps({"prompt_ids": [50, 51], "output_ids": [60, 61, 62, 63, 64, 65, 66, 67, 68]}) + "\n")
    from specsweep.drafters.datastore import Datastore

    drafter = PromptLookupDrafter(4, 1, weak_ngram=3, recycling=TokenRecycling(4),
                                  datastore=Datastore(store, 2, 4, tokens=None))
    drafter.prepare([[1]])
    drafter.reset(torch.tensor([[1]]))
    propose = lambda ids, k=6: drafter.propose(torch.tensor([ids]), k)  # noqa: E731
    assert propose([5, 6, 7, 9, 5, 6, 7]).kind == "long_match:3"
    assert propose([5, 6, 7, 9, 5, 6, 7, 2, 9]).kind == "short_match:1"
    stored = propose([5, 6, 7, 9, 5, 6, 7, 2, 9, 61, 62], 5)
    assert stored.kind == "datastore" and stored.tokens.tolist() == [63, 64, 65, 66, 67]  # null: the depth
    recycled = propose([5, 6, 7, 9, 5, 6, 7, 2, 9, 61, 62, 99, 60])  # 60 is new here; (99, 60) is not stored
    assert recycled.kind == "recycling" and recycled.tokens.tolist() == [61, 62, 63, 64]  # the store's choices


# ---- configs and replay --------------------------------------------------------------------------

def test_experiment_best_uses_the_cost_policy_and_defaults_stay_fixed():
    best = compose_cfg(["experiment=best"])
    assert best.draft.length_policy == "cost" and best.tree.depth == 31
    assert best.draft.recycling.tokens == 31 and best.draft.datastore.tokens is None
    assert best.tree.depth + 1 == best.hardware.max_verify_tokens
    assert compose_cfg([]).draft.length_policy == "fixed"
    with pytest.raises(SpecsweepError, match="tree=chain"):
        decoding_settings(compose_cfg(["draft.length_policy=cost", "tree=binary"]))
    with pytest.raises(SpecsweepError, match="fixed, cost"):
        decoding_settings(compose_cfg(["draft.length_policy=longest"]))


def test_a_run_records_the_curve_and_the_lengths_and_caches_the_curve(model_dirs, tmp_path):
    from specsweep.app.run import run_decode

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def add(a, b):\n    return", "import os")))
    overrides = ["target=local", f"target.path={model_dirs['target']}", "dataset=jsonl", f"dataset.path={prompts}",
                 "decode.max_new_tokens=24", "hardware=cpu", f"cache_dir={tmp_path / 'cache'}", "tree.depth=6",
                 "draft.length_policy=cost"]
    metrics = run_decode(compose_cfg(overrides), tmp_path / "run", {})
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["draft_length"]
    assert record == json.loads(json.dumps(metrics["draft_length"]))
    assert record["curve"]["source"] == "calibrated" and set(record["curve"]["ratio"]) == {str(m) for m in range(1, 8)}
    assert sum(record["lengths"].values()) == sum(record["proposed"].values()) > 0
    (cached,) = (tmp_path / "cache" / "costs").glob("*.json")
    again = run_decode(compose_cfg(overrides), tmp_path / "again", {})
    assert again["draft_length"]["curve"]["source"] == f"cache {cached}"


def test_replay_predicts_speed_from_a_curve_and_runs_the_policy(tmp_path):
    sample = {"prompt_ids": [1, 2, 3, 4], "output_ids": [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]}
    result = replay.replay(PromptLookupDrafter(3, 1), 4, [sample], ratios=[1.0, 1.0, 1.1, 1.2, 1.3, 1.4])
    assert result["cost_per_step"] == pytest.approx((1.4 + 1.3) / 2)  # 5 rows, then 4 (as in test_replay)
    assert result["predicted_vs_ar"] == pytest.approx(9 / 2.7)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(sample) + "\n")
    out = tmp_path / "r.json"
    replay.main([str(samples), "--curve", "4=1.5", "--ours", "fixed=draft=prompt-lookup tree.depth=4",
                 "cost=draft=prompt-lookup tree.depth=4 draft.length_policy=cost", "--out", str(out)])
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fixed"]["predicted_vs_ar"] > 0 and "lengths" in rows["cost"]["draft_length"]
    with pytest.raises(SpecsweepError, match="--curve"):
        replay.main([str(samples), "--ours", "cost=draft=prompt-lookup draft.length_policy=cost"])


def test_a_loaded_model_is_frozen_so_the_verify_timing_keeps_no_graph_in_the_cache(model_dirs):
    """The run times its verify curve outside inference mode: with trainable weights every timed
    forward's activations stayed alive in the KV cache (20 GB for a 64-row curve on SmolLM2)."""
    from specsweep.app import models

    model = models.load_model(model_dirs["target"], Hardware(torch.device("cpu"), torch.float32, "sdpa"))
    assert not any(p.requires_grad for p in model.parameters())
    runner = DynamicTarget(model)
    VerifyCosts(6).calibrate(runner, torch.tensor([[5, 6, 7, 8]]), lambda: None, rounds=1)
    assert all(layer.keys.grad_fn is None and layer.values.grad_fn is None for layer in runner.cache.layers)
