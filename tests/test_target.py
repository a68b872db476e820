"""The static-cache target (hardware.cuda_graphs) decodes what the dynamic one does; here without
capture on the CPU, captured in tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.engine import Engine
from specsweep.errors import SpecsweepError
from specsweep.hardware import resolve
from specsweep.sampling import Sampling
from specsweep.target import GraphTarget
from specsweep.tree import Tree
from tests.conftest import perturbed_copy, tiny_llama

GREEDY = Sampling()


def static_engine(target, drafter, shape, limit):
    engine = Engine(target, drafter, shape, GREEDY, limit, [])
    engine.runner = GraphTarget(target, capture=False)
    return engine


@pytest.mark.parametrize("shape", [4, Tree.binary(2)], ids=["chain4", "binary"])
def test_static_cache_decodes_the_targets_own_tokens(shape):
    target = tiny_llama(0, vocab=32)
    draft = perturbed_copy(target, noise=0.5, seed=100)
    for drafter in (None, ModelDrafter(draft, GREEDY), PromptLookupDrafter(3, 1)):
        engine = static_engine(target, drafter, shape, 40)
        for length in (10, 30):  # the longer second prompt needs a bigger cache: reallocated
            prompt = torch.randint(32, (1, length), generator=torch.Generator().manual_seed(length))
            expected = Engine(target, None, 0, GREEDY, 40, []).generate(prompt).output_ids
            hf = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40,
                                 min_new_tokens=0, pad_token_id=0)[0, length:].tolist()
            result = engine.generate(prompt)
            assert result.output_ids == expected == hf
            if drafter is not None:
                assert result.stats.accepted_tokens > 0
    assert engine.runner.max_len >= 30 + 40 + 1


def test_cuda_graphs_need_cuda_and_a_mask_taking_attention():
    cfg = OmegaConf.create({"name": "x", "device": "cpu", "dtype": "float32", "attn_implementation": "sdpa",
                            "cuda_graphs": True})
    with pytest.raises(SpecsweepError, match="needs a CUDA device"):
        resolve(cfg)
