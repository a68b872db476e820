"""The engine on a CUDA device: the same token-for-token identity as on CPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.engine import Engine
from specsweep.sampling import Sampling
from specsweep.tree import Tree
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
    expected = Engine(target, None, 0, GREEDY, 48, []).generate(prompt).output_ids
    hf = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=48,
                         min_new_tokens=0, pad_token_id=0)[0, 12:].tolist()
    assert expected == hf
    for drafter in (ModelDrafter(draft, GREEDY), PromptLookupDrafter(max_ngram=3, min_ngram=1)):
        result = Engine(target, drafter, shape, GREEDY, 48, []).generate(prompt)
        assert result.output_ids == expected
        graphs = Engine(target, drafter, shape, GREEDY, 48, [], cuda_graphs=True)
        for _ in range(2):  # the second prompt replays the graphs the first one captured
            assert graphs.generate(prompt).output_ids == expected
    assert Engine(target, None, 0, GREEDY, 48, [], cuda_graphs=True).generate(prompt).output_ids == expected
