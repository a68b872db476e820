"""The side-by-side benchmark: one shared target, every output checked, results written."""

from __future__ import annotations

import json

import pytest

from specsweep.errors import SpecsweepError
from specsweep.tools import bench
from tests.conftest import CACHE_DIR, bf16_unsupported

needs_bf16 = pytest.mark.skipif(bool(bf16_unsupported()), reason=bf16_unsupported() or "")


@needs_bf16
def test_bench_writes_rows_and_checks_every_output(tmp_path):
    argv = ["--limit", "1", "--max-new-tokens", "12", "--repeats", "2", "--threads", "1", "--cache-dir", str(CACHE_DIR),
            "--set", "hardware=cpu-bf16", "--ours", "ar=draft=none", "best=experiment=best",
            "best-hf-forward=experiment=best hardware.lean_forward=false",  # how the shared target runs may differ
            "--hf", "generate", "--out", str(tmp_path)]
    assert bench.main(argv) == 0  # 0: no output parts from our autoregressive one
    (result,) = tmp_path.glob("speed_*.json")
    info = json.loads(result.read_text())
    assert [r["strategy"] for r in info["rows"]] == ["ar", "best", "best-hf-forward", "hf-generate"]
    assert all(r["tokens"] == 2 * 12 for r in info["rows"])  # one prompt, two passes
    assert info["repeats"] == 2 and all(r["repeats"] == 2 and r["run_to_run_cv"] >= 0 for r in info["rows"])
    assert info["rows"][0]["vs_our_ar"] == info["rows"][0]["vs_our_ar_lo"] == info["rows"][0]["vs_our_ar_hi"] == 1.0
    # cpu-bf16 is proven row-invariant on this machine (the exactness probe): not even a tie may flip,
    # and HF's generate runs the same row-blocked products one row at a time
    assert info["rows"][0]["lossless"] == "reference"
    assert all(r["lossless"] == "exact" for r in info["rows"][1:])
    assert info["hardware"]["dtype"] == "bfloat16" and "--set hardware=cpu-bf16" in info["command"]


@needs_bf16
def test_a_strategy_on_other_hardware_than_the_shared_target_is_refused(tmp_path):
    with pytest.raises(SpecsweepError, match="pass --set hardware=cpu-bf16"):
        bench.main(["--limit", "1", "--max-new-tokens", "4", "--cache-dir", str(CACHE_DIR),
                    "--ours", "best=experiment=best", "--hf", "--out", str(tmp_path)])
