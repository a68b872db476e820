"""The layer-skip search: agreement scoring, the greedy trajectory, the speed model, the written config."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from specsweep.drafters.layer_skip import kept_layers
from specsweep.errors import SpecsweepError
from specsweep.core.stats import predicted_speedup
from specsweep.tools.layer_costs import SkipCosts, measure, skip_costs
from specsweep.tools.layer_search import AgreementScorer, check_settings, early_exits, greedy_search
from tests.conftest import tiny_llama
from tests.test_cli import specsweep


@pytest.fixture(scope="module")
def scorer():
    model = tiny_llama(0, layers=5, init=0.3)
    torch.manual_seed(1)
    sequences = [torch.randint(0, 96, (1, n)) for n in (20, 27)]
    with torch.inference_mode():
        return AgreementScorer(model, sequences, prompt_lens=[8, 15])


def test_the_full_model_agrees_with_itself(scorer):
    assert scorer.positions == 12 + 12
    with torch.inference_mode():
        assert scorer.agreement(list(range(5))) == 1.0


def test_removal_scores_reuse_the_prefix_exactly(scorer):
    kept = [0, 2, 3, 4]
    with torch.inference_mode():
        scores = scorer.removal_scores(kept, kept)
        assert scores == {k: scorer.agreement([i for i in kept if i != k]) for k in kept}
        assert scorer.removal_scores(kept, [3, 4]) == {3: scores[3], 4: scores[4]}


# a draft step: 0.2 of a one-row forward for the embedding and head, 0.15 per kept layer of 5;
# a verify of n rows: 1 + 0.1 (n - 1)
COSTS = SkipCosts(5, {1: 0.35, 3: 0.65, 5: 0.95}, {n: 1.0 + 0.1 * (n - 1) for n in range(1, 10)}, 20, "given")


@pytest.mark.parametrize("candidates", [None, 2])
def test_trajectory_grows_one_layer_per_step(scorer, candidates):
    with torch.inference_mode():
        trajectory = greedy_search(scorer, COSTS, max_skip=4, max_gamma=8, candidates=candidates)
        exits = early_exits(scorer, COSTS, max_skip=4, max_gamma=8)
    previous, evaluations = set(), 0
    for k, row in enumerate(trajectory, 1):
        evaluations += len(row["candidates"])
        assert row["evaluations"] == evaluations  # skip sets scored so far (layer_skip_bo counts its trials so)
        assert len(row["skipped"]) == k and previous < set(row["skipped"])
        assert row["agreement"] == max(row["candidates"].values())
        assert len(row["candidates"]) == (5 - k + 1 if candidates is None or k == 1 else min(candidates, 5 - k + 1))
        assert row["cost_ratio"] == pytest.approx(0.2 + 0.15 * (5 - k)) and 1 <= row["best_gamma"] <= 8
        gamma = row["best_gamma"]
        assert row["predicted_speedup"] == pytest.approx(predicted_speedup(
            row["agreement"], gamma, gamma * row["cost_ratio"] + 1 + 0.1 * gamma))
        previous = set(row["skipped"])
    assert [e["exit_layer"] for e in exits] == [4, 3, 2, 1]


def test_the_cost_model_counts_the_fixed_part_of_a_draft_step():
    assert COSTS.draft_ratio(1) == pytest.approx(0.35) and COSTS.draft_ratio(0) == pytest.approx(0.2)
    estimate = COSTS.estimate(0.8, 2, max_gamma=3)  # a draft step of 0.5
    best = max(range(1, 4), key=lambda g: (1 - 0.8 ** (g + 1)) / 0.2 / (0.5 * g + 1 + 0.1 * g))
    assert estimate["best_gamma"] == best and estimate["predicted_speedup"] == pytest.approx(
        (1 - 0.8 ** (best + 1)) / 0.2 / (0.5 * best + 1 + 0.1 * best))
    assert COSTS.estimate(0.0, 4, max_gamma=8)["best_gamma"] == 1  # nothing accepted: the shortest draft


def test_a_verify_timed_cheaper_than_a_smaller_one_is_taken_at_the_smaller_cost():
    costs = SkipCosts(2, {1: 0.5, 2: 1.0}, {1: 1.0, 2: 1.3, 3: 1.2}, 10, "given")
    assert [costs.verify_ratio(n) for n in (1, 2, 3)] == pytest.approx([1.0, 1.25, 1.25])


def test_costs_are_measured_once_per_machine_and_setting(scorer, tmp_path):
    from specsweep.backends import hardware

    hw = hardware.resolve(OmegaConf.create({"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa",
                                            "threads": None}))
    with torch.inference_mode():
        measured = skip_costs(scorer.target, "tiny", hw, tmp_path, scorer.sequences[0], max_gamma=3)
        again = skip_costs(scorer.target, "tiny", hw, tmp_path, scorer.sequences[0], max_gamma=3)
        longer = skip_costs(scorer.target, "tiny", hw, tmp_path, scorer.sequences[0], max_gamma=4)
    assert measured.source == "measured" and again.source.startswith("cache ") and longer.source == "measured"
    assert sorted(measured.draft) == [1, 2, 5] and sorted(measured.verify) == [1, 2, 3, 4]
    assert (again.draft, again.verify) == (measured.draft, measured.verify)
    assert all(t > 0 for t in [*measured.draft.values(), *measured.verify.values()])
    with torch.inference_mode():
        assert sorted(measure(scorer.target, scorer.sequences[1], 1, rounds=1).verify) == [1, 2]


@pytest.mark.parametrize("setting, message", [
    ({"max_skip": 5}, "search.max_skip=5: the target has 5 layers (use 1..4)"),
    ({"max_skip": 0}, "search.max_skip=0"),
    ({"max_gamma": 0}, "search.max_gamma=0: must be >= 1"),
    ({"candidates": 0}, "search.candidates=0: must be >= 1"),
    ({"continuation_tokens": 0}, "search.continuation_tokens=0: must be >= 1"),
])
def test_bad_settings_are_refused(scorer, setting, message):
    search = OmegaConf.create({"max_skip": 2, "max_gamma": 8, "candidates": None, "continuation_tokens": 8,
                               **setting})
    with pytest.raises(SpecsweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settings(search, scorer.target)


def test_app_writes_a_ready_draft_config(model_dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def add(a, b):", "import os\n", "x = 1")))
    args = ["experiment=layer_skip_search", "target=local", f"target.path={model_dirs['target']}", "dataset=jsonl",
            f"dataset.path={prompts}", "hardware=cpu", f"cache_dir={tmp_path / 'cache'}",
            "search.calibration.offset=1", "search.calibration.limit=2", "search.continuation_tokens=6"]
    run_dir = tmp_path / "run"
    proc = specsweep(*args, "search.max_skip=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run_dir / "search.json").read_text())
    assert result["calibration"]["task_ids"] == ["prompts/1", "prompts/2"]
    assert [len(row["skipped"]) for row in result["trajectory"]] == [1, 2]
    assert [row["exit_layer"] for row in result["early_exit"]] == [2, 1]
    assert {"git_commit", "lock_sha256", "cpu"} <= set(result["environment"])  # where the figures came from
    draft = OmegaConf.load(run_dir / "layer-skip-local.yaml")
    assert draft._target_ == "specsweep.drafters.layer_skip.LayerSkipDrafter" and draft.name == "layer-skip-local" and draft.exit_layer is None
    assert draft.skip_layers == result["chosen"]["skipped"]
    assert kept_layers(3, draft.exit_layer, draft.skip_layers)
    assert "search.max_skip=2" in (run_dir / "layer-skip-local.yaml").read_text()  # the command, as a comment
    assert "layer-skip search on local" in proc.stdout

    proc = specsweep(*args, "search.max_skip=3", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "specsweep: error: search.max_skip=3: the target has 3 layers (use 1..2)"
