"""The static-cache target (hardware.cuda_graphs) decodes what the dynamic one does; here without
capture on the CPU, captured in tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from specsweep.app.run import check_tree_fits
from specsweep.backends.hardware import resolve
from specsweep.backends.target import DynamicTarget, GraphTarget, make_runner
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.core.tree import Tree
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.errors import SpecsweepError
from tests.conftest import perturbed_copy, tiny_llama

GREEDY = Sampling()


@pytest.mark.parametrize("width", [None, 8], ids=["exact-size", "padded"])
@pytest.mark.parametrize("shape", [4, Tree.binary(2)], ids=["chain4", "binary"])
def test_static_cache_decodes_the_targets_own_tokens(shape, width):
    target = tiny_llama(0, vocab=32)
    draft = perturbed_copy(target, noise=0.5, seed=100)
    rows = []  # the rows of every forward after a prefill
    for drafter in (None, ModelDrafter(draft, GREEDY), PromptLookupDrafter(3, 1)):
        runner = GraphTarget(target, capture=False, width=width)
        runner.step_model = lambda **inputs: (rows.append(inputs["input_ids"].shape[1]), target(**inputs))[1]
        engine = Engine(target, drafter, shape, GREEDY, 40, [], runner=runner)
        for length in (10, 30):  # the longer second prompt needs a bigger cache: reallocated
            prompt = torch.randint(32, (1, length), generator=torch.Generator().manual_seed(length))
            expected = Engine(target, None, 0, GREEDY, 40, [], runner=DynamicTarget(target)).generate(prompt).output_ids
            hf = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40,
                                 min_new_tokens=0, pad_token_id=0)[0, length:].tolist()
            result = engine.generate(prompt)
            assert result.output_ids == expected == hf
            if drafter is not None:
                assert result.stats.accepted_tokens > 0
    assert engine.runner.max_len >= 30 + 40 + 1
    if width:
        assert set(rows) == {width}  # one forward shape for every step


def test_compiled_forwards_decode_the_targets_own_tokens():
    """hardware.compile: the verify forwards through torch.compile (inductor's C++ backend here)."""
    target = tiny_llama(0, vocab=32)
    for shape in (4, Tree.binary(2)):
        runner = GraphTarget(target, capture=False, compile=True)
        engine = Engine(target, PromptLookupDrafter(3, 1), shape, GREEDY, 40, [], runner=runner)
        for length in (10, 30):
            prompt = torch.randint(32, (1, length), generator=torch.Generator().manual_seed(length))
            expected = Engine(target, None, 0, GREEDY, 40, [], runner=DynamicTarget(target)).generate(prompt).output_ids
            result = engine.generate(prompt)
            assert result.output_ids == expected
            assert result.stats.accepted_tokens > 0
    assert runner.step_model is not target  # the compiled wrapper ran the steps


def test_padded_rows_do_not_change_the_real_ones():
    target = tiny_llama(2, vocab=32)
    prompt = torch.randint(32, (1, 12), generator=torch.Generator().manual_seed(3))
    logits = []
    for width in (None, 6):
        runner = GraphTarget(target, capture=False, width=width)
        with torch.inference_mode():
            runner.prefill(prompt[:, :9], 8)
            logits.append(runner.score(prompt[:, 9:12], None, 9))
    assert logits[0].shape == logits[1].shape == (3, 32)
    torch.testing.assert_close(logits[1], logits[0])
    with pytest.raises(ValueError, match="verify_width=2"):
        GraphTarget(target, capture=False, width=2).score(prompt[:, :3], None, 0)


def test_hardware_checks_graphs_and_widths():
    cfg = OmegaConf.create({"name": "x", "device": "cpu", "dtype": "float32", "attn_implementation": "sdpa",
                            "cuda_graphs": True})
    with pytest.raises(SpecsweepError, match="needs a CUDA device"):
        resolve(cfg)
    cfg.cuda_graphs = False
    for bad in (0, 2.5, True):
        cfg.verify_width = bad
        with pytest.raises(SpecsweepError, match="verify_width must be a positive integer"):
            resolve(cfg)
    cfg.verify_width = 8
    hw = resolve(cfg)
    assert isinstance(make_runner(tiny_llama(0), hw), GraphTarget)
    cfg.verify_width, cfg.compile = None, True
    model = tiny_llama(0)
    assert make_runner(model, resolve(cfg)).step_model is not model  # compiled
    cfg.attn_implementation = "row_invariant"
    with pytest.raises(SpecsweepError, match="compile=true needs attn_implementation sdpa or eager"):
        resolve(cfg)
    cfg.attn_implementation, cfg.tree_mask = "sdpa", "bool"
    with pytest.raises(SpecsweepError, match="need tree_mask=additive"):
        resolve(cfg)
    with pytest.raises(SpecsweepError, match="verify_width=8"):
        check_tree_fits(hw, Tree.binary(3))
