"""The report from hand-written results files (no models), and the pass@1 glue it reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from specsweep.app import report
from specsweep.core.engine import SampleStats
from specsweep.core.stats import summarize
from specsweep.errors import SpecsweepError
from specsweep.evaluation import pass_at_1, sandbox

PNG = b"\x89PNG\r\n\x1a\n"
TREES = {"chain4": {"name": "chain", "shape": "chain", "depth": 4},
         "cascade": {"name": "chain", "shape": "chain", "depth": 15}}


def config(draft: str, tree: dict, limit: int = 3) -> dict:
    return {"target": {"name": "smollm2-135m", "path": "embedded:smollm2-135m-instruct"},
            "draft": {"name": draft}, "tree": tree,
            "dataset": {"name": "humaneval", "limit": limit, "offset": 0, "prompt_format": "plain"},
            "decode": {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "max_new_tokens": 64},
            "hardware": {"name": "auto"}, "logger": {"name": "none"}, "job": "decode", "seed": 0}


def choices(draft: str, tree: str = "chain") -> dict:
    return {"target": "smollm2-135m", "draft": draft, "tree": tree, "dataset": "humaneval", "decode": "greedy",
            "hardware": "auto", "logger": "none"}


def metrics(draft: str, tree: dict, tokens_per_s: float, accepted: int = 0, drafted: int = 0, steps: int = 100,
            pass1: float | None = 0.5, **extra) -> dict:
    new = 192
    wall = new / tokens_per_s
    return {"samples": 3, "new_tokens": new, "tokens_per_s": tokens_per_s, "draft_tokens": drafted,
            "accepted_tokens": accepted, "acceptance_rate": accepted / drafted if drafted else None,
            "acceptance_length": accepted / steps, "tokens_per_target_forward": accepted / steps + 1,
            "verify_steps": steps, "target_forwards": steps + 3, "wall_s": wall, "prefill_s": 0.1 * wall,
            "draft_s": 0.2 * wall if drafted else 0.0, "verify_s": 0.6 * wall, "other_s": 0.1 * wall,
            "draft_counters": {}, "config": config(draft, tree), "choices": choices(draft, tree["name"]),
            "evaluation": None if pass1 is None else {"pass_at_1": pass1, "evaluated": 2, "isolation": "namespaces"},
            "hardware": {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa", "torch_threads": 2},
            "git_commit": "0123abcd", "torch": "2.13.0+cpu", "transformers": "5.23.0", "python": "3.11.7",
            "host": "testhost", "cpu": "x86_64", "cpu_count": 2, **extra}


def job(sweep: Path, number: int, metrics_: dict | None = None, error: str | None = None,
        cfg: dict | None = None, chosen: dict | None = None) -> Path:
    path = sweep / str(number)
    (path / ".hydra").mkdir(parents=True)
    cfg = cfg or (metrics_ or {}).get("config") or config("none", TREES["chain4"])
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    hydra = {"hydra": {"runtime": {"choices": chosen or (metrics_ or {}).get("choices") or choices("none")}}}
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if metrics_:
        (path / "metrics.json").write_text(json.dumps(metrics_))
    if error:
        (path / "error.json").write_text(json.dumps({"error": error, "type": "SpecsweepError",
                                                     "choices": chosen, "traceback": ""}))
    return path


@pytest.fixture
def sweeps(tmp_path):
    """A seed-000 style sweep (baseline, two drafts, a failed and a missing job) and a tree study
    sweep without its own baseline."""
    seed000 = tmp_path / "outputs" / "seed000"
    job(seed000, 0, metrics("none", TREES["chain4"], 20.0, pass1=0.5))
    job(seed000, 1, metrics("layer-skip", TREES["chain4"], 30.0, accepted=150, drafted=400, pass1=0.5))
    job(seed000, 2, metrics("cascade", TREES["cascade"], 10.0, accepted=120, drafted=1200))
    job(seed000, 3, error="tree=binary: the decode engine verifies chains only (tree=chain)",
        cfg=config("prompt-lookup", {"name": "binary", "shape": "binary", "depth": 3}),
        chosen=choices("prompt-lookup", "binary"))
    job(seed000, 4, cfg=config("bigram", TREES["chain4"]), chosen=choices("bigram"))

    trees = tmp_path / "outputs" / "trees"
    for number, depth in enumerate((1, 2, 4)):
        tree = {"name": "chain", "shape": "chain", "depth": depth}
        job(trees, number, metrics("prompt-lookup", tree, 20.0 + 5 * depth, accepted=30 * depth,
                                   drafted=100 * depth, pass1=None))
    for number, (depth, nodes) in enumerate(((1, 2), (2, 6)), start=3):
        tree = {"name": "binary", "shape": "binary", "depth": depth}
        extra = {"tree_nodes": nodes, "tree_depth": depth} if depth == 1 else {}  # depth 2: counted from config
        job(trees, number, metrics("prompt-lookup", tree, 22.0, accepted=40 * depth, drafted=100 * nodes,
                                   pass1=None, **extra))
    return seed000, trees


def test_report_tables_plots_and_provenance(sweeps, tmp_path, capsys):
    seed000, trees = sweeps
    out = tmp_path / "results"
    assert report.main([str(seed000), str(trees), "--out", str(out)]) == 0
    assert f"report: {out / 'REPORT.md'}" in capsys.readouterr().out
    text = (out / "REPORT.md").read_text()

    # (a) seed 000's target x strategy table, one per sweep, failed and missing jobs included
    assert "## seed000" in text and "## trees" in text
    assert "3 finished, 1 failed, 1 missing" in text
    # (no samples.jsonl here: no intervals, no alpha_k, no prediction)
    assert ("| smollm2-135m | autoregressive (draft=none) | 20.00 | 1.00x | - | - | 0.000 | 1.000 | - | 0.500 (n=2) "
            "| 192 | 0 |" in text)
    assert ("| smollm2-135m | layer-skip, chain γ=4 | 30.00 | 1.50x | - | 0.375 | 1.500 | 2.500 | - | 0.500 (n=2) "
            "| 192 | 1 |" in text)
    assert ("| smollm2-135m | cascade, chain γ=15 | 10.00 | 0.50x | - | 0.100 | 1.200 | 2.200 | - | 0.500 (n=2) "
            "| 192 | 2 |" in text)
    assert "| smollm2-135m | prompt-lookup, binary depth=3, 14 nodes | **failed** |" in text
    assert "- job 3 (prompt-lookup, binary depth=3, 14 nodes): failed: tree=binary: the decode engine verifies chains only" in text
    assert "- job 4 (bigram, chain γ=4): missing:" in text
    # the tree sweep has no draft=none run: its speedup comes from seed000 (same settings, same host)
    assert "1.25x (baseline: seed000)" in text

    # provenance from metrics.json
    assert "testhost (x86_64, 2 CPUs; cpu, float32, sdpa, 2 torch threads)" in text
    assert "torch 2.13.0+cpu, transformers 5.23.0" in text and "commit: 0123abcd" in text
    assert "- finished: 20" in text
    assert "max 64 new tokens" in text

    # (c) time breakdown per run: table and stacked bar plot
    assert "| 1 | smollm2-135m | layer-skip, chain γ=4 | 3.3 | 6.7 | 20.0 | 3.3 | 33.3 |" in text
    assert "![time breakdown of seed000](time_seed000.png)" in text

    # (b) seed 001: acceptance vs draft tokens per shape and draft (tree nodes; counted when missing)
    assert "## Acceptance vs draft tokens (seed 001)" in text
    assert "| smollm2-135m | prompt-lookup | binary | binary depth=1, 2 nodes | 2 | 2.00 | 0.200 | 0.400 |" in text
    assert "| smollm2-135m | prompt-lookup | binary | binary depth=2, 6 nodes | 6 | 6.00 | 0.133 | 0.800 |" in text
    assert ("| smollm2-135m | prompt-lookup | chain | chain γ=4 | 4 | 4.00 | 0.300 | 1.200 | - | - | 40.00 | 2.00x | - "
            "| trees/2 |" in text)
    assert "![acceptance vs draft tokens, smollm2-135m](acceptance_smollm2-135m.png)" in text
    assert "seed000/1 |" not in text  # seed000 ran one tree per draft: not part of the tree study

    for name in ("time_seed000.png", "time_trees.png", "acceptance_smollm2-135m.png"):
        assert (out / name).read_bytes()[:8] == PNG, name


def decoded(walls: list[float], depth: int = 0, accepted: list[list[int]] | None = None) -> list[SampleStats]:
    """Per prompt: 24 new tokens in ``walls[i]`` seconds; chains of ``depth`` with these accepted counts."""
    out = []
    for i, wall in enumerate(walls):
        steps = accepted[i] if accepted else [0] * 23
        out.append(SampleStats(new_tokens=24, draft_tokens=depth * len(steps), accepted_tokens=sum(steps),
                               verify_steps=len(steps), wall_s=wall, verify_s=0.9 * wall, accepted_per_step=steps,
                               drafted_per_step=[depth] * len(steps), depth_per_step=[depth] * len(steps)))
    return out


def decoded_job(sweep: Path, number: int, draft: str, stats: list[SampleStats], **extra) -> Path:
    """A job dir whose metrics.json and samples.jsonl come from these counters."""
    tree = {"name": "chain", "shape": "chain", "depth": max(s.depth_per_step[0] for s in stats) or 4}
    path = job(sweep, number, {**metrics(draft, tree, 1.0, pass1=None), **summarize(stats), **extra})
    rows = [{"task_id": f"HumanEval/{i}", "output_ids": [1] * s.new_tokens, **vars(s)} for i, s in enumerate(stats)]
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_leads_with_intervals_alpha_k_and_paired_speedups(tmp_path):
    sweep = tmp_path / "paired"
    walls = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]
    decoded_job(sweep, 0, "none", decoded(walls))
    # job 1: twice as fast on every prompt; job 2 the same but slower than AR on one prompt; job 3 = job 1
    runs = [[4, 0, 2, 1, 4]] * 6
    decoded_job(sweep, 1, "prompt-lookup", decoded([w / 2 for w in walls], 4, runs),
                predicted={"speedup": 2.4, "speedup_with_draft": 2.3})
    decoded_job(sweep, 2, "bigram", decoded([w / 2 for w in walls[:5]] + [1.25], 4, runs))
    decoded_job(sweep, 3, "layer-skip", decoded([w / 2 for w in walls], 4, runs))
    assert report.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    # every prompt exactly 2x: a zero-width interval, the predicted speedup beside it; jobs 1 and 3 are the
    # same, job 2 differs on one prompt of six (a resample without it shows no difference): none told apart,
    # while each differs from the baseline
    assert ("| prompt-lookup, chain γ=4 | 48.00 [43.64, 53.33] | 2.00x [2.00, 2.00] | 2.40x / 2.30x | 0.550 [0.550, 0.550] "
            "| 2.200 [2.200, 2.200] | 3.200 | 0.80 0.75 0.67 1.00 | - | 144 | 1 | exact | 2, 3 |") in text
    assert "| bigram, chain γ=4 | 38.40 [27.16, 52.36] | 1.60x [1.13, 2.00] | - |" in text
    assert "| 144 | 0 | reference | - |" in text
    # alpha_k from the steps (4, 0, 2, 1, 4): offered 5, 4, 3, 2 times; accepted 4, 3, 2, 2
    assert "0.80 0.75 0.67 1.00" in text
    assert "| 1 | prompt-lookup, chain γ=4 | 0.80 [0.80, 0.80] | 0.75 [0.75, 0.75] |" in text
    assert "- job 2 (bigram, chain γ=4): 1 of 6 prompts: HumanEval/5 0.80x" in text
    assert "- job 1 (prompt-lookup, chain γ=4): 0 of 6 prompts" in text
    for name in ("positions_paired.png", "prompts_paired.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG, name


def test_report_defaults_to_the_first_sweep_dir_and_reads_a_single_run_dir(sweeps):
    seed000, _ = sweeps
    assert report.main([str(seed000)]) == 0
    text = (seed000 / "REPORT.md").read_text()
    assert "## seed000" in text and "Acceptance vs draft tokens" not in text  # one tree per draft: no study
    assert (seed000 / "time_seed000.png").is_file()

    assert report.main([str(seed000 / "1")]) == 0  # a single run's dir
    assert "layer-skip, chain γ=4 | 30.00 | - |" in (seed000 / "1" / "REPORT.md").read_text()


def test_equally_named_sweeps_are_told_apart(tmp_path):
    for scale in ("quick", "full"):
        job(tmp_path / scale / "seed000", 0, metrics("none", TREES["chain4"], 20.0))
    assert report.main([str(tmp_path / "quick" / "seed000"), str(tmp_path / "full" / "seed000"),
                        "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "## quick/seed000" in text and "## full/seed000" in text


def test_a_dir_without_results_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "0").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "specsweep: error:" in capsys.readouterr().err
    with pytest.raises(SpecsweepError, match="no results here"):
        report.load_sweeps([tmp_path / "empty"])
    with pytest.raises(SpecsweepError, match="no such directory"):
        report.load_sweeps([tmp_path / "nowhere"])
    assert not (tmp_path / "empty" / "REPORT.md").exists()


def test_wandb_publishing_skips_with_a_reason_when_it_cannot(sweeps, monkeypatch, capsys):
    seed000, _ = sweeps
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # not installed
    assert report.main([str(seed000), "--wandb"]) == 0
    out = capsys.readouterr().out
    assert "W&B report: skipped: wandb-workspaces is not installed" in out
    assert (seed000 / "REPORT.md").is_file()


# ---- pass@1 glue (specsweep/evaluation/pass_at_1.py) ------------------------------------------

EVAL = OmegaConf.create({"timeout_s": 5, "memory_mb": 512, "workers": 2})


def test_score_samples_merges_per_sample_results_and_a_summary():
    problems = pass_at_1.humaneval.load_problems()[:3]
    samples = [
        {"task_id": problems[0]["task_id"], "text": problems[0]["canonical_solution"] + "\n\ndef unrelated():\n    1/0\n"},
        {"task_id": problems[1]["task_id"], "text": "    return []\n"},
        {"task_id": problems[2]["task_id"], "text": problems[2]["canonical_solution"]},
    ]
    fields, summary = pass_at_1.score_samples(samples, problems, EVAL)
    assert [f["passed"] for f in fields] == [True, False, True]
    assert fields[0]["completion"] == problems[0]["canonical_solution"] + "\n"  # cut at the next top-level def
    assert fields[1]["result"].startswith("failed")
    assert summary["pass_at_1"] == pytest.approx(2 / 3) and summary["evaluated"] == 3
    assert summary["isolation"] in sandbox.LEVELS


def test_chat_replies_are_scored_as_a_redefinition():
    problem = pass_at_1.humaneval.load_problems()[0]
    body = problem["prompt"] + problem["canonical_solution"]
    reply = f"Here is the function:\n```python\n{body}```\nIt compares every pair."
    assert pass_at_1.completion_of(reply, "chat") == "\n" + body
    fields, summary = pass_at_1.score_samples([{"task_id": problem["task_id"], "text": reply}], [problem], EVAL,
                                              prompt_format="chat")
    assert fields[0]["passed"] and summary["pass_at_1"] == 1.0


def test_scoring_needs_the_problems_tests():
    with pytest.raises(SpecsweepError, match="no HumanEval tests for task ids"):
        pass_at_1.score_samples([{"task_id": "x/0", "text": ""}], [{"task_id": "x/0", "prompt": "p"}], EVAL)


@pytest.mark.parametrize("evaluate, dataset, expected", [
    ("auto", "humaneval", True), ("auto", "jsonl", False), (True, "humaneval", True), (False, "humaneval", False),
])
def test_evaluate_setting(evaluate, dataset, expected):
    assert pass_at_1.enabled(evaluate, dataset) is expected


@pytest.mark.parametrize("evaluate, message", [(True, "dataset=jsonl has no tests"), ("sometimes", "choose auto")])
def test_evaluate_setting_errors(evaluate, message):
    with pytest.raises(SpecsweepError, match=message):
        pass_at_1.enabled(evaluate, "jsonl")


def test_wandb_report_is_built_from_the_sweeps_groups(sweeps, monkeypatch, capsys):
    """Publishing against a stand-in for wandb-workspaces (the real one needs an online account)."""
    import types

    import wandb

    seed000, trees = sweeps
    built = {}

    def record(kind):
        def make(**kwargs):
            built.setdefault(kind, []).append(kwargs)
            return types.SimpleNamespace(save=lambda: None, url="https://wandb.example/report", **kwargs)
        return make

    v2 = types.ModuleType("wandb_workspaces.reports.v2")
    for kind in ("Report", "PanelGrid", "Runset", "BarPlot", "ScatterPlot", "MarkdownBlock"):
        setattr(v2, kind, record(kind))
    for name, module in (("wandb_workspaces", types.ModuleType("wandb_workspaces")),
                         ("wandb_workspaces.reports", types.ModuleType("wandb_workspaces.reports")),
                         ("wandb_workspaces.reports.v2", v2)):
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["wandb_workspaces.reports"].v2 = v2
    sys.modules["wandb_workspaces"].reports = sys.modules["wandb_workspaces.reports"]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "Api", lambda timeout: types.SimpleNamespace(default_entity="me"))

    assert report.main([str(seed000), str(trees), "--wandb"]) == 0
    assert "W&B report: published: https://wandb.example/report" in capsys.readouterr().out
    [runset] = built["Runset"]
    assert runset["entity"] == "me" and runset["project"] == "specsweep"
    assert runset["filters"] == "Metric('Group') in ['outputs/seed000', 'outputs/trees']"
    assert {p["title"] for p in built["ScatterPlot"]} == {"acceptance rate vs draft tokens",
                                                          "acceptance length vs draft tokens"}
    [markdown] = built["MarkdownBlock"]
    assert "| layer-skip, chain γ=4 |" in markdown["text"] and ".png)" not in markdown["text"]
