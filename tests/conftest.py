"""Shared fixtures: tiny random Llama models built from a config, and the embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specsweep.backends.hardware import Hardware

REPO = Path(__file__).resolve().parent.parent
# tests share the user's converted-model cache (the GGUF conversion costs ~15 s once)
CACHE_DIR = Path(os.environ.get("SPECSWEEP_CACHE", Path.home() / ".cache" / "specsweep"))


def tiny_llama(seed: int, vocab: int = 96, layers: int = 2, init: float = 0.2) -> LlamaForCausalLM:
    """A random Llama small enough to decode thousands of tokens per second; ``init`` sets how
    peaked its next-token distributions are."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=init, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def perturbed_copy(model: LlamaForCausalLM, noise: float, seed: int) -> LlamaForCausalLM:
    """A draft that mostly agrees with ``model``: same weights plus Gaussian noise."""
    torch.manual_seed(seed)
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn_like(p) * noise * p.std())
    return copy


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32 on CPU."""
    from specsweep.app import models

    model_dir = models.resolve_model_dir("embedded:smollm2-135m-instruct", "target.path", CACHE_DIR)
    tokenizer = models.load_tokenizer(model_dir)
    return models.load_model(model_dir, Hardware(torch.device("cpu"), torch.float32, "sdpa")), tokenizer


def bf16_unsupported() -> str | None:
    """Why `hardware=cpu-bf16` cannot run here (no oneDNN bf16, or an ONEDNN_MAX_CPU_ISA cap below
    the bf16 kernels), naming the ISA: bit tests skip with it as the reason; None where it runs."""
    from specsweep.backends.prepack import check_supported
    from specsweep.errors import SpecsweepError

    try:
        check_supported(torch.device("cpu"), torch.bfloat16)
    except SpecsweepError as err:
        return f"{err} (ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')})"
    return None


@pytest.fixture(scope="session")
def bf16():
    """(model, tokenizer): the embedded target as `hardware=cpu-bf16` loads it (bf16, row-invariant
    attention, prepacked linears with the row blocks this machine needs for verifies of 32 rows)."""
    from specsweep.app import models

    if reason := bf16_unsupported():
        pytest.skip(reason)
    model_dir = models.resolve_model_dir("embedded:smollm2-135m-instruct", "target.path", CACHE_DIR)
    hw = Hardware(torch.device("cpu"), torch.bfloat16, "row_invariant", max_verify_tokens=32, prepack_linear=True,
                  row_block="auto", exactness_probe=True)
    model = models.load_model(model_dir, hw)
    if emulated_bf16():  # exact or refused by the probe, depending on threads: bit tests only where it passes
        from specsweep.app.results import lock_hash
        from specsweep.backends.exactness import ensure_exact
        from specsweep.backends.target import make_runner
        from specsweep.core.tree import Tree
        from specsweep.errors import SpecsweepError

        try:
            for shape in (Tree.chain(31), Tree.binary(3)):
                ensure_exact(make_runner(model, hw), model, hw, shape, CACHE_DIR, lock_hash())
        except SpecsweepError as err:
            pytest.skip(f"emulated bf16 (ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, "
                        f"{torch.get_num_threads()} threads), refused by the probe: {err}")
    return model, models.load_tokenizer(model_dir)


# oneDNN caps below its bf16 instructions: bf16 products are emulated in fp32 arithmetic there
EMULATING_CAPS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def emulated_bf16() -> bool:
    """Whether oneDNN emulates bf16 here (no AVX512-BF16 or AMX, or a cap below them). On these
    kernels some multi-threaded products round rows by row count beyond what row blocks restore, so
    the exactness probe refuses large verifies, as it should; on native bf16 kernels (AMX, AVX512-BF16)
    the bit tests must pass, never skip."""
    from specsweep.backends.machine import cpu_info

    isa = cpu_info()["isa"]
    native = isa.get("avx512_bf16") or isa.get("amx_bf16")
    return not native or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in EMULATING_CAPS


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained in milliseconds on this repo's Python sources (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [p.read_text() for p in sorted((REPO / "specsweep").rglob("*.py"))]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_model_dir(path: Path, seed: int, tokenizer, layers: int = 2) -> Path:
    """A tiny random Llama in Hugging Face format with ``tokenizer``, as a user's local model dir."""
    model = tiny_llama(seed, vocab=len(tokenizer), layers=layers, init=0.3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """{"target", "draft", "alien"}: local model dirs; the alien has a different tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    return {
        "target": save_model_dir(root / "target", 0, tok, layers=3),
        "draft": save_model_dir(root / "draft", 1, tok, layers=1),
        "alien": save_model_dir(root / "alien", 2, tiny_tokenizer(280), layers=1),
    }
