"""The exactness probe (specsweep/backends/exactness.py) and the row blocks it relies on (specsweep/backends/prepack.py):
a run proves on the machine that its verifies keep one-row bits, or stops with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from specsweep import CONF_DIR
from specsweep.backends import exactness, hardware, row_invariant
from specsweep.backends.machine import cpu_info
from specsweep.backends.prepack import keeps_row_bits, pack_weight, prepack_linears, row_blocks
from specsweep.backends.target import DynamicTarget, make_runner
from specsweep.core.tree import DynamicTreeSpec, Tree
from specsweep.errors import SpecsweepError
from tests.conftest import CACHE_DIR, bf16_unsupported, tiny_llama

pytestmark = pytest.mark.skipif(bool(bf16_unsupported()), reason=bf16_unsupported() or "")

PROFILE = OmegaConf.load(CONF_DIR / "hardware" / "cpu-bf16.yaml")


def tiny_bf16(**packing):
    row_invariant.register()
    model = tiny_llama(5, layers=2).to(torch.bfloat16)
    model.set_attn_implementation("row_invariant")
    prepack_linears(model, **packing)
    return model


class Skewed:
    """A runner whose verifies of ``rows`` or more rows (trees only, with ``trees``) round one logit
    of row 1 differently: what a kernel with another blocking does."""

    def __init__(self, runner, rows: int, trees: bool = False):
        self.runner, self.rows, self.trees = runner, rows, trees

    def prefill(self, ids, room):
        return self.runner.prefill(ids, room)

    def keep(self, start, positions):
        self.runner.keep(start, positions)

    def score(self, ids, tree, cache_len):
        logits = self.runner.score(ids, tree, cache_len)
        if ids.shape[1] >= self.rows and (tree is not None or not self.trees):
            logits = logits.clone()
            logits[1, 0] += 1.0
        return logits


def test_the_probe_passes_an_exact_runner_and_caches_its_verdict(tmp_path):
    model = tiny_bf16()
    hw = hardware.resolve(PROFILE)
    first = exactness.ensure_exact(DynamicTarget(model), model, hw, Tree.binary(2), tmp_path, None)
    assert first["passed"] and not first["cached"] and first["tree_nodes"] == 6 and first["largest_chain"] == 7
    again = exactness.ensure_exact(DynamicTarget(model), model, hw, Tree.binary(2), tmp_path, None)
    assert again["passed"] and again["cached"] and again["key"] == first["key"]
    assert exactness.ensure_exact(DynamicTarget(model), model, hw, None, tmp_path, None) is None  # AR: nothing to prove
    cpu = hardware.resolve(OmegaConf.load(CONF_DIR / "hardware" / "cpu.yaml"))
    assert exactness.ensure_exact(DynamicTarget(model), model, cpu, Tree.chain(4), tmp_path, None) is None


def test_a_chain_size_that_rounds_differently_stops_the_run_with_one_line(tmp_path):
    model = tiny_bf16()
    hw = hardware.resolve(PROFILE)
    with pytest.raises(SpecsweepError) as err:
        exactness.ensure_exact(Skewed(DynamicTarget(model), rows=5), model, hw, Tree.chain(15), tmp_path, None)
    message = str(err.value)
    assert "\n" not in message and "a 5-row chain verify" in message and "max_verify_tokens=4" in message
    # the failure is cached too: the next run refuses at once, without probing
    with pytest.raises(SpecsweepError, match="a 5-row chain verify"):
        exactness.ensure_exact(DynamicTarget(model), model, hw, Tree.chain(15), tmp_path, None)


def test_a_tree_that_rounds_differently_is_refused_and_chains_offered(tmp_path):
    model = tiny_bf16()
    hw = hardware.resolve(PROFILE)
    with pytest.raises(SpecsweepError, match="a tree verify of .* use tree=chain"):
        exactness.ensure_exact(Skewed(DynamicTarget(model), rows=2, trees=True), model, hw, Tree.binary(2), tmp_path, None)
    dynamic = exactness.probe_tree(DynamicTreeSpec(budget=5, depth=3, k=2))
    assert dynamic.num_nodes == 5 and dynamic.depth <= 3


def test_row_blocks_are_chosen_per_shape_and_make_padded_products_row_invariant():
    torch.manual_seed(0)
    weight = pack_weight((torch.randn(48, 80) * 0.1).to(torch.bfloat16))
    assert keeps_row_bits(weight, 80, 32, 16)  # padded to 16 or 32 rows: the bits of a 16-row product
    model = tiny_bf16(row_block="auto", max_rows=32)
    assert set(row_blocks(model).values()) <= {1, 16, 32}
    forced = tiny_bf16(row_block=16)
    assert set(row_blocks(forced).values()) == {16}
    ids = torch.randint(96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # padding rows never change the real rows' logits beyond rounding
        torch.testing.assert_close(forced(ids).logits, tiny_bf16()(ids).logits, rtol=0.05, atol=0.05)


def test_hardware_refuses_bad_row_block_and_probe_settings():
    for bad, match in (({"row_block": 0}, "row_block must be auto or a positive integer"),
                       ({"row_block": "x"}, "row_block must be auto"),
                       ({"row_block": 16, "prepack_linear": False, "lean_forward": False}, "needs prepack_linear"),
                       ({"exactness_probe": "yes"}, "exactness_probe must be true or false"),
                       ({"max_verify_tokens": None}, "needs the largest verify")):
        with pytest.raises(SpecsweepError, match=match):
            hardware.resolve(OmegaConf.merge(PROFILE, bad))


def test_the_embedded_target_is_exact_on_cpu_bf16_on_this_machine(bf16, tmp_path):
    """The real claim, on the real kernels of this machine (and of every ONEDNN_MAX_CPU_ISA cap CI
    runs it under): the profile's row blocks make every chain up to 32 rows and a binary tree exact."""
    model, _ = bf16
    hw = hardware.resolve(PROFILE)
    for shape in (Tree.chain(31), Tree.binary(3)):
        verdict = exactness.ensure_exact(make_runner(model, hw), model, hw, shape, tmp_path, None)
        assert verdict["passed"] and verdict["largest_exact"] == verdict["largest_chain"], verdict


@pytest.mark.skipif(not cpu_info()["isa"].get("avx512_bf16"), reason="the CPU has no AVX512-BF16 kernels")
def test_without_row_blocks_the_avx512_bf16_kernels_are_refused(tmp_path):
    """oneDNN's AVX512-BF16 kernels (AMD Zen 4/5; forced on an AMX CPU by the cap) round a 1536->576
    row differently from 4 rows on: with hardware.row_block=1 the app must refuse, in one line."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "HYDRA_FULL_ERROR": "0"}
    args = ["hardware=cpu-bf16", "hardware.row_block=1", "hardware.threads=1", "dataset.limit=1", "evaluate=false",
            "decode.max_new_tokens=4", f"cache_dir={CACHE_DIR}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "specsweep", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "exactness probe failed" in line]
    assert len(lines) == 1 and "rounds row" in lines[0] and "Traceback" not in proc.stderr


def test_a_cpu_bf16_run_records_its_probe_and_row_blocks(tmp_path):
    run_dir = tmp_path / "run"
    args = ["hardware=cpu-bf16", "hardware.threads=1", "dataset.limit=1", "evaluate=false", "decode.max_new_tokens=8",
            f"cache_dir={CACHE_DIR}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "specsweep", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["exactness"]["passed"] and metrics["exactness"]["largest_chain"] == 5  # the default chain of 4
    assert metrics["row_blocks"]["1536->576"] in (1, 2, 4, 8, 16, 32)
    assert metrics["machine_fingerprint"] and metrics["lock_sha256"]
