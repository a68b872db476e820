"""Bigram drafting: each token's most frequent successors in a corpus, in the target's tokenizer.

The table keeps, for every token id, its top-k successors and their relative frequencies (the
probabilities a tree draft ranks by). It is built once from a corpus and cached on disk, keyed by
the tokenizer's vocabulary and the corpus; CS-Drafting's JSON (index = token id, value = its argmax
successor) loads as a top-1 table.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from specsweep.core.draft import Draft, Drafter, fill_tree
from specsweep.errors import SpecsweepError

TOP_K = 8


@dataclass
class BigramTable:
    successors: torch.Tensor  # [V, k] long: ranked successors (a token with no successor maps to itself)
    probs: torch.Tensor  # [V, k] float: their relative frequencies (0 where unseen)

    @property
    def vocab_size(self) -> int:
        return self.successors.shape[0]


def count_bigrams(sequences, vocab_size: int, top_k: int = TOP_K) -> BigramTable:
    """Top-k successor table from token-id sequences."""
    codes = []
    for ids in sequences:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() > 1:
            codes.append(ids[:-1] * vocab_size + ids[1:])
    if not codes:
        raise SpecsweepError("bigram: the corpus holds no token pairs (empty corpus?)")
    pairs, counts = torch.cat(codes).unique(return_counts=True)
    first, second = pairs // vocab_size, pairs % vocab_size
    # order by (first token, count descending); then take each first token's leading top_k entries
    order = torch.argsort(first * (counts.max() + 1) - counts)
    first, second, counts = first[order], second[order], counts[order]
    starts = torch.searchsorted(first, first, side="left")
    rank = torch.arange(first.numel()) - starts
    keep = rank < top_k
    successors = torch.arange(vocab_size)[:, None].repeat(1, top_k)
    freq = torch.zeros(vocab_size, top_k)
    successors[first[keep], rank[keep]] = second[keep]
    totals = torch.zeros(vocab_size).index_add_(0, first, counts.float())
    freq[first[keep], rank[keep]] = counts[keep].float() / totals[first[keep]]
    return BigramTable(successors, freq)


def stdlib_corpus() -> list[Path]:
    """The running interpreter's standard-library sources: real code, on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


def corpus_texts(corpus: str):
    """``stdlib``, ``wikitext2`` (via datasets; needs the hub or its cache), or a local .txt/.jsonl file."""
    if corpus == "stdlib":
        return [p.read_text(errors="ignore") for p in stdlib_corpus()]
    if corpus == "wikitext2":
        try:
            from datasets import load_dataset

            data = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        except Exception as err:
            raise SpecsweepError(f"draft.corpus=wikitext2: cannot load it ({type(err).__name__}); "
                                 f"use draft.corpus=stdlib or a local file") from None
        return [t for t in data["text"] if t.strip()]
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise SpecsweepError(f"draft.corpus={corpus}: not stdlib, wikitext2 or an existing file")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r.get("text") or r.get("prompt") or "" for r in rows]
    return [path.read_text(errors="ignore")]


def corpus_key(corpus: str) -> str:
    if corpus == "stdlib":
        files = stdlib_corpus()
        return f"stdlib-{sysconfig.get_python_version()}-{len(files)}-{sum(p.stat().st_size for p in files)}"
    path = Path(corpus).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}-{stat.st_size}-{stat.st_mtime_ns}"
    return corpus


def tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def build_table(tokenizer, corpus: str, cache_dir: Path) -> BigramTable:
    """Cached by tokenizer + corpus: the first build tokenises the corpus (with a progress bar)."""
    key = hashlib.sha256(f"{tokenizer_key(tokenizer)}|{corpus_key(corpus)}|{TOP_K}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / "bigram" / f"{key}.pt"
    if path.is_file():
        data = torch.load(path)
        return BigramTable(data["successors"], data["probs"])
    from rich.progress import track

    texts = [t for t in corpus_texts(corpus) if t.strip()]
    if not texts:
        raise SpecsweepError(f"draft.corpus={corpus}: the corpus is empty")
    batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    sequences = []
    for batch in track(batches, description=f"bigram table from {corpus}"):
        sequences.extend(tokenizer(batch, add_special_tokens=False).input_ids)
    table = count_bigrams(sequences, len(tokenizer))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"successors": table.successors, "probs": table.probs, "corpus": corpus}, tmp)
    tmp.replace(path)
    return table


def load_csdrafting_json(path: str) -> BigramTable:
    """CS-Drafting's greedy bigram file: a JSON list, index = token id, value = argmax next token id."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SpecsweepError(f"draft.table={path}: no such file")
    data = json.loads(file.read_text())
    if not isinstance(data, list) or not all(isinstance(x, int) for x in data):
        raise SpecsweepError(f"draft.table={path}: expected a JSON list of token ids (CS-Drafting format)")
    return BigramTable(torch.tensor(data, dtype=torch.long)[:, None], torch.ones(len(data), 1))


class BigramDrafter(Drafter):
    """Chains the argmax successor: t -> next(t) -> next(next(t)) ... (deterministic, no model).

    Config (``conf/draft/bigram.yaml``): ``corpus`` to count in the target's tokenizer (cached in
    cache_dir/bigram/), or ``table``, a CS-Drafting JSON that overrides it."""

    fills = ("chain", "tree")

    @classmethod
    def build(cls, ctx, *, corpus, table) -> BigramDrafter:
        loaded = load_csdrafting_json(table) if table else build_table(ctx.tokenizer, corpus, ctx.cache_dir)
        return cls(loaded, len(ctx.tokenizer))

    def __init__(self, table: BigramTable, vocab_size: int):
        if table.vocab_size != vocab_size:
            raise SpecsweepError(f"bigram table covers {table.vocab_size} token ids but the target's vocabulary "
                                 f"has {vocab_size}: it was built for another tokenizer")
        self.table = table
        self.next_token = table.successors[:, 0].tolist()  # Python list: O(1) lookups per drafted token
        self.ranked = None  # per-token successor lists for trees, built on first use

    def propose(self, ids: torch.Tensor, max_tokens: int) -> Draft:
        token, tokens = int(ids[0, -1]), []
        for _ in range(max_tokens):
            token = self.next_token[token]
            tokens.append(token)
        return Draft(torch.tensor(tokens, dtype=torch.long, device=ids.device))

    def propose_tree(self, ids: torch.Tensor, shape) -> Draft:
        """Each node's children are the top-k observed successors of its token."""
        if self.ranked is None:
            seen = (self.table.probs > 0).sum(1).clamp(min=1).tolist()
            self.ranked = [row[:k] for row, k in zip(self.table.successors.tolist(), seen)]
        root = int(ids[0, -1])
        return fill_tree(shape, lambda path, k: self.ranked[path[-1] if path else root][:k], ids.device)
