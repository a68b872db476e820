"""The losslessness audit: the tie rule and triage on synthetic samples, the margins the
autoregressive engine records, and the audit through report, sweep summary, exit status and bench."""

from __future__ import annotations

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from specsweep import __main__ as app_main
from specsweep.app import audit, report, summary
from specsweep.backends.target import DynamicTarget
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.tools import bench
from tests.conftest import tiny_llama
from tests.test_report import TREES, job, metrics

BF16_ULP_AT_20 = 0.125  # 20 = 1.25 * 2^4: bf16 spacing 2^(4 - 7)


def ref_sample(task_id, output_ids, margins, top=20.0):
    return {"task_id": task_id, "output_ids": output_ids, "margins": margins, "top_logits": [top] * len(output_ids)}


# ---- the tie rule ------------------------------------------------------------------------------

def test_ulp_is_the_dtype_spacing_at_the_magnitude():
    assert audit.ulp(20.0, "bfloat16") == BF16_ULP_AT_20
    assert audit.ulp(16.0, "bfloat16") == 0.125 and audit.ulp(15.99, "bfloat16") == 0.0625  # binade edge
    assert audit.ulp(-20.0, "torch.bfloat16") == BF16_ULP_AT_20  # sign and the torch. prefix do not matter
    assert audit.ulp(20.0, "float32") == 2.0 ** -19 and audit.ulp(20.0, torch.float16) == 2.0 ** -6
    # the exact spacing torch itself has there
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.tensor(20.0, dtype=dtype)
        assert audit.ulp(20.0, dtype) == (torch.nextafter(x, torch.tensor(100.0, dtype=dtype)) - x).item()
    with pytest.raises(ValueError, match="no ulp for dtype"):
        audit.ulp(1.0, "int8")


def test_tie_allowance_depends_on_the_dtype_and_the_logits_magnitude():
    allowance = audit.tie_ulps("bfloat16")
    assert audit.is_tie(allowance * BF16_ULP_AT_20, 20.0, "bfloat16")  # the edge is a tie
    assert not audit.is_tie((allowance + 1) * BF16_ULP_AT_20, 20.0, "bfloat16")
    assert not audit.is_tie(BF16_ULP_AT_20, 20.0, "float32")  # 1 bf16 ulp is 65536 fp32 ulps
    # the larger of the two logits sets the scale: top-1 -0.5, top-2 -1.5 -> ulp at 1.5
    assert audit.margin_ulps(1.0, -0.5, "bfloat16") == 1.0 / 2.0 ** -7
    assert not audit.is_tie(None, 20.0, "bfloat16")  # not recorded: cannot be shown a tie


# ---- triage on synthetic samples ---------------------------------------------------------------

REFERENCE = [ref_sample("t/0", [5, 6, 7, 8], [3.0, BF16_ULP_AT_20, 0.0, 4.0]),
             ref_sample("t/1", [1, 2, 3], [5.0, 6.0, 7.0])]


def test_identical_outputs_are_exact_matched_by_task_id():
    samples = [{"task_id": "t/1", "output_ids": [1, 2, 3]}, {"task_id": "t/0", "output_ids": [5, 6, 7, 8]}]
    record = audit.compare(samples, REFERENCE, "bfloat16")
    assert record["lossless"] == audit.EXACT
    assert (record["compared"], record["exact"], record["ties"], record["diverged"]) == (2, 2, 0, 0)
    assert record["worst"] is None and audit.columns(record)["worst_divergence"] is None


def test_a_divergence_at_one_bf16_ulp_is_a_tie():
    samples = [{"task_id": "t/0", "output_ids": [5, 9, 1, 1]}, {"task_id": "t/1", "output_ids": [1, 2, 3]}]
    record = audit.compare(samples, REFERENCE, "bfloat16")
    assert record["lossless"] == audit.TIES
    assert (record["exact"], record["ties"], record["diverged"]) == (1, 1, 0)
    worst = record["worst"]
    assert (worst["task_id"], worst["position"], worst["margin"], worst["margin_ulps"]) == ("t/0", 1, 0.125, 1.0)
    assert (worst["token"], worst["reference_token"]) == (9, 6)
    # the same outputs from an fp32 target: 0.125 is far above fp32's rounding: a bug
    assert audit.compare(samples, REFERENCE, "float32")["lossless"] == audit.DIVERGED


def test_a_divergence_at_a_large_margin_is_diverged_and_the_worst():
    samples = [{"task_id": "t/0", "output_ids": [5, 9]},  # tie at position 1
               {"task_id": "t/1", "output_ids": [1, 2, 4]}]  # margin 7.0 = 56 ulps at position 2
    record = audit.compare(samples, REFERENCE, "bfloat16")
    assert record["lossless"] == audit.DIVERGED
    assert (record["exact"], record["ties"], record["diverged"]) == (0, 1, 1)
    assert (record["worst"]["task_id"], record["worst"]["position"], record["worst"]["margin_ulps"]) == ("t/1", 2, 56.0)
    assert audit.describe(record["worst"]) == "task t/1 at token 2, margin 7 (56 ulp)"
    assert audit.columns(record) == {"lossless": "DIVERGED", "exact_samples": 0, "tie_divergences": 1,
                                     "real_divergences": 1,
                                     "worst_divergence": "task t/1 at token 2, margin 7 (56 ulp)"}


def test_length_differences_and_unrecorded_margins_are_not_ties():
    # stopped early after a common prefix: diverges where it ends (position 2, margin 0.0 there: a tie)
    assert audit.compare([{"task_id": "t/0", "output_ids": [5, 6]}], REFERENCE, "bfloat16")["lossless"] == audit.TIES
    # longer than the reference: no margin past its end
    longer = audit.compare([{"task_id": "t/1", "output_ids": [1, 2, 3, 4]}], REFERENCE, "bfloat16")
    assert longer["lossless"] == audit.DIVERGED and longer["worst"]["position"] == 3
    # a reference without margins (a run older than the audit) cannot show a tie
    bare = [{"task_id": "t/0", "output_ids": [5, 6, 7, 8]}]
    record = audit.compare([{"task_id": "t/0", "output_ids": [5, 9]}], bare, "bfloat16")
    assert record["lossless"] == audit.DIVERGED and "margin not recorded" in audit.describe(record["worst"])


def test_nothing_to_compare_is_na():
    record = audit.compare([{"task_id": "other", "output_ids": [1]}], REFERENCE, "bfloat16")
    assert record["lossless"] == audit.NA and record["unmatched"] == 3
    assert audit.greedy({"temperature": 0.0, "top_k": 0}) and audit.greedy({"temperature": 0.8, "top_k": 1})
    assert not audit.greedy({"temperature": 0.8, "top_k": 0})


# ---- the margins the autoregressive engine records ---------------------------------------------

def test_autoregressive_runs_record_the_target_top2_margin_of_every_output_token():
    target = tiny_llama(3, vocab=64)
    prompt = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    result = Engine(target, None, 0, Sampling(), 16, [], runner=DynamicTarget(target)).generate(prompt)
    assert len(result.margins) == len(result.top_logits) == len(result.output_ids) == 16
    # the same numbers from one forward over prompt + output: row i scored output token i
    with torch.inference_mode():
        logits = target(torch.cat([prompt, torch.tensor([result.output_ids[:-1]])], dim=1)).logits[0, 9:].double()
    top = logits.topk(2).values
    assert logits.argmax(-1).tolist() == result.output_ids
    torch.testing.assert_close(torch.tensor(result.top_logits, dtype=torch.float64), top[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result.margins, dtype=torch.float64), top[:, 0] - top[:, 1],
                               rtol=1e-3, atol=1e-5)
    drafted = Engine(target, PromptLookupDrafter(), 4, Sampling(), 16, [], runner=DynamicTarget(target)).generate(prompt)
    assert drafted.margins is None and drafted.top_logits is None  # only the reference records them


# ---- through the report, the sweep summary and the exit status ---------------------------------

def greedy_job(sweep, number, draft, outputs, margins=None, dtype="bfloat16"):
    m = metrics(draft, TREES["chain4"], 20.0 + number, pass1=None)
    m["hardware"]["dtype"] = dtype
    path = job(sweep, number, m)
    rows = [{"task_id": f"t/{i}", "output_ids": out} for i, out in enumerate(outputs)]
    for row, margin in zip(rows, margins or []):
        row.update(margins=margin, top_logits=[20.0] * len(margin))
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def audited(tmp_path):
    """A greedy bf16 sweep: the reference, an exact draft, one parting at a tie, one at 24 ulps."""
    sweep = tmp_path / "sweep"
    greedy_job(sweep, 0, "none", [[1, 2, 3], [4, 5, 6]], [[3.0, 0.0, 1.0], [2.0, 3.0, 4.0]])
    greedy_job(sweep, 1, "layer-skip", [[1, 2, 3], [4, 5, 6]])
    greedy_job(sweep, 2, "bigram", [[1, 9, 9], [4, 5, 6]])  # position 1: margin 0.0
    greedy_job(sweep, 3, "cascade", [[1, 2, 3], [4, 5, 9]])  # t/1 position 2: margin 4.0 = 32 ulps
    return sweep


def test_report_and_summary_carry_the_verdicts(audited, tmp_path):
    jobs = {j.name: j for j in report.load_sweeps([audited])}
    assert {n: j.audit["lossless"] for n, j in jobs.items()} == {"0": "reference", "1": "exact", "2": "ties",
                                                                "3": "DIVERGED"}
    assert jobs["3"].audit["reference"] == "sweep/0" and jobs["3"].audit["worst"]["margin_ulps"] == 32.0

    assert report.main([str(audited), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| 192 | 1 | exact |" in text and "| 192 | 2 | ties (1 of 2) |" in text
    assert "| 192 | 3 | **DIVERGED** (1 real, 0 ties of 2) |" in text
    assert ("| 3 | smollm2-135m | cascade, chain γ=4 | **DIVERGED** (1 real, 0 ties of 2) | sweep/0 | 2 | 1 | 0 | 1 | "
            "task t/1 at token 2, margin 4 (32 ulp) |") in text

    rows = {r["job"]: r for r in summary.collect(audited)}
    assert [rows[n]["lossless"] for n in "0123"] == ["reference", "exact", "ties", "DIVERGED"]
    assert (rows["3"]["exact_samples"], rows["3"]["tie_divergences"], rows["3"]["real_divergences"]) == (1, 0, 1)
    assert rows["3"]["worst_divergence"] == "task t/1 at token 2, margin 4 (32 ulp)"


def test_no_reference_or_sampling_is_na(tmp_path):
    sweep = tmp_path / "alone"
    greedy_job(sweep, 0, "layer-skip", [[1, 2]])  # no draft=none run
    (only,) = report.load_sweeps([sweep])
    assert only.audit["lossless"] == "n/a" and "no draft=none run" in only.audit["reason"]

    sampled = tmp_path / "sampled"
    for number, draft in enumerate(("none", "layer-skip")):
        path = greedy_job(sampled, number, draft, [[1, 2]] if number == 0 else [[7, 7]], [[5.0, 5.0]])
        m = json.loads((path / "metrics.json").read_text())
        m["config"]["decode"].update(temperature=0.8, top_k=0)
        (path / "metrics.json").write_text(json.dumps(m))
    drafted = report.load_sweeps([sampled])[1]
    assert drafted.audit["lossless"] == "n/a" and "sampling" in drafted.audit["reason"]


def test_a_diverged_job_is_written_into_its_metrics_and_fails_the_exit_status(audited, monkeypatch, capsys):
    monkeypatch.setattr(summary, "diverged_jobs", [])
    monkeypatch.setattr(summary, "failed_jobs", [])
    summary.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(audited)}}}))
    assert summary.diverged_jobs == ["3"]
    out = " ".join(capsys.readouterr().out.split())
    assert "DIVERGED job 3: outputs part from the draft=none run's (sweep/0)" in out
    assert "task t/1 at token 2, margin 4 (32 ulp); 1 of 2 samples" in out
    for number, verdict in enumerate(("reference", "exact", "ties", "DIVERGED")):
        assert json.loads((audited / str(number) / "metrics.json").read_text())["audit"]["lossless"] == verdict

    # a summary of the same results again leaves the files alone (a resumed sweep keeps its stamps)
    stamps = [os.stat(audited / str(n) / "metrics.json").st_mtime_ns for n in range(4)]
    summary.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(audited)}}}))
    assert [os.stat(audited / str(n) / "metrics.json").st_mtime_ns for n in range(4)] == stamps

    monkeypatch.setattr(app_main, "app", lambda: None)  # the multirun already ran: only the exit status
    monkeypatch.setattr(app_main.sys, "argv", ["specsweep", "-m"])
    with pytest.raises(SystemExit) as exited:
        app_main.main()
    assert exited.value.code == 1
    monkeypatch.setattr(summary, "diverged_jobs", [])  # ties only, nothing failed: success
    app_main.main()


# ---- the bench ---------------------------------------------------------------------------------

def test_bench_triages_every_strategy_against_our_autoregressive_run():
    def strategy(name, outputs, margins=None, overrides="-"):
        tops = [None] * len(outputs) if margins is None else [
            {"margins": m, "top_logits": [20.0] * len(m)} for m in margins]
        return bench.Strategy(name, None, outputs=outputs, margins=tops, seconds=1.0, tokens=6, overrides=overrides)

    rows = bench.report([strategy("hf-generate", [[1, 2, 3], [4, 5, 6]]),
                         strategy("ar", [[1, 2, 3], [4, 5, 6]], [[3.0, 0.125, 1.0], [2.0, 3.0, 4.0]], "draft=none"),
                         strategy("tie", [[1, 9, 9], [4, 5, 6]]),
                         strategy("bug", [[1, 2, 3], [4, 9, 9]])], "bfloat16")
    assert [r["lossless"] for r in rows] == ["exact", "reference", "ties", "DIVERGED"]
    assert rows[3]["worst_divergence"] == "task 1 at token 1, margin 3 (24 ulp)"
    assert rows[2]["tie_divergences"] == 1 and rows[2]["exact_samples"] == 1
