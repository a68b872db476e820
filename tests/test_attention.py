"""Every tree-attention implementation agrees with a float64 reference written from the definition."""

import math
import random

import pytest
import torch

from specsweep import CONF_DIR
from specsweep.core.tree import MEDUSA_TREE_FILE, Tree
from specsweep.tools import tree_attention as attention
from specsweep.tools.tree_attention import flex


def random_tree(num_nodes: int, seed: int) -> Tree:
    rng = random.Random(seed)
    return Tree(parents=tuple(rng.randrange(-1, i) for i in range(num_nodes)))


TREES = {
    "medusa": Tree.from_config({"shape": "custom", "path_file": str(MEDUSA_TREE_FILE)}),
    "binary3": Tree.binary(3),
    "chain6": Tree.chain(6),
    "single": Tree.chain(1),
    "random9": random_tree(9, seed=1),
    "random24": random_tree(24, seed=2),
}
HEADS = {"gqa_smollm2": (9, 3, 64), "mha": (4, 4, 32)}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def reference(q, k, v, tree: Tree, prefix_len: int) -> torch.Tensor:
    """Softmax attention in float64 with the mask built by walking each node's parents."""
    n = tree.num_nodes
    allowed = torch.zeros(n, prefix_len + n, dtype=torch.bool)
    allowed[:, :prefix_len] = True
    for i in range(n):
        j = i
        while j != -1:
            allowed[i, prefix_len + j] = True
            j = tree.parents[j]
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, -math.inf).softmax(-1) @ v


def inputs(tree: Tree, heads: str, batch: int, prefix_len: int, dtype: torch.dtype, seed: int = 0):
    q_heads, kv_heads, head_dim = HEADS[heads]
    gen = torch.Generator().manual_seed(seed)
    n = tree.num_nodes
    q = torch.randn(batch, q_heads, n, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, prefix_len + n, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, prefix_len + n, head_dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def assert_close_to_reference(out, q, k, v, tree, prefix_len):
    assert out.shape == q.shape and out.dtype == q.dtype
    error = (out.double() - reference(q, k, v, tree, prefix_len)).abs().max().item()
    assert error < TOLERANCE[q.dtype], f"max abs error {error:.2e}"


EAGER_IMPLEMENTATIONS = ["sequential", "masked_sdpa", "split"]


@pytest.mark.parametrize("name", EAGER_IMPLEMENTATIONS)
@pytest.mark.parametrize("tree_name", TREES)
@pytest.mark.parametrize("heads", HEADS)
def test_agrees_with_reference(name, tree_name, heads):
    tree, prefix_len = TREES[tree_name], 45
    q, k, v = inputs(tree, heads, batch=3, prefix_len=prefix_len, dtype=torch.float32)
    out = attention.get(name).attend(q, k, v, tree, prefix_len)
    assert_close_to_reference(out, q, k, v, tree, prefix_len)


@pytest.mark.parametrize("name", EAGER_IMPLEMENTATIONS)
@pytest.mark.parametrize("tree_name", ["medusa", "random24"])
def test_bfloat16(name, tree_name):
    tree, prefix_len = TREES[tree_name], 70
    q, k, v = inputs(tree, "gqa_smollm2", batch=2, prefix_len=prefix_len, dtype=torch.bfloat16)
    out = attention.get(name).attend(q, k, v, tree, prefix_len)
    assert_close_to_reference(out, q, k, v, tree, prefix_len)


@pytest.mark.parametrize("name", EAGER_IMPLEMENTATIONS)
@pytest.mark.parametrize("prefix_len", [0, 1])
def test_short_prefix(name, prefix_len):
    tree = TREES["binary3"]
    q, k, v = inputs(tree, "gqa_smollm2", batch=2, prefix_len=prefix_len, dtype=torch.float32)
    assert_close_to_reference(attention.get(name).attend(q, k, v, tree, prefix_len), q, k, v, tree, prefix_len)


def test_split_math_fallback_matches_fused_kernel():
    q, k, v = (torch.randn(2, 3, length, 64) for length in (20, 300, 300))
    fused_out, fused_lse = attention.split.attention_with_lse(q, k, v)
    scores = (q @ k.transpose(-1, -2)) / 8.0
    assert torch.allclose(fused_lse, scores.logsumexp(-1), atol=1e-5)
    assert torch.allclose(fused_out, scores.softmax(-1) @ v, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("tree_name", TREES)
@pytest.mark.parametrize("heads", HEADS)
def test_flex_block_mask_agrees_with_reference(tree_name, heads):
    # The tree logic lives in the BlockMask; the uncompiled kernel checks it quickly.
    from torch.nn.attention.flex_attention import flex_attention

    tree, prefix_len = TREES[tree_name], 150  # > one 128-wide block of prefix keys
    q, k, v = inputs(tree, heads, batch=2, prefix_len=prefix_len, dtype=torch.float32)
    mask = flex.block_mask(tree, prefix_len, q.device)
    out = flex_attention(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    assert_close_to_reference(out, q, k, v, tree, prefix_len)


def test_flex_compiled_agrees_with_reference():
    ok, reason = flex.available(torch.device("cpu"))
    if not ok:
        pytest.skip(reason)
    tree, prefix_len = TREES["medusa"], 40
    q, k, v = inputs(tree, "gqa_smollm2", batch=2, prefix_len=prefix_len, dtype=torch.float32)
    assert_close_to_reference(attention.get("flex").attend(q, k, v, tree, prefix_len), q, k, v, tree, prefix_len)


def test_registry():
    assert set(attention.IMPLEMENTATIONS) == {"sequential", "masked_sdpa", "flex", "split"}
    assert attention.get("split").name == "split"
    assert attention.get("masked_sdpa").available(torch.device("cpu")) == (True, "")
    with pytest.raises(ValueError, match="unknown tree attention 'dense'"):
        attention.get("dense")


def test_flex_unavailable_off_cpu_and_cuda():
    ok, reason = flex.available(torch.device("meta"))
    assert not ok and "meta" in reason


def test_benchmark_run_writes_its_outputs(tmp_path, monkeypatch):
    import csv

    from omegaconf import OmegaConf

    from specsweep.tools.tree_attention import benchmark

    experiment = CONF_DIR / "experiment" / "tree_attention.yaml"
    cfg = OmegaConf.load(experiment)
    assert cfg.job == "specsweep.tools.tree_attention.benchmark.job"
    bench = OmegaConf.merge(
        cfg.bench,
        {
            "device": "cpu",  # the float32 tolerance below is a CPU one
            "implementations": ["sequential", "masked_sdpa", "split"],
            "heads": ["smollm2"],
            "center": {"batch": 1, "prefix": 16, "tree": "binary6"},
            "prefix_lens": [16],
            "trees": ["chain4", "binary6"],
            "batch_sizes": [1, 64],
            "max_tensor_mib": {"cpu": 1},  # batch 64 needs ~2.8 MiB: skipped
            "warmup": 1,
            "repeats": 1,
            "free_tokens": {"max_nodes": 2, "model": {"num_hidden_layers": 1, "vocab_size": 64}},
        },
    )
    monkeypatch.chdir(tmp_path)  # the default output directory
    benchmark.run(bench)

    rows = list(csv.DictReader(open(tmp_path / benchmark.CSV_NAME)))
    assert {(r["batch"], r["tree"]) for r in rows} == {("1", "chain4"), ("1", "binary6"), ("64", "binary6")}
    assert len(rows) == 3 * 3
    for r in rows:
        if r["batch"] == "64":
            assert r["status"].startswith("skipped: needs a 3 MiB tensor")
        else:
            assert r["status"] == "ok" and float(r["median_ms"]) > 0 and float(r["max_abs_err"]) < 1e-5
    free = list(csv.DictReader(open(tmp_path / benchmark.FREE_TOKENS_CSV_NAME)))
    assert [int(r["nodes"]) for r in free] == [0, 1, 2]
    assert float(free[0]["vs_decode"]) == 1.0
    for png in ["time_vs_prefix", "time_vs_tree", "time_vs_batch", "speedup_over_sequential", "free_tokens"]:
        assert (tmp_path / f"{png}.png").stat().st_size > 0


def test_axes_sweep_varies_one_coordinate_at_a_time():
    from omegaconf import OmegaConf

    from specsweep.tools.tree_attention.benchmark import Point, sweep_points

    cfg = OmegaConf.create(
        {
            "sweep": "axes",
            "center": {"batch": 1, "prefix": 1024, "tree": "m"},
            "prefix_lens": [128, 1024],
            "trees": ["c", "m"],
            "batch_sizes": [1, 4],
        }
    )
    assert sweep_points(cfg) == [Point(1, 128, "m"), Point(1, 1024, "m"), Point(1, 1024, "c"), Point(4, 1024, "m")]
    cfg.sweep = "grid"
    assert len(sweep_points(cfg)) == 8
