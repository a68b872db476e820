"""The Bayesian-optimised layer-skip search (experiment=layer_skip_bo): trials, invalid sets, the sweep's
files, the sweeper settings refused before any trial."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from specsweep import CONF_DIR
from specsweep.app.run import run_decode
from specsweep.drafters.layer_skip import kept_layers
from specsweep.errors import SpecsweepError
from specsweep.tools import layer_bo
from specsweep.core.stats import predicted_speedup
from tests.test_cli import specsweep


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def add(a, b):", "import os\n", "x = 1")))
    return path


def settings(model_dirs, prompts, tmp_path) -> list[str]:
    """The tiny 3-layer target on two prompts, 6 continuation tokens each, sets of 1..2 layers."""
    return ["experiment=layer_skip_bo", "target=local", f"target.path={model_dirs['target']}", "dataset=jsonl",
            f"dataset.path={prompts}", "hardware=cpu", f"cache_dir={tmp_path / 'cache'}",
            "bo.calibration.limit=2", "bo.continuation_tokens=6", "bo.max_skip=2",
            "bo.skip_prior=0.5"]  # of 3 layers: the default 0.2 would skip none in half the proposals


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_the_sweep_writes_every_trial_bo_json_and_a_draft_that_decodes(model_dirs, prompts, tmp_path):
    sweep = tmp_path / "sweep"
    proc = specsweep("-m", *settings(model_dirs, prompts, tmp_path), "hydra.sweeper.n_trials=6",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((sweep / "bo.json").read_text())
    trials = result["trials"]
    assert [t["trial"] for t in trials] == list(range(6)) and result["num_layers"] == 3
    for t in trials:  # each trial's own record, and the objective the sweeper got
        assert json.loads((sweep / str(t["trial"]) / "trial.json").read_text())["objective"] == t["objective"]
        assert isinstance(t["objective"], float)
        if t["invalid"]:
            assert t["objective"] == 0.0 and t["agreement"] is None
        else:  # the measured costs, as bo.json records them
            gamma, verify = t["best_gamma"], result["costs"]["verify_ratio"]
            assert 1 <= len(t["skipped"]) <= 2 and t["objective"] == t["predicted_speedup"] == pytest.approx(
                predicted_speedup(t["agreement"], gamma, gamma * t["cost_ratio"] + verify[str(gamma + 1)]))
    valid = {tuple(t["skipped"]) for t in trials if not t["invalid"]}
    assert [t["evaluations"] for t in trials][-1] == result["evaluations"] == len(valid)
    best = result["best"]
    assert best["predicted_speedup"] == max(t["objective"] for t in trials)
    optimization = yaml.safe_load((sweep / "optimization_results.yaml").read_text())  # the sweeper's own
    assert optimization["best_value"] == pytest.approx(best["predicted_speedup"])
    assert result["skip_prior"] == 0.5 and all(0 <= v <= 1 for v in optimization["best_params"].values())
    assert sorted(int(k.rsplit("layer", 1)[1]) for k, v in optimization["best_params"].items() if v < 0.5) == \
        best["skipped"]
    assert {"git_commit", "lock_sha256", "cpu"} <= set(result["environment"])  # where the figures came from
    assert "layer-skip BO on local" in proc.stdout and "evaluations" in proc.stdout

    # the draft config: the greedy search's format, accepted by draft=... as any file of conf/draft/
    draft = OmegaConf.load(sweep / "layer-skip-local.yaml")
    assert draft.skip_layers == best["skipped"] and draft.exit_layer is None and draft.name == "layer-skip-local"
    assert "hydra.sweeper.n_trials=6" in (sweep / "layer-skip-local.yaml").read_text()  # the command, as a comment
    (tmp_path / "conf" / "draft").mkdir(parents=True)
    shutil.copy(sweep / "layer-skip-local.yaml", tmp_path / "conf" / "draft")
    cfg = composed(*settings(model_dirs, prompts, tmp_path)[1:7], "draft=layer-skip-local",
                   f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "dataset.limit=1", "decode.max_new_tokens=4",
                   "evaluate=false")
    metrics = run_decode(cfg, tmp_path / "decode", {"draft": "layer-skip-local"})
    assert metrics["new_tokens"] >= 1 and metrics["draft_tokens"] >= 1


@pytest.mark.parametrize("skip, reason", [
    ([], "no layer skipped"),
    ([0, 1, 2], "every layer skipped"),
    ([0, 2], "2 layers skipped, more than bo.max_skip=1"),
])
def test_an_invalid_skip_set_gets_objective_zero_unscored(model_dirs, prompts, tmp_path, skip, reason):
    cfg = composed(*settings(model_dirs, prompts, tmp_path), "bo.max_skip=1",
                   *[f"++bo.skip.layer{i}=true" for i in skip])
    assert layer_bo.job(cfg, tmp_path) == 0.0
    record = json.loads((tmp_path / "trial.json").read_text())
    assert record["invalid"].startswith(reason) and record["skipped"] == skip and not record["scored"]


def test_a_valid_set_is_scored_once_per_process(model_dirs, prompts, tmp_path):
    cfg = composed(*settings(model_dirs, prompts, tmp_path), "++bo.skip.layer1=true", "++bo.skip.layer0=false")
    objective = layer_bo.job(cfg, tmp_path)
    first = json.loads((tmp_path / "trial.json").read_text())
    costs = first["costs"]  # the draft step: its fixed part and two of the three layers
    assert first["cost_ratio"] == pytest.approx(costs["fixed_ratio"] + 2 * costs["per_layer_ratio"])
    assert first["skipped"] == [1] and objective == first["predicted_speedup"] > 0
    assert kept_layers(3, None, first["skipped"]) == [0, 2]
    assert layer_bo.job(cfg, tmp_path) == objective  # the cached context and score: not scored again
    assert json.loads((tmp_path / "trial.json").read_text())["scored"] is False


def test_a_skip_key_that_is_no_layer_is_refused(model_dirs, prompts, tmp_path):
    cfg = composed(*settings(model_dirs, prompts, tmp_path), "++bo.skip.layer3=true")
    with pytest.raises(SpecsweepError, match=r"bo.skip.layer3: not a layer of the target \(bo.skip.layerNN, NN in 0..2\)"):
        layer_bo.job(cfg, tmp_path)


def test_the_search_space_is_one_value_per_layer_of_the_target(model_dirs, prompts, tmp_path):
    asked = {}

    class Trial:
        def suggest_float(self, name, low, high):
            asked[name] = (low, high)

    layer_bo.skip_space(composed(*settings(model_dirs, prompts, tmp_path)), Trial())
    assert asked == {f"++bo.skip.layer{i}": (0.0, 1.0) for i in range(3)}
    assert layer_bo.param_name(3, 30) == "bo.skip.layer03" and layer_bo.param_name(7, 101) == "bo.skip.layer007"


def test_a_layer_is_skipped_below_the_prior_or_when_true():
    skip = {"layer0": 0.19, "layer1": 0.2, "layer2": True, "layer3": False, "layer4": 0, "layer5": 1}
    assert layer_bo.skipped_layers(skip, 6, 0.2) == [0, 2, 4]
    for value in (1.5, -0.1, "yes"):
        with pytest.raises(SpecsweepError, match=r"bo.skip.layer1=.*: expected true, false or a value in \[0, 1\]"):
            layer_bo.skipped_layers({"layer1": value}, 6, 0.2)


def test_evaluations_count_distinct_valid_sets():
    trials = [{"invalid": None, "skipped": [1], "predicted_speedup": 0.9}, {"invalid": "x", "skipped": []},
              {"invalid": None, "skipped": [1], "predicted_speedup": 0.9},
              {"invalid": None, "skipped": [2], "predicted_speedup": 0.95}]
    layer_bo.with_evaluations(trials)
    assert [t["evaluations"] for t in trials] == [1, 1, 1, 2]
    assert [t["skipped"] for t in layer_bo.improvements(trials)] == [[1], [2]]


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0: must be an integer >= 1"),
    ("hydra.sweeper.n_trials=-3", "hydra.sweeper.n_trials=-3: must be an integer >= 1"),
    ("hydra.sweeper.n_jobs=0", "hydra.sweeper.n_jobs=0: must be an integer >= 1"),
    ("hydra.sweeper.direction=minimize", "hydra.sweeper.direction=minimize: the objective is a speedup"),
    ("hydra.sweeper.storage=sqlite:///x.db", "hydra.sweeper.storage=sqlite:///x.db: only the in-memory study"),
    ("bo.max_gamma=0", "bo.max_gamma=0: must be >= 1"),
    ("bo.max_skip=0", "bo.max_skip=0: must be >= 1"),
    ("bo.skip_prior=0", "bo.skip_prior=0: must be in (0, 1)"),
    ("bo.skip_prior=1.0", "bo.skip_prior=1.0: must be in (0, 1)"),
    ("++bo.skip.layer1=true", "bo.skip: the sweeper sets it per trial"),
])
def test_bad_sweep_settings_stop_before_any_trial_in_one_line(model_dirs, prompts, tmp_path, capsys, override, message):
    config = composed(*settings(model_dirs, prompts, tmp_path), override, hydra=True)
    with pytest.raises(SystemExit) as stop:
        layer_bo.BOSummary().on_multirun_start(config)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"specsweep: error: {message}"), err
    with pytest.raises(SpecsweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layer_bo.check_sweep(config)


def test_n_trials_zero_exits_2_in_one_line(model_dirs, prompts, tmp_path):
    sweep = tmp_path / "sweep"
    proc = specsweep("-m", *settings(model_dirs, prompts, tmp_path), "hydra.sweeper.n_trials=0",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["specsweep: error: hydra.sweeper.n_trials=0: must be an integer >= 1"]
    assert not sweep.exists()


def test_max_skip_must_leave_a_layer(model_dirs, prompts, tmp_path):
    cfg = composed(*settings(model_dirs, prompts, tmp_path), "bo.max_skip=3", "++bo.skip.layer0=true")
    with pytest.raises(SpecsweepError, match=r"bo.max_skip=3: the target has 3 layers \(use 1..2, or null\)"):
        layer_bo.job(cfg, tmp_path)
