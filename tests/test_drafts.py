"""The draft zoo (bigram, layer-skip, cascade, prompt lookup and its parts): lossless, and each with
its clear errors; a draft is one class + one YAML (`_target_`), checked before anything loads."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specsweep import CONF_DIR
from specsweep.backends.target import DynamicTarget
from specsweep.core.draft import Draft, Drafter
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling, greedy_tokens
from specsweep.core.tree import Tree
from specsweep.drafters import BuildContext, build_drafter, check_draft, draft_class, model_paths, step_shape
from specsweep.drafters.bigram import BigramDrafter, count_bigrams, load_csdrafting_json
from specsweep.drafters.cascade import CascadeDrafter
from specsweep.drafters.layer_skip import LayerSkipDrafter, kept_layers
from specsweep.drafters.model import ModelDrafter
from specsweep.drafters.prompt_lookup import PromptLookupDrafter
from specsweep.drafters.recycling import TokenRecycling
from specsweep.errors import SpecsweepError
from specsweep.tools.bench import compose_cfg
from tests.conftest import perturbed_copy, tiny_llama

GREEDY = Sampling()


def autoregressive(target, prompt, limit):
    return Engine(target, None, 0, GREEDY, limit, [], runner=DynamicTarget(target)).generate(prompt).output_ids


def table_from_target(target, vocab):
    """A bigram table from the target's own greedy continuations: a draft that is often right."""
    sequences = [autoregressive(target, torch.tensor([[t]]), 30) for t in range(0, vocab, 3)]
    return count_bigrams(sequences, vocab)


def test_count_bigrams_ranks_successors_by_frequency():
    table = count_bigrams([[1, 2, 1, 2, 1, 3], [1, 2, 0]], vocab_size=4, top_k=2)
    assert table.successors[1].tolist() == [2, 3]
    assert torch.allclose(table.probs[1], torch.tensor([0.75, 0.25]))
    assert table.successors[3].tolist() == [3, 3] and table.probs[3].sum() == 0  # never followed: itself
    with pytest.raises(SpecsweepError, match="empty corpus"):
        count_bigrams([[5]], vocab_size=8)


def test_bigram_draft_is_lossless_and_accepts():
    target = tiny_llama(20, vocab=32, init=0.5)
    drafter = BigramDrafter(table_from_target(target, 32), 32)
    for seed in range(3):
        prompt = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(seed))
        result = Engine(target, drafter, 4, GREEDY, 40, [], runner=DynamicTarget(target)).generate(prompt)
        assert result.output_ids == autoregressive(target, prompt, 40)
    assert result.stats.accepted_tokens > 0


def test_bigram_table_for_another_vocabulary_is_refused(tmp_path):
    path = tmp_path / "next_token.json"
    path.write_text(json.dumps([1, 2, 0]))
    table = load_csdrafting_json(str(path))
    assert table.successors[:, 0].tolist() == [1, 2, 0]
    with pytest.raises(SpecsweepError, match="built for another tokenizer"):
        BigramDrafter(table, 32000)
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(SpecsweepError, match="CS-Drafting format"):
        load_csdrafting_json(str(path))


def reduced_copy(model, kept):
    """An independent model holding only the kept layers (re-indexed): the reference for the view."""
    ref = copy.deepcopy(model)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in kept])
    for i, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = i
    ref.config.num_hidden_layers = len(kept)
    return ref


@pytest.mark.parametrize("cfg, kept", [({"exit_layer": 2, "skip_layers": None}, [0, 1]),
                                       ({"exit_layer": None, "skip_layers": [0, 2]}, [1, 3])])
def test_layer_skip_view_is_the_reduced_model_sharing_weights(cfg, kept):
    target = tiny_llama(21, layers=4, init=0.5)
    drafter = LayerSkipDrafter(target, GREEDY, None, **cfg)
    assert all(a is b for a, b in zip(drafter.model.model.layers, [target.model.layers[i] for i in kept]))
    assert len(target.model.layers) == 4  # the target itself is untouched
    prompt = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = reduced_copy(target, kept)
    # the cached incremental drafting equals the reduced model's own greedy decoding
    drafter.reset(prompt)
    assert drafter.propose(prompt, 6).tokens.tolist() == autoregressive(ref, prompt, 6)
    result = Engine(target, drafter, 3, GREEDY, 30, [], runner=DynamicTarget(target)).generate(prompt)
    assert result.output_ids == autoregressive(target, prompt, 30)


def test_layer_skip_errors():
    with pytest.raises(SpecsweepError, match="exit_layer=30: out of range"):
        kept_layers(30, exit_layer=30)
    with pytest.raises(SpecsweepError, match="exactly one"):
        kept_layers(30, exit_layer=3, skip_layers=[1])
    with pytest.raises(SpecsweepError, match="indices must be in 0..29"):
        kept_layers(30, skip_layers=[31])


def test_confidence_threshold_shortens_drafts():
    target = tiny_llama(22, init=0.5)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    full = ModelDrafter(target, GREEDY)
    early = ModelDrafter(target, GREEDY, confidence_threshold=0.999)
    for d in (full, early):
        d.reset(prompt)
    assert full.propose(prompt, 5).tokens.numel() == 5
    assert early.propose(prompt, 5).tokens.numel() < 5
    result = Engine(target, ModelDrafter(target, GREEDY, confidence_threshold=0.5), 5, GREEDY, 30, [], runner=DynamicTarget(target)).generate(prompt)
    assert result.output_ids == autoregressive(target, prompt, 30)


@pytest.mark.parametrize("k_matrix", [[[5, 10], [0, 10]], [[2, 3], [0, 4]], [[0, 6], [0, 0]]])
def test_cascade_is_lossless_and_counts_levels(k_matrix):
    target = tiny_llama(23, vocab=32, init=0.5)
    mid = ModelDrafter(perturbed_copy(target, 0.3, 24), GREEDY)
    cascade = CascadeDrafter([mid, BigramDrafter(table_from_target(target, 32), 32)], ["mid", "bigram"], k_matrix)
    for seed in range(2):
        prompt = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(seed))
        result = Engine(target, cascade, 15, GREEDY, 50, [], runner=DynamicTarget(target)).generate(prompt)
        assert result.output_ids == autoregressive(target, prompt, 50)
    levels = cascade.counters()["levels"]
    assert [lv["draft"] for lv in levels] == ["mid", "bigram"]
    if k_matrix[1][1]:
        assert levels[0]["checked_tokens"] > 0  # the model level verified bigram proposals


def test_three_level_cascade_with_prompt_lookup_at_the_bottom():
    target = tiny_llama(25, vocab=16, init=0.5)
    big = ModelDrafter(perturbed_copy(target, 0.2, 26), GREEDY)
    small = ModelDrafter(perturbed_copy(target, 0.6, 27), GREEDY)
    recycling = PromptLookupDrafter(3, 1, weak_ngram=2, weak_tokens=1, recycling=TokenRecycling(3))
    cascade = CascadeDrafter([big, small, recycling], ["big", "small", "pld"], [[3, 2, 4], [0, 3, 4], [0, 0, 4]])
    prompt = torch.randint(0, 16, (1, 20), generator=torch.Generator().manual_seed(3))
    assert Engine(target, cascade, 9, GREEDY, 60, [], runner=DynamicTarget(target)).generate(prompt).output_ids == autoregressive(target, prompt, 60)
    assert recycling.recycling.table  # the cascade passes the target's logits down to its levels


def test_k_matrix_shape_must_match_levels():
    with pytest.raises(SpecsweepError, match="must be 2 x 2"):
        CascadeDrafter([PromptLookupDrafter(), PromptLookupDrafter()], ["a", "b"], [[1, 2, 3]])
    with pytest.raises(SpecsweepError, match="row 0 must propose"):
        CascadeDrafter([PromptLookupDrafter(), PromptLookupDrafter()], ["a", "b"], [[0, 0], [0, 1]])


def test_prompt_lookup_copies_on_into_its_own_draft():
    drafter = PromptLookupDrafter(max_ngram=2)
    ids = torch.tensor([[5, 8, 8, 8]])  # a loop on one token: the occurrence is 1 token back
    drafter.reset(ids)
    assert drafter.propose(ids, 6).tokens.tolist() == [8] * 6
    ids = torch.tensor([[1, 2, 3, 1, 2]])  # period 3
    drafter.reset(ids)
    assert drafter.propose(ids, 7).tokens.tolist() == [3, 1, 2, 3, 1, 2, 3]


def test_token_recycling_fills_weak_and_empty_matches_from_the_targets_choices():
    drafter = PromptLookupDrafter(max_ngram=3, weak_ngram=2, weak_tokens=1, recycling=TokenRecycling(4))
    ids = torch.tensor([[10, 11, 12]])
    drafter.reset(ids)
    assert drafter.propose(ids, 8).tokens.numel() == 0  # no match, nothing recycled yet
    logits = torch.zeros(4, 20)
    logits[0, 13], logits[1, 14], logits[2, 12], logits[3, 12] = 1, 1, 1, 1  # after 12 the target chose 13, ...
    drafter.on_scored(torch.tensor([12, 13, 14, 9]), logits)
    assert drafter.propose(ids, 8).tokens.tolist() == [13, 14, 12, 13]  # follows the table, recycling.tokens long
    assert drafter.propose(ids, 2).tokens.tolist() == [13, 14]  # never past the room left
    weak = torch.tensor([[13, 9, 10, 11, 12, 7, 13]])  # only the 1-gram (13) matches: weak, 1 token, then recycled
    drafter.reset(weak)
    assert drafter.propose(weak, 8).tokens.tolist() == [9, 12, 13, 14]  # 9 from the lookup, then recycled
    strong = torch.tensor([[1, 2, 3, 4, 1, 2]])  # a strong match is not extended
    drafter.reset(strong)
    assert drafter.propose(strong, 8).tokens.tolist() == [3, 4, 1, 2, 3, 4, 1, 2]


def test_token_recycling_keys_choices_by_the_last_tokens():
    """With recycling.context=2 the choice after (7, 12) and after (8, 12) are kept apart; a context
    never recorded falls back to the last token alone."""
    drafter = PromptLookupDrafter(max_ngram=1, weak_ngram=2, weak_tokens=0, recycling=TokenRecycling(2, context=2))

    def score(text, chosen):  # one verify step after ``text``: root text[-1], nothing accepted
        ids = torch.tensor([text])
        drafter.propose(ids, 2)  # as the engine: the hooks follow a proposal
        logits = torch.zeros(1, 30)
        logits[0, chosen] = 1
        drafter.on_scored(ids[0, -1:], logits)

    drafter.reset(torch.tensor([[1]]))
    score([1, 7, 12], 20)  # after 7 12: 20
    score([1, 7, 12, 20, 8, 12], 21)  # after 8 12: 21, and after 12 alone now 21
    table = drafter.recycling.table
    assert table[(7, 12)] == [20] and table[(8, 12)] == [21] and table[(12,)] == [21]
    for text, first in (([2, 7, 12], 20), ([2, 8, 12], 21), ([2, 9, 12], 21)):
        drafter.reset(torch.tensor([text]))
        assert drafter.propose(torch.tensor([text]), 1).tokens.tolist() == [first]
    with pytest.raises(ValueError, match="context >= 1"):
        TokenRecycling(2, context=0)


def test_token_recycling_trees_branch_on_the_targets_top_choices():
    drafter = PromptLookupDrafter(max_ngram=3, weak_ngram=2, weak_tokens=1, recycling=TokenRecycling(3, branches=2))
    logits = torch.zeros(4, 20)
    logits[0, [13, 15]] = torch.tensor([2.0, 1.0])  # after 12: 13 first, 15 second
    logits[1, 14] = logits[2, 12] = logits[3, 16] = 1  # 13 -> 14, 14 -> 12, 15 -> 16
    drafter.on_scored(torch.tensor([12, 13, 14, 15]), logits)
    assert drafter.recycling.table[(12,)] == [13, 15]
    ids = torch.tensor([[10, 11, 12]])  # no match: the two recycled branches after 12
    drafter.reset(ids)
    draft = drafter.propose(ids, 8)
    assert draft.tree is not None  # two branches: a tree, verified in one forward

    def leaves(draft):
        tree = draft.tree
        return {tuple(draft.tokens[list(tree.ancestry(i))].tolist()) for i in range(tree.num_nodes)
                if not tree.children(i)}

    assert leaves(draft) == {(13, 14, 12), (15, 16)}  # 16 has no recorded successor: that branch stops
    assert drafter.propose(ids, 3).tokens.numel() == 3  # never more nodes than the room
    weak = torch.tensor([[12, 13, 9, 11, 7, 12]])  # the 1-gram 12 matched: weak, its continuation 13 is
    drafter.reset(weak)                              # also the first recycled choice, so the paths merge
    assert leaves(drafter.propose(weak, 8)) == {(13, 14, 12), (15, 16)}


def test_prompt_lookup_limits_weak_matches():
    drafter = PromptLookupDrafter(max_ngram=4, min_ngram=1, weak_ngram=3, weak_tokens=1)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 9, 5, 6, 7]])  # last 3 tokens matched earlier: a strong match
    drafter.reset(ids)
    assert drafter.propose(ids, 8).tokens.tolist() == [9, 5, 6, 7, 9, 5, 6, 7]  # the copy runs on into itself
    weak = torch.tensor([[1, 2, 3, 4, 8, 9, 4]])  # only the 1-gram (4) matches
    drafter.reset(weak)
    assert drafter.propose(weak, 8).tokens.tolist() == [8]


# ---- a draft is one class + one YAML -------------------------------------------------------------

DRAFT_CONFIGS = sorted(p.stem for p in (CONF_DIR / "draft").glob("*.yaml"))


@pytest.mark.parametrize("name", DRAFT_CONFIGS)
def test_every_draft_config_names_its_class_and_holds_its_keys(name):
    cfg = compose_cfg([f"draft={name}"])
    cls = draft_class(cfg.draft)
    assert (cls is None) == (name == "none") and cfg.draft.name == name
    # the class takes exactly the YAML's keys (cascade levels too); Jacobi and lookahead shape their steps
    check_draft(cfg.draft, step_shape(cfg.draft, Tree.chain(4)))
    paths = model_paths(cfg.draft) if name != "model" else {}  # draft=model's path is ??? until given
    expected = {"160m": {"draft.path"}, "7b": {"draft.path"}, "cascade-160m": {"draft.levels.0.path"}}
    assert set(paths) == expected.get(name, set())


def test_experiment_best_composes_prompt_lookup_from_its_parts():
    best = compose_cfg(["experiment=best", "draft.datastore=null", "draft.length_policy=fixed"])
    drafter = build_drafter(best.draft, BuildContext(None, None, GREEDY, None, None, None, Path("/nonexistent")))
    assert isinstance(drafter, PromptLookupDrafter) and drafter.datastore is None
    recycling = drafter.recycling
    assert (recycling.tokens, recycling.branches, recycling.context) == (31, 1, 3)  # tokens: ${tree.depth}
    assert (drafter.max_ngram, drafter.weak_ngram, drafter.weak_tokens) == (8, 3, None)


@pytest.mark.parametrize("overrides, message", [
    (["draft._target_=specsweep.drafters.nope.Nope"], "draft._target_=specsweep.drafters.nope.Nope: no such class"),
    (["draft._target_=specsweep.drafters.recycling.TokenRecycling"], "not a draft (a subclass of"),
    (["+draft.max_tokens=3"], "draft (PromptLookupDrafter): got an unexpected keyword argument 'max_tokens'"),
    (["draft=bigram", "~draft.corpus"], "draft (BigramDrafter): missing a required argument: 'corpus'"),
    (["draft=cascade", "draft.levels.1._target_=no.Such"], "draft.levels.1._target_=no.Such: no such class"),
    (["experiment=best", "draft.recycling._target_=no.Such"], "draft.recycling._target_=no.Such: no such class"),
    (["draft=bigram", "tree=dynamic"], "draft=bigram (BigramDrafter) cannot fill dynamic trees, only chains and trees"),
    (["draft=cascade", "tree=binary"], "draft=cascade (CascadeDrafter) cannot fill trees, only chains: use tree=chain"),
    (["experiment=best", "draft.length_policy=fixed", "tree=binary", "tree.depth=2"],
     "draft.recycling (TokenRecycling) fills chains only: use tree=chain, or draft.recycling=null"),
])
def test_bad_draft_configs_are_refused_with_one_line(overrides, message):
    from specsweep.app.run import decoding_settings

    with pytest.raises(SpecsweepError) as err:
        decoding_settings(compose_cfg(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_part_values_are_one_line_errors(tmp_path):
    ctx = BuildContext(None, None, GREEDY, None, None, None, tmp_path)
    cfg = compose_cfg(["experiment=best", "draft.recycling.context=0", "draft.datastore=null"])
    with pytest.raises(SpecsweepError, match=r"^draft.recycling: token recycling needs .* context >= 1"):
        build_drafter(cfg.draft, ctx)
    cfg = compose_cfg(["experiment=best", f"draft.datastore.path={tmp_path / 'none.jsonl'}"])
    with pytest.raises(SpecsweepError, match=r"^draft.datastore.path=.*none.jsonl: no such file"):
        build_drafter(cfg.draft, ctx)


class SelfDraft(Drafter):
    """A draft that lives in this test file alone: the target itself, re-run greedily on the whole
    sequence for up to ``tokens`` tokens (it reaches the target through the build context)."""

    fills = ("chain",)

    @classmethod
    def build(cls, ctx, *, tokens):
        return cls(ctx.target, tokens)

    def __init__(self, model, tokens: int):
        self.model, self.tokens = model, tokens

    @torch.inference_mode()
    def propose(self, ids, max_tokens):
        for _ in range(min(self.tokens, max_tokens)):
            ids = torch.cat([ids, greedy_tokens(self.model(ids).logits[0, -1]).view(1, 1)], dim=1)
        return Draft(ids[0, ids.shape[1] - min(self.tokens, max_tokens):])


SELF_DRAFT = f"{SelfDraft.__module__}.{SelfDraft.__qualname__}"


def test_a_draft_is_one_class_and_one_yaml(model_dirs, tmp_path):
    """A class above and a YAML in a config dir of the user's own (on Hydra's search path) are the
    whole draft: `python -m specsweep` runs it, and its outputs are the autoregressive ones."""
    (tmp_path / "conf" / "draft").mkdir(parents=True)
    (tmp_path / "conf" / "draft" / "self.yaml").write_text(f"_target_: {SELF_DRAFT}\nname: self\ntokens: 3\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def add(a, b):\n    return", "import os")))
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": os.pathsep.join(
        [here, str(Path(here).parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    sweep = tmp_path / "sweep"
    args = ["-m", "draft=none,self", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "target=local",
            f"target.path={model_dirs['target']}", "dataset=jsonl", f"dataset.path={prompts}",
            "decode.max_new_tokens=12", "hardware=cpu", f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, "-m", "specsweep", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["draft"], r["status"], r["lossless"]) for r in rows] == [("none", "ok", "reference"),
                                                                        ("self", "ok", "exact")]
    outputs = [[json.loads(line)["output_ids"] for line in (sweep / job / "samples.jsonl").read_text().splitlines()]
               for job in ("0", "1")]
    assert outputs[0] == outputs[1]
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert metrics["choices"]["draft"] == "self" and metrics["accepted_tokens"] > 0


def test_a_draft_that_fills_chains_only_is_refused_for_trees_before_loading(tmp_path):
    from specsweep.app.run import run_decode

    cfg = compose_cfg(["draft=none", f"draft._target_={SELF_DRAFT}", "draft.name=self", "+draft.tokens=3",
                       "tree=binary", "target=local", f"target.path={tmp_path / 'no-such-model'}"])
    with pytest.raises(SpecsweepError) as err:  # the tree is refused: the missing target is never looked at
        run_decode(cfg, tmp_path / "run", {})
    assert str(err.value) == "draft=self (SelfDraft) cannot fill trees, only chains: use tree=chain"
    assert not (tmp_path / "run").exists()
