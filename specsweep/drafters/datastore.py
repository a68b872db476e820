"""A datastore of the target's own earlier outputs, for prompt lookup to copy from (REST-like).

Retrieval drafting (He et al., 2024, "REST") continues the current suffix from a corpus instead of
from the prompt. Here the corpus is what this target itself wrote before: the samples.jsonl of an
earlier greedy run (its prompts and outputs), so a copied continuation is what the target chose
after the same words, on other prompts. A part of prompt lookup (``draft.datastore``, null = off),
used two ways by `PromptLookupDrafter`:

* when the text itself has no strong match, the continuation after the longest stored n-gram
  (``min_ngram``..``max_ngram`` tokens) of the text's end, at most ``tokens`` tokens (null: the
  step's full depth);
* token recycling's table (`specsweep.drafters.recycling`) starts filled with the target's
  recorded choices instead of empty.

A stored output of a prompt the run decodes would hand the drafter the answer: `exclude` leaves
such entries out before the first prompt (the engine passes every prompt of the run).
"""

from __future__ import annotations

import json
from pathlib import Path

from specsweep.errors import SpecsweepError


class Datastore:
    def __init__(self, path: str | Path, min_ngram: int, max_ngram: int, tokens: int | None = 15):
        if tokens is not None and tokens < 1:
            raise ValueError(f"datastore tokens must be >= 1 or null, got {tokens}")
        path = Path(path)
        if not path.is_file():
            raise SpecsweepError(f"draft.datastore.path={path}: no such file (a greedy run's samples.jsonl)")
        self.entries: list[tuple[list[int], list[int]]] = []  # (prompt ids, output ids)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.entries.append(([int(t) for t in record["prompt_ids"]], [int(t) for t in record["output_ids"]]))
            except (ValueError, KeyError, TypeError) as err:
                raise SpecsweepError(f"draft.datastore.path={path}, line {number}: not a sample with prompt_ids and "
                                     f"output_ids ({err})") from None
        if not self.entries:
            raise SpecsweepError(f"draft.datastore.path={path}: no samples")
        self.min_ngram, self.max_ngram, self.tokens = min_ngram, max_ngram, tokens
        self.excluded = 0
        self.drafts = 0  # steps drafted from the datastore
        self._index()

    def exclude(self, prompts: list[list[int]]) -> None:
        """Leave out the entries of these prompts (their outputs are what the run is to produce)."""
        prompts = {tuple(p) for p in prompts}
        kept = [entry for entry in self.entries if tuple(entry[0]) not in prompts]
        if len(kept) < len(self.entries):
            self.excluded += len(self.entries) - len(kept)
            self.entries = kept
            self._index()

    def _index(self) -> None:
        self.texts = [prompt + output for prompt, output in self.entries]
        # n-gram -> (entry, index of the token that followed its latest occurrence)
        self.next_after: dict[tuple[int, ...], tuple[int, int]] = {}
        for number, text in enumerate(self.texts):
            for end in range(self.min_ngram, len(text)):
                for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                    self.next_after[tuple(text[end - n:end])] = (number, end)

    def continuation(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` stored tokens after the longest stored n-gram ending ``tokens``."""
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            hit = self.next_after.get(tuple(tokens[len(tokens) - n:]))
            if hit is not None:
                return self.texts[hit[0]][hit[1]:hit[1] + max_tokens]
        return []

    def propose(self, tokens: list[int], max_tokens: int) -> list[int]:
        """A step's draft from the datastore: the continuation of ``tokens``, at most ``self.tokens``."""
        stored = self.continuation(tokens, max_tokens if self.tokens is None else min(self.tokens, max_tokens))
        self.drafts += bool(stored)
        return stored

    def counters(self) -> dict:
        return {"datastore_entries": len(self.entries), "datastore_excluded": self.excluded,
                "datastore_drafts": self.drafts}

    def choices(self):
        """(text, start) per entry: from ``start`` on, each token of the text (prompt + output) is
        the target's choice after the tokens before it."""
        for (prompt, _), text in zip(self.entries, self.texts):
            yield text, len(prompt)
