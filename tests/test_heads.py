"""Trained draft heads (Medusa, the multi-stage speculator): training learns, drafts are lossless,
checkpoints round-trip and belong to one target."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from rich.progress import Progress
from scipy.stats import chisquare

from specsweep.app.tracking import NullTracker
from specsweep.backends.target import DynamicTarget, LeanTarget
from specsweep.core import engine as engine_module
from specsweep.core.engine import Engine
from specsweep.core.sampling import Sampling
from specsweep.core.tree import DynamicTreeSpec, Tree
from specsweep.drafters.heads import load_checkpoint, new_heads, output_rows, save_checkpoint, target_fingerprint
from specsweep.drafters.trained import MedusaDrafter, SpeculatorDrafter
from specsweep.errors import SpecsweepError
from specsweep.tools import head_data
from specsweep.tools.train_heads import IGNORE, Examples, accuracy, fit, head_logits, loss_of
from tests.conftest import bf16_unsupported, tiny_llama
from tests.test_greedy_lossless import hf_greedy
from tests.test_stochastic import ALPHA, V, broken_no_residual, exact_law

KINDS = {"medusa": MedusaDrafter, "speculator": SpeculatorDrafter}
TRAIN = OmegaConf.create({"lr": 0.01, "weight_decay": 0.0, "seed": 0, "batch": 128, "eval_every": 50, "bf16": False})


PROMPTS = torch.randint(96, (12, 6), generator=torch.Generator().manual_seed(0))


def own_text(target, tokens: int = 40) -> list[list[int]]:
    """The target's greedy continuations of ``PROMPTS`` (phase 2 data)."""
    eng = Engine(target, None, 1, Sampling(), tokens, [], runner=DynamicTarget(target))
    return [row.tolist() + eng.generate(row[None]).output_ids for row in PROMPTS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny products gain nothing from threads, and lose 20x to a busy machine's OpenMP waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(3, vocab=96, init=0.6)


@pytest.fixture(scope="module")
def text(target):
    return own_text(target)


def examples_for(target, text, heads: int, vocab: torch.Tensor) -> Examples:
    data = head_data.assemble(text, [2] * len(text), head_data.teacher_forced(target, text, 512), {})
    index = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    index[vocab] = torch.arange(vocab.numel())
    return Examples(data, torch.arange(len(text)), heads, index)


@pytest.fixture(scope="module", params=sorted(KINDS))
def trained(request, target, text):
    """(kind, network, vocab, examples, top-1 before and after): heads fitted to the tiny target's
    own text. The vocabulary leaves out the target's rarest choices: drafts must map back to ids."""
    counts = torch.bincount(torch.tensor([t for seq in text for t in seq]), minlength=96)
    vocab = counts.argsort(descending=True)[:64].sort().values
    examples = examples_for(target, text, 3, vocab)
    out, embed = output_rows(target, vocab).float(), target.get_input_embeddings().weight.detach().float()
    network = new_heads(request.param, target.config.hidden_size, 3)
    before = accuracy(network, examples, out, embed, 256)
    with Progress(disable=True) as progress:
        history = fit(network, [examples, examples], [300, 100], examples, out, embed, TRAIN, NullTracker(), progress)
    return request.param, network.eval(), vocab, examples, before, history[-1]["top1"]


def test_training_lowers_the_loss_and_raises_top1(trained, target):
    kind, network, vocab, examples, before, after = trained
    fresh = new_heads(kind, target.config.hidden_size, 3)
    h, tokens, labels = examples.batch(torch.arange(len(examples)))
    out, embed = output_rows(target, vocab).float(), target.get_input_embeddings().weight.detach().float()
    with torch.no_grad():
        start = float(loss_of(head_logits(fresh, h, tokens, out, embed), labels))
        end = float(loss_of(head_logits(network, h, tokens, out, embed), labels))
    assert (labels != IGNORE).any() and end < 0.5 * start
    assert all(a > b + 0.1 for a, b in zip(after, before)), (before, after)


def drafter(kind, target, network, vocab, heads, sampling, generator=None):
    return KINDS[kind](target, network, vocab, heads, sampling, generator)


def decode(target, make, shape, prompt, tokens=40, runner=None):
    eng = Engine(target, make, shape, Sampling(), tokens, [], runner=runner or DynamicTarget(target))
    return eng.generate(prompt)


SHAPES = {"chain": 3, "medusa-like tree": Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]]),
          "dynamic": DynamicTreeSpec(budget=8, depth=3, k=2)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_drafts_from_heads_are_the_targets_own_output(trained, target, shape):
    kind, network, vocab = trained[:3]
    prompt = PROMPTS[:1]  # its continuation is in the training text: the heads must hit
    reference = decode(target, None, 1, prompt).output_ids
    assert reference == hf_greedy(target, prompt, 40)
    result = decode(target, drafter(kind, target, network, vocab, 3, Sampling()), SHAPES[shape], prompt)
    assert result.output_ids == reference
    assert result.stats.accepted_tokens > 0, "the trained heads never hit: the accept path went untested"


def test_every_runner_hands_the_hidden_state_the_output_layer_read(target, bf16):
    """What a head reads: the output layer's input at every scored row, the same bits from the lean
    forward as from transformers' (the embedded target in bf16), and transformers' own last hidden
    state on the tiny fp32 target."""
    prompt = torch.tensor([[5, 17, 33, 2]])
    step = torch.tensor([[9, 10, 11]])
    runner = DynamicTarget(target)
    runner.prefill(prompt, 8)
    assert runner.hidden().shape == (1, target.config.hidden_size)
    runner.score(step, None, prompt.shape[1])
    with torch.no_grad():
        full = target.model(input_ids=torch.cat([prompt, step], 1)).last_hidden_state[0, -3:]
    torch.testing.assert_close(runner.hidden(), full, rtol=1e-4, atol=1e-5)
    model, _ = bf16
    hidden = []
    for runner in (DynamicTarget(model), LeanTarget(model)):
        runner.prefill(prompt * 100, 8)
        runner.score(step * 100, None, prompt.shape[1])
        hidden.append(runner.hidden().clone())
    assert torch.equal(hidden[0], hidden[1])


def counts(target, make, sampling, prompt, samples, shape=2):
    generator = torch.Generator().manual_seed(0)
    eng = Engine(target, make(generator), shape, sampling, 3, [], generator, runner=DynamicTarget(target))
    table = torch.zeros(V, V)
    for _ in range(samples):
        out = eng.generate(prompt).output_ids
        table[out[1], out[2]] += 1
    return table.flatten()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sampled_drafts_from_heads_keep_the_targets_distribution(monkeypatch, kind):
    """T = 1, heads sampling their own q over a 4-token draft vocabulary (q = 0 elsewhere); a broken
    verifier must be caught, so the test can fail."""
    target = tiny_llama(11, vocab=V, init=0.6)
    torch.manual_seed(5)
    network = new_heads(kind, target.config.hidden_size, 2)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    vocab = torch.tensor([1, 3, 4, 5])
    sampling = Sampling(temperature=1.0)
    prompt = torch.tensor([[1, 4, 2, 5]])
    expected = exact_law(target, prompt, 3, sampling)

    def make(generator):
        return drafter(kind, target, network, vocab, 2, sampling, generator)
    good = counts(target, make, sampling, prompt, 1200)
    assert chisquare(good, expected * good.sum()).pvalue > ALPHA
    monkeypatch.setattr(engine_module, "verify_stochastic", broken_no_residual)
    bad = counts(target, make, sampling, prompt, 1200)
    assert chisquare(bad, expected * bad.sum()).pvalue < ALPHA


def test_a_checkpoint_round_trips(trained, target, tmp_path):
    kind, network, vocab = trained[:3]
    path = tmp_path / "heads.pt"
    save_checkpoint(path, network, vocab, target_fingerprint(target), {"target": {"name": "tiny"}})
    loaded, loaded_vocab, record = load_checkpoint(path, kind, target_fingerprint(target), "tiny")
    assert torch.equal(loaded_vocab, vocab) and record["heads"] == 3
    for (name, a), (_, b) in zip(network.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    prompt = torch.tensor([[5, 17, 33, 2, 71, 8]])
    a = decode(target, drafter(kind, target, network, vocab, 3, Sampling()), 3, prompt)
    b = decode(target, drafter(kind, target, loaded, loaded_vocab, 3, Sampling()), 3, prompt)
    assert a.stats.accepted_per_step == b.stats.accepted_per_step


def test_heads_of_another_target_or_kind_are_refused(trained, target, tmp_path):
    kind, network, vocab = trained[:3]
    path = tmp_path / "heads.pt"
    save_checkpoint(path, network, vocab, target_fingerprint(target), {"target": {"name": "tiny"}})
    other = tiny_llama(4, vocab=96, init=0.6)
    assert target_fingerprint(other) != target_fingerprint(target)
    with pytest.raises(SpecsweepError, match="trained for target tiny"):
        load_checkpoint(path, kind, target_fingerprint(other), "other")
    with pytest.raises(SpecsweepError, match="not (medusa|speculator)"):
        load_checkpoint(path, ({"medusa", "speculator"} - {kind}).pop(), target_fingerprint(target), "tiny")
    with pytest.raises(SpecsweepError, match="run `make drafts`"):
        load_checkpoint(tmp_path / "missing.pt", kind, target_fingerprint(target), "tiny")
    with pytest.raises(SpecsweepError, match="draft.heads=4: the checkpoint has 3"):
        drafter(kind, target, network, vocab, 4, Sampling())


def test_the_fingerprint_ignores_the_dtype_a_profile_loads(target):
    bf16 = tiny_llama(3, vocab=96, init=0.6).to(torch.bfloat16)
    assert target_fingerprint(bf16) == target_fingerprint(target)


def test_training_data_never_read_held_out_humaneval():
    with pytest.raises(SpecsweepError, match="held-out"):
        head_data.humaneval_prompts(100, 130)
    assert len(head_data.humaneval_prompts(0, 124)) == 124


def test_excluded_modules_stay_out_of_the_corpus():
    files = head_data.stdlib_files(["textwrap", "json.encoder"], seed=0)
    names = {(f.parent.name, f.name) for f in files}
    assert ("json", "encoder.py") not in names and not any(n == "textwrap.py" for _, n in names)
    assert ("json", "decoder.py") in names
    assert files == head_data.stdlib_files(["textwrap", "json.encoder"], seed=0)  # seeded order


def test_teacher_forcing_right_padding_changes_no_row(target):
    seqs = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    together = head_data.teacher_forced(target, seqs, 512)
    alone = [head_data.teacher_forced(target, [s], 512)[0] for s in seqs]
    for (h1, c1), (h2, c2) in zip(together, alone):
        torch.testing.assert_close(h1.float(), h2.float(), rtol=1e-2, atol=1e-2)
        assert torch.equal(c1, c2)


class DigitTokenizer:
    """Prompts of space-separated token ids, for head_data.generate on the tiny target."""

    pad_token_id = 0

    def __init__(self, eos: int):
        self.eos_token_id = eos

    def __call__(self, text: str):
        return type("Encoded", (), {"input_ids": [int(t) for t in text.split()]})()


def test_generated_text_keeps_the_states_teacher_forcing_would_compute(target):
    """Phase 2's states come from generation itself: the same tokens as an unbatched greedy
    continuation, and per position the state and the choice a teacher-forced forward gives."""
    rows = [row[:n].tolist() for row, n in zip(PROMPTS[:5], (6, 2, 5, 1, 4))]
    eos = hf_greedy(target, torch.tensor([rows[2]]), 12)[3]  # one continuation ends at EOS mid-way
    alone = [hf_greedy(target, torch.tensor([r]), 12, eos=[eos]) for r in rows]
    prompts = [" ".join(map(str, r)) for r in rows]
    sequences, states = head_data.generate(target, DigitTokenizer(eos), prompts, 12, 3)
    forced = head_data.teacher_forced(target, sequences, 512)
    assert any(len(c) < 12 for c in alone)
    for row, continuation, seq, (h, c), (h_tf, c_tf) in zip(rows, alone, sequences, states, forced):
        if eos in continuation:
            continuation = continuation[:continuation.index(eos) + 1]
        assert seq == row + continuation[:-1] and h.shape[0] == c.numel() == len(seq)
        assert c.tolist() == c_tf.tolist() and c[len(row) - 1:].tolist() == continuation
        torch.testing.assert_close(h.float(), h_tf.float(), rtol=1e-2, atol=1e-2)


def test_two_chains_merge_into_a_trie():
    from specsweep.drafters.union import merge

    assert merge([1, 2, 3], [1, 2, 3, 4], 8) == ([1, 2, 3, 4], None)  # the second extends the first
    assert merge([], [5, 6], 8) == ([5, 6], None)
    tokens, tree = merge([1, 2, 3], [1, 7, 8], 8)
    assert tokens == [1, 2, 3, 7, 8] and tree.parents == (-1, 0, 1, 0, 3) and tree.ranks == (0, 0, 0, 1, 0)
    tokens, tree = merge([1, 2, 3], [4], 3)  # no room left for the second
    assert tokens == [1, 2, 3] and tree is None


def test_heads_and_prompt_lookup_merged_are_the_targets_own_output(trained, target):
    from specsweep.drafters.prompt_lookup import PromptLookupDrafter
    from specsweep.drafters.union import UnionDrafter

    kind, network, vocab = trained[:3]
    prompt = torch.cat([PROMPTS[:1], PROMPTS[:1]], 1)  # a repeat for the lookup to find
    reference = decode(target, None, 1, prompt).output_ids
    union = UnionDrafter(PromptLookupDrafter(3, 1), drafter(kind, target, network, vocab, 3, Sampling()), 8)
    result = decode(target, union, 8, prompt)
    assert result.output_ids == reference
    assert union.trees > 0 and result.stats.accepted_tokens > 0


@pytest.mark.slow
def test_the_trainer_writes_heads_a_decode_job_then_uses(model_dirs, tmp_path):
    """`experiment=train_heads` end to end on a tiny local target: a checkpoint where draft=medusa
    looks, a second call keeps it, a decode job with it is lossless, another target is refused."""
    import json
    import os
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"task_id": "a", "prompt": "def add(a, b):\n    return"}) + "\n")
    common = ["target=local", f"target.path={model_dirs['target']}", f"cache_dir={tmp_path / 'cache'}", "draft=medusa"]
    train = ["experiment=train_heads", "logger=none", "train.bf16=false", "train.heads=2", "train.vocab=64",
             "train.corpus_tokens=3000", "train.humaneval.limit=4", "train.generate.prompts=4",
             "train.generate.functions=4", "train.generate.new_tokens=16", "train.phase1_steps=20",
             "train.phase2_steps=10", "train.eval_every=10", "train.batch=64"]
    decode = ["dataset=jsonl", f"dataset.path={prompts}", "decode.max_new_tokens=12", "hardware=cpu", "evaluate=false"]
    heads = ["draft.heads=2", "tree.depth=2"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}

    def specsweep(*args):
        return subprocess.run([sys.executable, "-m", "specsweep", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    first = specsweep(*common, *train, f"hydra.run.dir={tmp_path / 'train1'}")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "cache" / "heads" / "local" / "medusa.pt"
    metrics = json.loads((tmp_path / "train1" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(checkpoint) and len(metrics["top1"]) == 2
    assert metrics["data"]["generated_sequences"] == 8 and metrics["lock_sha256"] and metrics["bf16"] is False
    again = specsweep(*common, *train, f"hydra.run.dir={tmp_path / 'train2'}")
    assert again.returncode == 0 and "up to date" in again.stdout
    run = specsweep(*common, *decode, *heads, f"hydra.run.dir={tmp_path / 'decode'}")
    assert run.returncode == 0, run.stderr[-3000:]
    ar = specsweep(*common[:3], "draft=none", *decode, f"hydra.run.dir={tmp_path / 'ar'}")
    outputs = [json.loads((tmp_path / d / "samples.jsonl").read_text().splitlines()[0])["output_ids"]
               for d in ("decode", "ar")]
    assert ar.returncode == 0 and outputs[0] == outputs[1]
    other = specsweep(*common[:1], f"target.path={model_dirs['draft']}", *common[2:], *decode, *heads,
                      f"draft.checkpoint={checkpoint}", f"hydra.run.dir={tmp_path / 'other'}")
    assert other.returncode == 2
    errors = [line for line in other.stderr.splitlines() if line.startswith("specsweep: error:")]
    assert len(errors) == 1 and "trained for target local" in errors[0] and "Traceback" not in other.stderr


@pytest.mark.parametrize("override, message", [
    ("train.heads=0", "train.heads=0: must be an integer >= 1"),
    ("train.validation_every=abc", "train.validation_every='abc'"),
    ("train.lr=-1", "train.lr=-1: must be a positive number"),
    ("train.bf16=maybe", "train.bf16='maybe': choose auto, true or false"),
    ("train.humaneval.limit=130", "held-out"),
    ("draft=prompt-lookup", "trains draft=medusa or draft=speculator"),
])
def test_bad_training_settings_are_refused_before_anything_loads(override, message):
    from specsweep.tools.bench import compose_cfg
    from specsweep.tools.train_heads import check_settings

    with pytest.raises(SpecsweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settings(compose_cfg(["experiment=train_heads", override]))


def test_train_bf16_auto_follows_the_cpu_and_true_is_refused_where_bf16_is_emulated(monkeypatch):
    from specsweep.backends import hardware
    from specsweep.tools import train_heads
    from specsweep.tools.bench import compose_cfg

    cpu = hardware.resolve(compose_cfg(["experiment=train_heads"]).hardware)
    assert train_heads.use_bf16("auto", cpu) is (bf16_unsupported() is None)  # this machine's own kernels
    assert train_heads.use_bf16(False, cpu) is False

    def no_bf16(device, dtype, setting):
        raise SpecsweepError(f"{setting}: this torch/CPU has no oneDNN bf16 support")

    monkeypatch.setattr(train_heads, "check_supported", no_bf16)  # as on an AVX2-only CPU
    assert train_heads.use_bf16("auto", cpu) is False
    with pytest.raises(SpecsweepError, match=r"^train.bf16=true: this torch/CPU has no oneDNN bf16 support$"):
        train_heads.use_bf16(True, cpu)
