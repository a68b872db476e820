"""Tree shapes, paths, masks and position ids, checked against hand derivations from the definition."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from specsweep import CONF_DIR
from specsweep.core.tree import MEDUSA_TREE_FILE, DynamicTreeSpec, Tree, TreeError

CONF_TREE = CONF_DIR / "tree"
MEDUSA_PATHS = OmegaConf.to_container(OmegaConf.load(MEDUSA_TREE_FILE).paths)

#        root
#       /    \
#      0      1
#     / \     |
#    2   3    4
#    |
#    5
HAND_DRAWN = Tree(parents=(-1, -1, 0, 0, 1, 2), ranks=(0, 1, 0, 1, 0, 0))


def ancestors_by_walking(parents, i):
    """Node i and every ancestor of it, found by following parent links up to the root."""
    seen = {i}
    while parents[i] != -1:
        i = parents[i]
        seen.add(i)
    return seen


def depth_by_walking(parents, i):
    return len(ancestors_by_walking(parents, i))


def expected_prefix_mask(parents, prefix_len):
    n = len(parents)
    allowed = [[True] * prefix_len + [j in ancestors_by_walking(parents, i) for j in range(n)] for i in range(n)]
    return allowed


def expected_verify_mask(parents, cache_len):
    n = len(parents)
    root_row = [True] * (cache_len + 1) + [False] * n
    node_rows = [
        [True] * (cache_len + 1) + [j in ancestors_by_walking(parents, i) for j in range(n)] for i in range(n)
    ]
    return [root_row] + node_rows


def as_allowed(additive, dtype):
    """Additive mask -> nested bool list; also checks it holds only 0 and dtype-min."""
    values = additive[0, 0]
    assert torch.all((values == 0) | (values == torch.finfo(dtype).min))
    return (values == 0).tolist()


TREES = {
    "hand_drawn": HAND_DRAWN,
    "chain5": Tree.chain(5),
    "binary3": Tree.kary(2, 3),
    "kary3x2": Tree.kary(3, 2),
    "medusa": Tree.from_paths(MEDUSA_PATHS),
}


# ---- structure ------------------------------------------------------------------------------


def test_hand_drawn_structure():
    t = HAND_DRAWN
    assert t.num_nodes == 6
    assert t.depths == (1, 1, 2, 2, 2, 3)
    assert t.depth == 3
    assert t.paths == ((0, 3), (1, 4), (0, 2, 5))  # in leaf order
    assert t.children(-1) == (0, 1)
    assert t.children(0) == (2, 3)
    assert t.children(5) == ()
    assert not t.is_chain
    assert t.rank_paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


def test_from_paths_orders_parents_before_children():
    t = Tree.from_paths([[1], [0, 0], [0], [1, 0], [0, 0, 0], [0, 1]])
    assert t.rank_paths == ((1,), (0,), (0, 0), (1, 0), (0, 1), (0, 0, 0))
    assert all(p < i for i, p in enumerate(t.parents))


def test_chain_and_kary_shapes():
    chain = Tree.chain(4)
    assert chain.parents == (-1, 0, 1, 2) and chain.is_chain and chain.paths == ((0, 1, 2, 3),)
    binary = Tree.binary(3)
    assert binary == Tree.kary(2, 3)
    assert binary.num_nodes == 2 + 4 + 8 and len(binary.paths) == 8 and binary.depth == 3
    kary = Tree.kary(3, 2)
    assert kary.num_nodes == 12 and len(kary.paths) == 9
    assert kary.rank_paths[:4] == ((0,), (1,), (2,), (0, 0))
    assert Tree.kary(1, 3) == Tree.chain(3)


def test_default_ranks_number_siblings():
    assert Tree(parents=(-1, -1, 0, 1, 1)).ranks == (0, 1, 0, 0, 1)


def test_trees_are_hashable_values():
    assert Tree.from_paths([[0], [0, 0]]) == Tree.chain(2)
    assert len({Tree.chain(3), Tree.chain(3), Tree.binary(1)}) == 2


def test_medusa_mc_sim_7b_63():
    assert len(MEDUSA_PATHS) == 63
    listed = {tuple(p) for p in MEDUSA_PATHS}
    assert len(listed) == 63
    assert all(tuple(p[:-1]) in listed for p in MEDUSA_PATHS if len(p) > 1)
    t = Tree.from_paths(MEDUSA_PATHS)
    assert t.num_nodes == 63 and t.depth == 4
    assert sorted(t.rank_paths) == sorted(listed)
    # one path per leaf: a rank path that prefixes no other one
    leaves = [p for p in listed if not any(q[: len(p)] == p and len(q) > len(p) for q in listed)]
    assert len(t.paths) == len(leaves) == 42
    assert {tuple(t.ranks[i] for i in path) for path in t.paths} == set(leaves)


def test_paths_cover_every_node_and_end_at_leaves():
    for t in TREES.values():
        assert set().union(*map(set, t.paths)) == set(range(t.num_nodes))
        for path in t.paths:
            assert path[0] in t.children(-1)
            assert all(t.parents[b] == a for a, b in zip(path, path[1:]))
            assert t.children(path[-1]) == ()


# ---- tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TREES)
def test_ancestor_mask_matches_walking_parents(name):
    t = TREES[name]
    n = t.num_nodes
    expected = [[j in ancestors_by_walking(t.parents, i) for j in range(n)] for i in range(n)]
    assert t.ancestor_mask().tolist() == expected


@pytest.mark.parametrize("name", TREES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_mask_matches_definition(name, dtype):
    t, prefix_len = TREES[name], 7
    mask = t.attention_mask(prefix_len, dtype=dtype)
    assert mask.shape == (1, 1, t.num_nodes, prefix_len + t.num_nodes) and mask.dtype == dtype
    assert as_allowed(mask, dtype) == expected_prefix_mask(t.parents, prefix_len)


@pytest.mark.parametrize("name", TREES)
def test_verify_mask_matches_definition(name):
    t, cache_len = TREES[name], 5
    mask = t.verify_mask(cache_len)
    assert mask.shape == (1, 1, t.num_nodes + 1, cache_len + t.num_nodes + 1)
    assert as_allowed(mask, torch.float32) == expected_verify_mask(t.parents, cache_len)


@pytest.mark.parametrize("name", TREES)
def test_position_ids_match_depths(name):
    t = TREES[name]
    depths = [depth_by_walking(t.parents, i) for i in range(t.num_nodes)]
    assert t.position_ids(10).tolist() == [[10 + d - 1 for d in depths]]
    assert t.verify_position_ids(10).tolist() == [[10] + [10 + d for d in depths]]


def test_hand_drawn_verify_block_literally():
    # cache of 2, then root r and nodes 0..5; 1 = allowed
    expected = [
        # c c r 0 1 2 3 4 5
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # r
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # 0
        [1, 1, 1, 0, 1, 0, 0, 0, 0],  # 1
        [1, 1, 1, 1, 0, 1, 0, 0, 0],  # 2
        [1, 1, 1, 1, 0, 0, 1, 0, 0],  # 3
        [1, 1, 1, 0, 1, 0, 0, 1, 0],  # 4
        [1, 1, 1, 1, 0, 1, 0, 0, 1],  # 5
    ]
    assert as_allowed(HAND_DRAWN.verify_mask(2), torch.float32) == [[bool(x) for x in row] for row in expected]
    assert HAND_DRAWN.verify_position_ids(2).tolist() == [[2, 3, 3, 4, 4, 4, 5]]


def test_the_two_conventions_agree():
    # prefix = cache + root, so the node rows of verify_mask(L) are attention_mask(L + 1)
    t = TREES["medusa"]
    assert torch.equal(t.verify_mask(9)[:, :, 1:], t.attention_mask(10))
    assert torch.equal(t.verify_position_ids(9)[:, 1:], t.position_ids(10))


def test_mask_device_and_dtype():
    mask = HAND_DRAWN.attention_mask(3, dtype=torch.float16, device="cpu")
    assert mask.device.type == "cpu" and mask.min() == torch.finfo(torch.float16).min


# ---- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, nodes",
    [("chain", 4), ("binary", 14), ("kary", 12), ("medusa", 63)],
)
def test_shipped_configs(name, nodes):
    cfg = OmegaConf.load(CONF_TREE / f"{name}.yaml")
    assert cfg.name == cfg.shape == name
    assert Tree.from_config(cfg).num_nodes == nodes


def test_dynamic_config_gives_a_spec():
    cfg = OmegaConf.load(CONF_TREE / "dynamic.yaml")
    assert cfg.name == "dynamic"
    assert Tree.from_config(cfg) == DynamicTreeSpec(budget=16, depth=6, k=4)


def test_custom_config_needs_its_file():
    cfg = OmegaConf.load(CONF_TREE / "custom.yaml")
    assert cfg.name == "custom"
    with pytest.raises(TreeError, match="path_file"):
        Tree.from_config(cfg)


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_path_file(tmp_path, suffix):
    paths = [[0], [1], [0, 0]]
    file = tmp_path / f"tree.{suffix}"
    file.write_text(json.dumps(paths) if suffix == "json" else "- [0]\n- [1]\n- [0, 0]\n")
    assert Tree.from_config({"shape": "custom", "path_file": str(file)}) == Tree.from_paths(paths)


def test_path_file_may_be_a_tree_config():
    tree = Tree.from_config({"shape": "custom", "path_file": str(MEDUSA_TREE_FILE)})
    assert tree == Tree.from_config({"shape": "medusa"}) == TREES["medusa"]


def test_inline_paths_from_omegaconf():
    cfg = OmegaConf.create({"shape": "custom", "paths": [[0], [0, 0], [1]]})
    assert Tree.from_config(cfg).rank_paths == ((0,), (1,), (0, 0))


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Tree.from_paths([[0], [0, 1, 0]]), "orphan path"),
        (lambda: Tree.from_paths([[1, 0]]), "orphan path"),
        (lambda: Tree.from_paths([[0], [0]]), "duplicate tree path"),
        (lambda: Tree.from_paths([]), "at least one path"),
        (lambda: Tree.from_paths([[]]), "non-empty"),
        (lambda: Tree.from_paths([[0], [0, -1]]), "ranks must be >= 0"),
        (lambda: Tree.from_paths([[0.5]]), "integers"),
        (lambda: Tree(parents=(-1, -1), ranks=(0, 0)), "duplicate node"),
        (lambda: Tree(parents=(-1, 1)), "parent 1"),
        (lambda: Tree(parents=(-1, -2)), "parent -2"),
        (lambda: Tree(parents=()), "at least one node"),
        (lambda: Tree(parents=(-1,), ranks=(-1,)), "ranks must be >= 0"),
        (lambda: Tree(parents=(-1, 0), ranks=(0,)), "2 parents but 1 ranks"),
        (lambda: Tree.chain(0), "depth must be >= 1"),
        (lambda: Tree.kary(0, 2), "k must be >= 1"),
        (lambda: Tree.kary(2, 0), "depth must be >= 1"),
        (lambda: Tree.from_config({"shape": "chain"}), "depth must be an integer"),
        (lambda: Tree.from_config({"shape": "star"}), "unknown tree shape 'star'"),
        (lambda: Tree.from_config({}), "unknown tree shape None"),
        (lambda: Tree.from_config({"shape": "dynamic", "budget": 0, "depth": 6, "k": 4}), "budget must be >= 1"),
        (lambda: Tree.from_config({"shape": "dynamic", "budget": 8, "depth": 0, "k": 4}), "depth must be >= 1"),
        (lambda: Tree.from_config({"shape": "dynamic", "budget": 8, "depth": 2, "k": 0}), "k must be >= 1"),
        (lambda: Tree.from_config({"shape": "custom"}), "needs `paths` or `path_file`"),
        (lambda: Tree.from_config({"shape": "custom", "paths": [[0]], "path_file": "x"}), "not both"),
        (lambda: Tree.from_config({"shape": "custom", "path_file": "/nonexistent.yaml"}), "not found"),
        (lambda: Tree.from_config({"shape": "medusa", "paths": [[0], [0], [1]]}), "duplicate tree path"),
    ],
)
def test_errors(build, message):
    with pytest.raises(TreeError, match=message) as info:
        build()
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_path_file_with_wrong_content(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("shape: custom\n")
    with pytest.raises(TreeError, match="expected a list of rank paths"):
        Tree.from_config({"shape": "custom", "path_file": str(file)})
