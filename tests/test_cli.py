"""The app as a user runs it: `python -m specsweep ...` in a subprocess, on tiny local models."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"task_id": "a", "prompt": "def add(a, b):\n    return"}, {"prompt": "import os\nimport"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def specsweep(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "specsweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def base_args(model_dirs, prompts, tmp_path):
    return ["target=local", f"target.path={model_dirs['target']}", "dataset=jsonl", f"dataset.path={prompts}",
            "decode.max_new_tokens=12", "hardware=cpu", f"cache_dir={tmp_path / 'cache'}"]


def test_single_run_writes_the_results_contract(model_dirs, prompts, tmp_path):
    run_dir = tmp_path / "run"
    proc = specsweep(*base_args(model_dirs, prompts, tmp_path), "draft=model", f"draft.path={model_dirs['draft']}",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("tokens_per_s", "acceptance_rate", "acceptance_length", "tokens_per_target_forward", "draft_tokens",
                "accepted_tokens", "new_tokens", "target_forwards", "wall_s", "draft_s", "verify_s",
                "choices", "git_commit", "torch", "transformers", "hardware", "config"):
        assert key in metrics, key
    assert metrics["choices"]["draft"] == "model" and metrics["samples"] == 2
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["a", "prompts/1"] and {s["repeat"] for s in samples} == {0}
    assert all(len(s["output_ids"]) == s["new_tokens"] <= 12 and s["prompt_ids"] for s in samples)
    assert sum(s["new_tokens"] for s in samples) == metrics["new_tokens"]
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_repeats_decode_every_prompt_pass_after_pass(model_dirs, prompts, tmp_path):
    run_dir = tmp_path / "run"
    proc = specsweep(*base_args(model_dirs, prompts, tmp_path), "draft=prompt-lookup", "repeats=2",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["task_id"], s["repeat"]) for s in samples] == [("a", 0), ("prompts/1", 0), ("a", 1), ("prompts/1", 1)]
    assert samples[0]["output_ids"] == samples[2]["output_ids"]  # a repeat decodes the same tokens again
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["repeats"] == 2 and metrics["samples"] == 4


def test_a_swept_key_reaches_only_the_drafts_that_have_it(model_dirs, prompts, tmp_path):
    """The grid sweeper: draft=none has no max_ngram, so it runs once, without it; a key no draft
    has is refused in one line before any job runs."""
    sweep = tmp_path / "sweep"
    args = ["-m", *base_args(model_dirs, prompts, tmp_path), "draft=none,prompt-lookup", f"hydra.sweep.dir={sweep}"]
    proc = specsweep(*args, "draft.max_ngram=2,3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["draft"], r["draft.max_ngram"], r["status"]) for r in rows] == [
        ("none", "", "ok"), ("prompt-lookup", "2", "ok"), ("prompt-lookup", "3", "ok")]
    assert "draft.max_ngram" in proc.stdout  # the table's column

    proc = specsweep(*args, "draft.max_ngrams=2,3", f"hydra.sweep.dir={tmp_path / 'typo'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("specsweep: error: draft.max_ngrams=2: no job of this sweep "
                                                    "has the key draft.max_ngrams")
    assert not (tmp_path / "typo" / "0").exists()


def test_multirun_summarises_every_job_and_reports_failures(model_dirs, prompts, tmp_path):
    sweep = tmp_path / "sweep"
    # the draft model's path in a draft config of the user's own (a draft takes only its own keys,
    # so `++draft.path` over the whole sweep would be refused by prompt lookup)
    conf = tmp_path / "conf"
    (conf / "draft").mkdir(parents=True)
    (conf / "draft" / "local.yaml").write_text(f"defaults: [model, _self_]\nname: local\npath: {model_dirs['draft']}\n")
    drafts = ["draft=none,local,prompt-lookup", f"hydra.searchpath=[file://{conf}]"]
    proc = specsweep("-m", *base_args(model_dirs, prompts, tmp_path), *drafts, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["draft"], r["status"]) for r in rows] == [("none", "ok"), ("local", "ok"), ("prompt-lookup", "ok")]
    assert float(rows[0]["speedup"]) == 1.0 and float(rows[1]["speedup"]) > 0
    assert "sweep summary" in proc.stdout
    # intervals, per-position acceptance, the predicted speedup: the baseline against itself is exactly 1
    assert (rows[0]["speedup_lo"], rows[0]["speedup_hi"], rows[0]["predicted_speedup"]) == ("1.0", "1.0", "1.0")
    for r in rows[1:]:
        assert float(r["speedup_lo"]) <= float(r["speedup"]) <= float(r["speedup_hi"])
        assert float(r["tokens_per_s_lo"]) <= float(r["tokens_per_s"]) <= float(r["tokens_per_s_hi"])
        assert 0 <= float(r["alpha_1"]) <= 1 and float(r["predicted_speedup"]) > 0
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert len(metrics["alpha_by_position"]) == 4 and metrics["predicted"]["curve"].startswith(str(tmp_path / "cache"))
    assert metrics["uncertainty"]["speedup"]["value"] == pytest.approx(float(rows[1]["speedup"]))

    # the losslessness audit: greedy fp32 drafts reproduce the draft=none run token for token
    assert [r["lossless"] for r in rows] == ["reference", "exact", "exact"]
    assert [r["exact_samples"] for r in rows[1:]] == ["2", "2"] and rows[1]["real_divergences"] == "0"
    reference = [json.loads(line) for line in (sweep / "0" / "samples.jsonl").read_text().splitlines()]
    assert all(len(s["margins"]) == len(s["top_logits"]) == len(s["output_ids"]) for s in reference)
    assert "margins" not in (sweep / "1" / "samples.jsonl").read_text()  # only the reference records them
    assert json.loads((sweep / "1" / "metrics.json").read_text())["audit"]["lossless"] == "exact"

    # a wrong token where the reference's margin is largest: the same command again runs nothing
    # (finished jobs are kept) but audits anew: DIVERGED, named with task and position, exit status 1
    samples_path = sweep / "1" / "samples.jsonl"
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    margins = reference[0]["margins"]
    position = margins.index(max(margins))
    samples[0]["output_ids"][position] = (samples[0]["output_ids"][position] + 1) % 300
    samples_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    proc = specsweep("-m", *base_args(model_dirs, prompts, tmp_path), *drafts, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["lossless"] for r in rows] == ["reference", "DIVERGED", "exact"]
    assert rows[1]["worst_divergence"].startswith(f"task a at token {position}, margin ")
    assert "DIVERGED job 1" in proc.stdout and f"task a at token {position}" in " ".join(proc.stdout.split())
    assert json.loads((sweep / "1" / "metrics.json").read_text())["audit"]["diverged"] == 1

    # one failing job: the others still complete, the summary names it, the exit status says so
    sweep = tmp_path / "sweep-fail"
    proc = specsweep("-m", *base_args(model_dirs, prompts, tmp_path), "draft=none,model",
                     f"++draft.path={model_dirs['alien']}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "tokenizer differs" in rows[1]["error"]
    assert not (sweep / "1" / "metrics.json").exists()


@pytest.mark.parametrize("override, message", [
    ("draft=nonexistent", "Could not find 'draft/nonexistent'"),
    ("draft.path=/no/such/model", "draft.path=/no/such/model: no such model directory"),
    ("dataset.path=/no/such/file.jsonl", "dataset.path=/no/such/file.jsonl: no such file"),
    ("decode.top_p=1.5", "decode.top_p=1.5: must be <= 1.0"),
    ("hardware=cuda", "sees no CUDA device"),
    ("repeats=0", "repeats=0: must be >= 1"),  # the schema's refusal
    ("target.path=???", "target.path is not set: add target.path=... to the command"),  # a `???` left unset
])
def test_bad_input_fails_fast_with_one_clear_line(model_dirs, prompts, tmp_path, override, message):
    run_dir = tmp_path / "run"
    args = [*base_args(model_dirs, prompts, tmp_path), "draft=model", f"draft.path={model_dirs['draft']}"]
    if override.startswith("hardware=cuda"):
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = specsweep(*args, override, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (run_dir / "metrics.json").exists()


def test_tokenizer_mismatch_is_refused_before_generation(model_dirs, prompts, tmp_path):
    run_dir = tmp_path / "run"
    proc = specsweep(*base_args(model_dirs, prompts, tmp_path), "draft=model", f"draft.path={model_dirs['alien']}",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("specsweep: error: draft.path=")
    assert "tokenizer differs" in proc.stderr
    assert not (run_dir / "samples.jsonl").exists()


def test_hub_id_offline_names_the_setting(model_dirs, prompts, tmp_path):
    proc = specsweep(*base_args(model_dirs, prompts, tmp_path), "draft=160m", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert proc.returncode == 2
    assert "draft.path=JackFram/llama-160m: not in the local Hugging Face cache" in proc.stderr
    assert "download=true" in proc.stderr
