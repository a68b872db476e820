"""specsweep.tools.replay: a chain drafter replayed over a greedy output, step by step as the engine runs it."""

from __future__ import annotations

import json

import pytest

from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.drafters.recycling import TokenRecycling
from specsweep.errors import SpecsweepError
from specsweep.tools import replay

SAMPLE = {"prompt_ids": [1, 2, 3, 4], "output_ids": [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]}


def test_replay_counts_the_steps_the_engine_would_take():
    # step 1: after [1,2,3,4 | 1] the 1-gram "1" matches: draft 2 3 4 1, all right (5 tokens);
    # step 2: 3 tokens of room left, "4 1 2" matches: draft 3 4 1, all right (the last 4 tokens)
    result = replay.replay(PromptLookupDrafter(3, 1), 4, [SAMPLE])
    assert result["steps"] == 2 and result["tokens_per_step"] == 4.5
    assert result["drafted_per_step"] == 3.5 and result["acceptance_rate"] == 1.0
    assert result["verify_sizes"] == {5: 1, 4: 1}


def test_replay_feeds_the_targets_choices_to_token_recycling():
    sample = {"prompt_ids": [7], "output_ids": [5, 6, 8, 9, 5, 6, 8, 9]}
    plain = replay.replay(PromptLookupDrafter(3, 1, weak_ngram=4, weak_tokens=0), 4, [sample, sample])
    recycling = replay.replay(PromptLookupDrafter(3, 1, weak_ngram=4, weak_tokens=0, recycling=TokenRecycling(4)), 4,
                              [sample, sample])
    assert plain["drafted_per_step"] == 0  # every match is weak and proposes nothing
    assert recycling["steps"] < plain["steps"]  # the second prompt reuses what the first one recorded


def test_replay_command_writes_its_table(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(SAMPLE) + "\n")
    replay.main([str(samples), "--ours", "pld=draft=prompt-lookup tree.depth=4", "--out", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["strategy"], r["tokens_per_step"]) for r in rows] == [("pld", 4.5)]
    with pytest.raises(SpecsweepError, match="model-free"):
        replay.main([str(samples), "--ours", "m=draft=160m"])
    with pytest.raises(SpecsweepError, match="model-free drafters only: this draft needs the "):
        replay.main([str(samples), "--ours", "s=draft=layer-skip"])
    with pytest.raises(SpecsweepError, match="recycling.branches > 1"):
        replay.main([str(samples), "--ours", "b=experiment=best draft.recycling.branches=2 draft.length_policy=fixed"])
    with pytest.raises(SpecsweepError, match="tree=chain"):
        replay.main([str(samples), "--ours", "t=draft=prompt-lookup tree=binary"])
