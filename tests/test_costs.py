"""specsweep.tools.costs: the verify-cost sweep on a tiny model (CPU) and the speedup arithmetic."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from specsweep.backends.prepack import check_supported
from specsweep.core.stats import expected_tokens
from specsweep.errors import SpecsweepError
from specsweep.tools import costs


def test_tiny_sweep_writes_rows_ratios_and_predictions(tmp_path):
    result = costs.main(["--models", "tiny", "--device", "cpu", "--dtype", "float32", "--prefix", "16",
                         "--max-tokens", "4", "--modes", "eager", "graph", "--warmup", "1", "--repeats", "3",
                         "--out", str(tmp_path)])
    (csv_path,) = tmp_path.glob("costs_*.csv")
    (json_path,) = tmp_path.glob("costs_*.json")
    assert list(tmp_path.glob("verify_cost_*.png"))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    # graph mode needs CUDA: on CPU it is skipped, so only eager rows
    assert [(r["model"], r["mode"], r["prefix"], int(r["n"])) for r in rows] == [
        ("tiny", "eager", "16", n) for n in range(1, 5)
    ]
    assert float(rows[0]["ratio"]) == 1.0
    assert all(float(r["median_ms"]) > 0 for r in rows)
    saved = json.loads(json_path.read_text())
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 4
    assert saved["machine"]["torch"] and saved["machine"]["transformers"]
    assert saved["coefficients"] == []  # no llama-160m / llama2 pair in this run
    # a free draft only: gamma 1..3 (t(gamma+1) measured up to n=4) for each default alpha
    assert {(p["draft"], p["gamma"]) for p in saved["predictions"]} == {("free", g) for g in (1, 2, 3)}
    assert len(saved["best"]) == 5


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_free_draft_and_flat_verify_cost_give_expected_tokens(alpha, gamma):
    expected = gamma + 1 if alpha == 1 else sum(alpha**i for i in range(gamma + 1))
    assert expected_tokens(alpha, gamma) == pytest.approx(expected)
    assert costs.predicted_speedup(alpha, gamma, c=0.0, verify_ratio=1.0) == expected_tokens(alpha, gamma)


def test_nothing_accepted_costs_the_draft_and_verify_step():
    assert costs.predicted_speedup(0.0, 3, c=0.05, verify_ratio=1.2) == pytest.approx(1 / (3 * 0.05 + 1.2))


def test_best_gamma_per_alpha():
    rows = [{"model": m, "mode": "eager", "dtype": "bfloat16", "prefix": 512, "n": n, "median_ms": ms}
            for m, base, slope in (("llama2-7b", 20.0, 0.1), ("llama-160m", 2.0, 0.0)) for n in range(1, 10)
            for ms in [base + slope * (n - 1)]]
    coefficients, predictions, best = costs.derive(rows, [0.5, 0.9])
    assert [(k["target"], k["c"]) for k in coefficients] == [("llama2-7b", pytest.approx(0.1))]
    assert {p["draft"] for p in predictions} == {"free", "llama-160m"}
    for b in best:
        same = [p for p in predictions if (p["draft"], p["alpha"]) == (b["draft"], b["alpha"])]
        assert b["speedup"] == max(p["speedup"] for p in same)
    # a higher acceptance rate makes longer drafts pay
    gamma = {(b["draft"], b["alpha"]): b["gamma"] for b in best}
    assert gamma[("llama-160m", 0.9)] > gamma[("llama-160m", 0.5)]


def test_unknown_model_is_rejected(capsys):
    with pytest.raises(SystemExit):
        costs.main(["--models", "llama2-70b", "--device", "cpu"])
    assert "invalid choice: 'llama2-70b'" in capsys.readouterr().err


def test_cpu_bf16_profile_timing_row_invariant_and_prepacked(tmp_path):
    """--attn row_invariant --prepack time the forwards hardware=cpu-bf16 runs."""
    try:
        check_supported(torch.device("cpu"), torch.bfloat16)
    except SpecsweepError as err:
        pytest.skip(str(err))
    result = costs.main(["--models", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--attn", "row_invariant",
                         "--prepack", "--prefix", "16", "--max-tokens", "3", "--modes", "eager", "--warmup", "1",
                         "--repeats", "2", "--out", str(tmp_path)])
    assert [r["n"] for r in result["rows"]] == [1, 2, 3]
    assert result["args"]["attn"] == "row_invariant" and result["args"]["prepack"]


def test_prepack_needs_bf16_on_the_cpu(capsys):
    with pytest.raises(SystemExit):
        costs.main(["--models", "tiny", "--device", "cpu", "--dtype", "float32", "--prepack"])
    assert "--prepack: hardware.prepack_linear=true is for bfloat16 on the CPU" in capsys.readouterr().err
