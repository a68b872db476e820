"""The exactness probe: proof, on this machine, that a profile's verify forwards keep one-row bits.

Greedy speculative decoding is token for token the target's own only if every row of an n-row
verify forward has the bits the same token gets in a one-row step. Kernels decide that, and they
differ between CPUs (AMX or not) and GPUs, so a profile that claims it (`hardware.exactness_probe`:
cpu-bf16, cuda) proves it before decoding, through the very runner the run decodes with:

* chains of every size the run can verify, 2..N rows, against N one-row steps over the same tokens;
* the run's tree shape (and its truncations by depth), each node against one-row steps down its path;
* after two prefixes (37 and 300 cached tokens: a short and a long attention).

Random tokens on the real weights (the kernels' blocking depends on shapes, not on the text). The
verdict is cached per machine, lock, model, profile and the code of the forward path, so a sweep
pays the few seconds once. A failure stops the run before decoding with one line naming the size
that failed and what is exact here.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specsweep.backends.hardware import Hardware
from specsweep.backends.machine import machine_fingerprint, machine_info
from specsweep.core.tree import DynamicTreeSpec, SelfShaped, StepShape, Tree, draft_nodes
from specsweep.errors import SpecsweepError
from specsweep.files import write_json

PREFIXES = (37, 300)
# the code a verify forward runs through: a change to any of it invalidates cached verdicts
FORWARD_CODE = ("prepack.py", "lean.py", "target.py", "cache.py", "row_invariant.py", "exactness.py")


@dataclass
class ProbeResult:
    passed: bool
    largest_chain: int  # rows of the largest chain verify probed
    tree_nodes: int | None  # nodes of the tree shape probed (None: chains only)
    failure: str | None  # what failed first, in words
    largest_exact: int  # every chain verify up to this many rows kept one-row bits
    seconds: float
    cached: bool = False
    key: str = ""


def probe_tree(shape: StepShape | None) -> Tree | None:
    """The tree the probe verifies for a run's draft shape: a fixed tree itself, for a dynamic one
    the k-ary tree of its depth cut to its node budget, for a self-shaped one its largest step's;
    None for chains."""
    if isinstance(shape, SelfShaped):
        return shape.largest
    if shape is None or (isinstance(shape, Tree) and shape.is_chain):
        return None
    if isinstance(shape, DynamicTreeSpec):
        return Tree(Tree.kary(shape.k, shape.depth).parents[:shape.budget])
    return shape


def model_fingerprint(model) -> str:
    """Which model the forwards run: its dir, its config (the shapes, which decide the kernels) and a
    sample of the bits of every tensor in its state dict (prepacked linears keep theirs outside it)."""
    digest = hashlib.sha256(f"{model.name_or_path}|{model.config.to_json_string()}".encode())
    for name, tensor in list(model.state_dict().items()):
        if tensor is None:
            continue
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _code_hash() -> str:
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in FORWARD_CODE:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def probe_key(model, hw: Hardware, largest: int, tree: Tree | None, lock: str | None) -> str:
    parts = {"machine": machine_fingerprint(), "lock": lock, "model": model_fingerprint(model),
             "hardware": hw.describe(), "largest": largest, "tree": tree.parents if tree else None,
             "code": _code_hash()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _steps(runner, tokens: list[int], start: int, device) -> list[torch.Tensor]:
    """One-row steps over ``tokens`` after ``start`` cached tokens -> each step's logits [V]."""
    return [runner.score(torch.tensor([[t]], device=device), None, start + i)[-1].clone()
            for i, t in enumerate(tokens)]


def _dfs_order(tree: Tree) -> list[int]:
    """The nodes, each right after its parent and before its parent's next child (depth first)."""
    order, stack = [], [i for i in reversed(range(tree.num_nodes)) if tree.parents[i] == -1]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(tree.children(node)))
    return order


def _probe_prefix(runner, model, prefix_len: int, largest: int, tree: Tree | None, seed: int) -> tuple[str | None, int]:
    """-> (the first failure or None, the largest chain size whose rows all kept one-row bits)."""
    device = model.device
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 10_000)
    prefix = torch.randint(vocab, (1, prefix_len), generator=g).to(device)
    new = torch.randint(vocab, (largest,), generator=g).tolist()
    room = largest + (tree.num_nodes + 1 if tree else 0) + 1
    runner.prefill(prefix, room)
    steps = _steps(runner, new, prefix_len, device)
    runner.keep(prefix_len, [])
    exact = 1
    for n in range(2, largest + 1):
        rows = runner.score(torch.tensor([new[:n]], device=device), None, prefix_len)
        runner.keep(prefix_len, [])
        bad = next((i for i in range(n) if not torch.equal(rows[i], steps[i])), None)
        if bad is not None:
            return f"a {n}-row chain verify after {prefix_len} tokens rounds row {bad} differently than a one-row step", exact
        exact = n
    for shape in ([tree.truncated(d) for d in range(1, tree.depth)] + [tree]) if tree else []:
        tokens = torch.randint(vocab, (shape.num_nodes + 1,), generator=g).tolist()
        rows = runner.score(torch.tensor([tokens], device=device), shape, prefix_len)
        runner.keep(prefix_len, [])
        root = _steps(runner, tokens[:1], prefix_len, device)[0]
        failed = [] if torch.equal(rows[0], root) else [-1]
        for node in _dfs_order(shape):
            path = list(shape.ancestry(node))  # from the root's child down to the node
            runner.keep(prefix_len + len(path), [])  # the root and the node's ancestors, stepped before it
            logits = _steps(runner, [tokens[1 + node]], prefix_len + len(path), device)[0]
            if not torch.equal(rows[1 + node], logits):
                failed.append(node)
        runner.keep(prefix_len, [])
        if failed:
            return (f"a tree verify of {shape.num_nodes} nodes after {prefix_len} tokens rounds node {failed[0]} "
                    f"differently than one-row steps down its path"), exact
    return None, exact


def run_probe(runner, model, hw: Hardware, largest: int, tree: Tree | None) -> ProbeResult:
    start = time.perf_counter()
    failure, exact = None, largest
    with torch.inference_mode():
        for seed, prefix_len in enumerate(PREFIXES):
            prefix_len = min(prefix_len, model.config.max_position_embeddings - largest - 2 * (tree.num_nodes if tree else 0) - 2)
            failure, exact_here = _probe_prefix(runner, model, prefix_len, largest, tree, seed)
            exact = min(exact, exact_here)
            if failure:
                break
    return ProbeResult(failure is None, largest, tree.num_nodes if tree else None, failure, exact,
                       round(time.perf_counter() - start, 2))


def ensure_exact(runner, model, hw: Hardware, shape: StepShape | None, cache_dir: Path,
                 lock: str | None) -> dict | None:
    """Run (or read the cached verdict of) the probe for ``hw`` if it asks for one; refuse with one
    line if it fails. ``shape``: the run's draft shape, None for autoregressive decoding (one-row
    steps only: nothing to prove); ``lock``: the environment's lock hash (part of the cache key).
    -> the verdict for metrics.json, or None where none is needed."""
    if not hw.exactness_probe or shape is None:
        return None
    tree = probe_tree(shape)
    nodes = draft_nodes(shape)
    largest = max(2, min(nodes + 1, hw.verify_width or hw.max_verify_tokens or nodes + 1))
    key = probe_key(model, hw, largest, tree, lock)
    path = Path(cache_dir) / "exactness" / f"{key}.json"
    if path.is_file():
        result = ProbeResult(**{**json.loads(path.read_text()), "cached": True})
    else:
        result = run_probe(runner, model, hw, largest, tree)
        result.key = key
        write_json(path, asdict(result))
    if not result.passed:
        raise SpecsweepError(refusal(result, hw))
    return asdict(result)


def refusal(result: ProbeResult, hw: Hardware) -> str:
    """The one line a failed probe stops the run with: what failed and what is exact here."""
    k = result.largest_exact
    if result.failure.startswith("a tree"):
        instead = f"chain verifies of up to {k} rows are exact here: use tree=chain"
    elif k >= 2:
        instead = f"chain verifies of up to {k} rows are exact here (hardware.max_verify_tokens={k}, tree.depth<={k - 1})"
    else:
        instead = "no multi-row verify is exact here"
    return (f"exactness probe failed on this machine ({machine_info().get('cpu_model')}): {result.failure}, so "
            f"outputs would not be the target's own; {instead}, or use hardware=cpu (fp32, exact up to ties)")
