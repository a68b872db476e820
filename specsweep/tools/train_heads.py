"""Train draft heads for the target: ``python -m specsweep experiment=train_heads draft=medusa|speculator``.

The data are the target's own (`specsweep.tools.head_data`: teacher-forced hidden states and
next-token choices over a corpus, then over text the target generated), built once per target and
data settings and cached in ``cache_dir/heads/``. Heads learn to predict the target's choices
1..K positions ahead of the root (cross-entropy over the draft vocabulary, the target's most
frequent choices), phase 1 on the corpus, then phase 2 on the target's own text (seed 002's 5:2
ratio of steps by default), with a progress bar; loss and per-head top-1 accuracy on held-out
sequences go to W&B (offline by default). The checkpoint lands where the draft config looks
(``draft.checkpoint``) with the training config, the data summary, the curves and the target's
fingerprint; a checkpoint of the same settings, target and lock is kept rather than retrained.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specsweep.app import models
from specsweep.app.results import METRICS, environment, lock_hash, write_json
from specsweep.app.tracking import make_tracker
from specsweep.backends import hardware
from specsweep.backends.prepack import check_supported
from specsweep.drafters import draft_class
from specsweep.drafters.heads import new_heads, output_rows, save_checkpoint, target_fingerprint
from specsweep.drafters.trained import HeadsDrafter
from specsweep.errors import SpecsweepError
from specsweep.tools import head_data

log = logging.getLogger(__name__)
console = Console()
IGNORE = -100  # no label (past the sequence's end)
POSITIVE = ("heads", "vocab", "seq_len", "corpus_tokens", "batch", "batch_tokens", "eval_every", "validation_every",
            "generate.batch", "generate.new_tokens", "humaneval.limit")
NON_NEGATIVE = ("phase1_steps", "phase2_steps", "generate.prompts", "generate.functions",
                "humaneval.offset")


def check_settings(cfg: DictConfig) -> str:
    """The kind to train (from ``draft``), every train setting checked -> kind."""
    cls = draft_class(cfg.draft)
    if cls is None or not issubclass(cls, HeadsDrafter):
        raise SpecsweepError(f"experiment=train_heads trains draft=medusa or draft=speculator, "
                             f"not draft={cfg.draft.get('name')}")
    train = cfg.train
    for key in POSITIVE + NON_NEGATIVE:
        value = OmegaConf.select(train, key)
        low = 1 if key in POSITIVE else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpecsweepError(f"train.{key}={value!r}: must be an integer >= {low}")
    if train.phase1_steps + train.phase2_steps == 0:
        raise SpecsweepError("train.phase1_steps and train.phase2_steps are both 0: nothing to train")
    if train.bf16 not in ("auto", True, False):
        raise SpecsweepError(f"train.bf16={train.bf16!r}: choose auto, true or false")
    if not isinstance(train.lr, (int, float)) or not train.lr > 0:
        raise SpecsweepError(f"train.lr={train.lr!r}: must be a positive number")
    head_data.humaneval_prompts(train.humaneval.offset, train.humaneval.offset + train.humaneval.limit)
    return cls.kind


def use_bf16(setting, hw: hardware.Hardware) -> bool:
    """``train.bf16`` on this machine: bf16 products where oneDNN runs them (``auto``); ``true``
    refused in one line where it does not (bf16 is emulated there, many times slower than fp32)."""
    if setting is False:
        return False
    try:
        check_supported(hw.device, torch.bfloat16, "train.bf16=true")
    except SpecsweepError:
        if setting is True:
            raise
        log.info("train.bf16=auto: no oneDNN bf16 kernels on this %s, so the data and the training run in fp32",
                 hw.device.type)
        return False
    return True


def data_settings(train: DictConfig) -> dict:
    keys = ("seq_len", "corpus_tokens", "humaneval", "exclude_modules", "generate", "seed")
    return {k: OmegaConf.to_container(train[k]) if OmegaConf.is_config(train[k]) else train[k] for k in keys}


def build_data(target, tokenizer, train: DictConfig, fingerprint: str, cache_dir: Path, progress) -> head_data.HeadData:
    settings = data_settings(train)
    key = {**settings, "lock": lock_hash(), "dtype": str(target.dtype)}  # the forwards' dtype: their hidden states
    path = cache_dir / "heads" / f"data-{head_data.data_key(key, fingerprint)}.pt"
    data = head_data.load_data(path)
    if data is not None:
        log.info("training data: %s (cached)", path)
        return data
    files = head_data.stdlib_files(list(train.exclude_modules), train.seed)
    he = train.humaneval
    problems = head_data.humaneval_prompts(he.offset, he.offset + he.limit)
    corpus = head_data.corpus_sequences(tokenizer, files, problems, train.seq_len, train.corpus_tokens)
    gen = train.generate
    prompts = [p["prompt"] for p in problems][:gen.prompts]
    functions = head_data.function_prompts(files[::-1], gen.functions)  # from the other end of the file order
    log.info("training data: generating the target's continuations of %d prompts", len(prompts) + len(functions))
    task = progress.add_task("generating", total=len(prompts) + len(functions))
    generated, generated_states = head_data.generate(target, tokenizer, prompts + functions, gen.new_tokens, gen.batch,
                                                     lambda n: progress.update(task, advance=n))
    log.info("training data: %d corpus and %d generated sequences; teacher forcing the corpus",
             len(corpus), len(generated))
    task = progress.add_task("teacher forcing", total=len(corpus))
    forced = head_data.teacher_forced(target, corpus, train.batch_tokens,
                                      lambda n: progress.update(task, advance=n))
    sequences = corpus + generated
    summary = {"corpus_sequences": len(corpus), "corpus_tokens": sum(map(len, corpus)),
               "generated_sequences": len(generated), "generated_tokens": sum(map(len, generated)),
               "humaneval_problems": [he.offset, he.offset + he.limit - 1],
               "stdlib_files": len(files), "function_prompts": len(functions),
               "excluded_modules": list(train.exclude_modules)}
    data = head_data.assemble(sequences, [1] * len(corpus) + [2] * len(generated), forced + generated_states,
                              summary)
    head_data.save_data(path, data)
    return data


class Examples:
    """Training positions p of some sequences: per head j, the token the head's stage reads (the
    token at p + 1 + j) and its label (the target's choice there, as a draft-vocabulary index; -1
    outside the vocabulary, IGNORE past the sequence)."""

    def __init__(self, data: head_data.HeadData, sequences: torch.Tensor, heads: int, vocab_index: torch.Tensor):
        starts, ends = data.starts[sequences], data.starts[sequences + 1]
        lengths = ends - starts
        self.positions = torch.repeat_interleave(starts, lengths - 1) + _ranges(lengths - 1)
        end = torch.repeat_interleave(ends, lengths - 1)
        index = self.positions[:, None] + 1 + torch.arange(heads)
        valid = index < end[:, None]
        index = index.clamp(max=data.tokens.numel() - 1)
        self.tokens = data.tokens[index]
        self.labels = torch.where(valid, vocab_index[data.choices[index]], IGNORE)
        self.hidden = data.hidden

    def __len__(self) -> int:
        return self.positions.numel()

    def batch(self, rows: torch.Tensor):
        return self.hidden[self.positions[rows]].float(), self.tokens[rows], self.labels[rows]


def _ranges(lengths: torch.Tensor) -> torch.Tensor:
    """0..n-1 for each n of ``lengths``, concatenated."""
    total = int(lengths.sum())
    offsets = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(total) - offsets


def head_logits(network, h: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Training forward: h [B, H], the stages' tokens [B, K] -> logits [B, K, V']."""
    if network.kind == "medusa":
        return network.states(h) @ out.T
    rows, state = [], h
    for k in range(network.heads):
        state = network.step(k, state, embed[tokens[:, k]])
        rows.append(state @ out.T)
    return torch.stack(rows, 1)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = labels.masked_fill(labels < 0, IGNORE)  # out-of-vocabulary labels teach nothing
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def accuracy(network, examples: Examples, out, embed, batch: int) -> list[float]:
    """Per head: how often its top-1 is the target's choice (out-of-vocabulary choices count as misses)."""
    hits = torch.zeros(network.heads)
    counts = torch.zeros(network.heads)
    for i in range(0, len(examples), batch):
        h, tokens, labels = examples.batch(torch.arange(i, min(i + batch, len(examples))))
        top = head_logits(network, h, tokens, out, embed).argmax(-1)
        seen = labels != IGNORE
        hits += ((top == labels) & seen).sum(0)
        counts += seen.sum(0)
    return (hits / counts.clamp(min=1)).tolist()


def fit(network, train_sets: list[Examples], steps: list[int], valid: Examples, out, embed, train: DictConfig,
        tracker, progress) -> list[dict]:
    """Phase by phase, AdamW with warm-up and cosine decay over all steps -> the evaluation history."""
    total = sum(steps)
    optimizer = torch.optim.AdamW(network.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(train.seed)
    history, step = [], 0
    task = progress.add_task(f"training {network.kind}", total=total)
    for phase, (examples, count) in enumerate(zip(train_sets, steps), 1):
        for _ in range(count):
            rows = torch.randint(len(examples), (train.batch,), generator=generator)
            h, tokens, labels = examples.batch(rows)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.bf16 is True):  # ~1.5x faster on bf16 CPUs
                logits = head_logits(network, h, tokens, out, embed)
            loss = loss_of(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            loss = loss.item()
            row = {"train/loss": loss, "train/phase": phase, "train/lr": schedule.get_last_lr()[0]}
            if step % train.eval_every == 0 or step == total:
                acc = accuracy(network, valid, out, embed, 4 * train.batch)
                row.update({f"valid/head_{k + 1}_top1": a for k, a in enumerate(acc)})
                history.append({"step": step, "phase": phase, "loss": loss, "top1": acc})
            tracker.log(row, step)
            progress.update(task, advance=1, description=f"training {network.kind} (phase {phase}, loss {loss:.2f})")
    return history


def job(cfg: DictConfig, run_dir: Path, choices: dict | None = None, group: str | None = None) -> dict:
    """`experiment=train_heads`'s job (the app's job signature)."""
    kind = check_settings(cfg)
    checkpoint = Path(cfg.draft.checkpoint)
    hw = hardware.resolve(cfg.hardware)
    train = OmegaConf.merge(cfg.train, {"bf16": use_bf16(cfg.train.bf16, hw)})  # auto resolved for this machine
    if train.bf16:
        hw = dataclasses.replace(hw, dtype=torch.bfloat16)  # the data's target forwards too
    model_dir = models.resolve_model_dir(cfg.target.path, "target.path", cfg.cache_dir, cfg.download)
    tokenizer = models.load_tokenizer(model_dir)
    target = models.load_model(model_dir, hw)
    fingerprint = target_fingerprint(target)
    settings = {"train": {k: v for k, v in OmegaConf.to_container(train, resolve=True).items() if k != "force"},
                "kind": kind, "lock": lock_hash()}
    if not train.force and checkpoint.is_file():
        try:
            record = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 (unreadable: retrain over it)
            record = {}
        if record.get("target_fingerprint") == fingerprint and record.get("settings") == settings:
            console.print(f"{kind} heads for target={cfg.target.name} are up to date: {checkpoint} (train.force=true retrains)")
            return record["metrics"]
    torch.manual_seed(train.seed)
    start = time.perf_counter()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with make_tracker(cfg.logger, resolved, choices or {}, run_dir, group, job_type="train") as tracker, \
            Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TimeElapsedColumn(), console=console) as progress:
        data = build_data(target, tokenizer, train, fingerprint, Path(cfg.cache_dir), progress)
        data_s = time.perf_counter() - start
        counts = torch.bincount(data.choices, minlength=target.config.vocab_size)
        vocab = counts.argsort(descending=True)[:train.vocab].sort().values
        vocab_index = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
        vocab_index[vocab] = torch.arange(vocab.numel())
        coverage = float(counts[vocab].sum() / counts.sum())
        sequences = torch.arange(data.phases.numel())
        held_out = sequences % train.validation_every == 0
        sets = [Examples(data, sequences[(data.phases == phase) & ~held_out], train.heads, vocab_index)
                for phase in (1, 2)]
        valid = Examples(data, sequences[held_out & (data.phases == 2)], train.heads, vocab_index)
        out = output_rows(target, vocab).float()
        embed = target.get_input_embeddings().weight.detach().float()
        network = new_heads(kind, target.config.hidden_size, train.heads)
        log.info("training %d %s heads on %d + %d positions", train.heads, kind, len(sets[0]), len(sets[1]))
        history = fit(network, sets, [train.phase1_steps, train.phase2_steps], valid, out, embed, train,
                      tracker, progress)
        metrics = {"kind": kind, "checkpoint": str(checkpoint), "heads": train.heads, "vocab": int(vocab.numel()),
                   "vocab_coverage": coverage, "bf16": train.bf16, "data": data.summary,
                   "examples": {"phase1": len(sets[0]), "phase2": len(sets[1]), "validation": len(valid)},
                   "top1": history[-1]["top1"], "final_loss": history[-1]["loss"], "history": history,
                   "data_s": data_s, "train_s": time.perf_counter() - start - data_s,
                   "target": {"name": cfg.target.name, "path": cfg.target.path, "fingerprint": fingerprint},
                   "config": resolved, **environment()}
        log.info("trained in %.0f s: held-out top-1 per head %s", metrics["train_s"],
                 " ".join(f"{a:.3f}" for a in metrics["top1"]))
        save_checkpoint(checkpoint, network, vocab, fingerprint,
                        {"target": metrics["target"], "settings": settings, "metrics": metrics})
        write_json(run_dir / METRICS, metrics)
        tracker.finish(metrics, [])
    console.print(_table(metrics))
    return metrics


def _table(metrics: dict) -> Table:
    table = Table(title=f"{metrics['kind']} heads: top-1 agreement with the target on held-out generated text")
    for column in ("head", "top-1"):
        table.add_column(column, justify="right")
    for k, acc in enumerate(metrics["top1"], 1):
        table.add_row(str(k), f"{acc:.3f}")
    table.caption = (f"vocab {metrics['vocab']} tokens ({metrics['vocab_coverage']:.1%} of the target's choices); "
                     f"data {metrics['data_s']:.0f} s, training {metrics['train_s']:.0f} s "
                     f"({'bf16' if metrics.get('bf16') else 'fp32'}) -> {metrics['checkpoint']}")
    return table
