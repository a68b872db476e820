"""The engine on a CUDA device: the same token-for-token identity as on CPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from specsweep.backends.target import DynamicTarget, GraphTarget
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.core.tree import Tree
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from tests.conftest import perturbed_copy, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GREEDY = Sampling()
CUDA = torch.device("cuda")


@pytest.mark.parametrize("shape", [3, Tree.binary(2), Tree.kary(3, 2)], ids=["chain3", "binary", "kary"])
def test_greedy_is_lossless_on_cuda(shape):
    target = tiny_llama(0)
    draft = perturbed_copy(target, noise=0.5, seed=100).to(CUDA)
    target.to(CUDA)
    prompt = torch.randint(0, target.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)).to(CUDA)
    expected = Engine(target, None, 0, GREEDY, 48, [], runner=DynamicTarget(target)).generate(prompt).output_ids
    hf = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=48,
                         min_new_tokens=0, pad_token_id=0)[0, 12:].tolist()
    assert expected == hf
    for drafter in (ModelDrafter(draft, GREEDY), PromptLookupDrafter(max_ngram=3, min_ngram=1)):
        result = Engine(target, drafter, shape, GREEDY, 48, [], runner=DynamicTarget(target)).generate(prompt)
        assert result.output_ids == expected
        graphs = Engine(target, drafter, shape, GREEDY, 48, [], runner=GraphTarget(target))
        for _ in range(2):  # the second prompt replays the graphs the first one captured
            assert graphs.generate(prompt).output_ids == expected
    assert Engine(target, None, 0, GREEDY, 48, [], runner=GraphTarget(target)).generate(prompt).output_ids == expected


@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled-graphs"])
def test_a_fixed_verify_width_keeps_bf16_decoding_exact(compile):
    """bf16 on the GPU picks kernels by shape; padded to one width, every step runs the same ones.
    A random-weight 160M shape has nearly flat logits, so any rounding difference would flip a token.
    Compiled (hardware.compile), the one width is also one compiled kernel set."""
    from specsweep.tools.costs import MODELS, random_llama

    torch.manual_seed(0)
    model = random_llama(dict(MODELS["llama-160m"], vocab_size=2048), CUDA, torch.bfloat16)
    accepted = 0
    for seed in range(4):
        prompt = torch.randint(2048, (1, 40), generator=torch.Generator().manual_seed(seed)).to(CUDA)
        runner = GraphTarget(model, width=16, compile=compile)
        expected = Engine(model, None, 0, GREEDY, 64, [], runner=runner).generate(prompt)
        for shape in (8, Tree.binary(3)):
            result = Engine(model, PromptLookupDrafter(3, 1), shape, GREEDY, 64, [],
                            runner=GraphTarget(model, width=16, compile=compile)).generate(prompt)
            assert result.output_ids == expected.output_ids, f"prompt {seed}, {shape}"
            accepted += result.stats.accepted_tokens
    assert accepted > 0
