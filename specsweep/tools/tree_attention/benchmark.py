"""Tree-attention benchmark: time every implementation across batch, prefix length and tree.

``run(cfg, out_dir)`` takes the ``bench`` block of ``conf/experiment/tree_attention.yaml`` and
writes into ``out_dir`` (the Hydra run dir; default: the current directory):

* ``tree_attention.csv``: one row per (head config, batch, prefix, tree, implementation);
* ``time_vs_prefix.png``, ``time_vs_tree.png``, ``time_vs_batch.png``,
  ``speedup_over_sequential.png``;
* ``free_tokens.csv`` and ``free_tokens.png`` (see `free_tokens`).
"""

from __future__ import annotations

import csv
import itertools
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from specsweep.core.tree import Tree
from specsweep.tools.tree_attention import free_tokens, get, masked_sdpa, plots
from specsweep.tools.tree_attention.timing import measure

CSV_NAME = "tree_attention.csv"
FREE_TOKENS_CSV_NAME = "free_tokens.csv"
FIELDS = [
    "heads", "q_heads", "kv_heads", "head_dim", "batch", "prefix", "tree", "shape", "nodes", "paths",
    "depth", "impl", "status", "median_ms", "min_ms", "repeats", "max_abs_err", "device", "dtype", "threads",
]  # fmt: skip

# Hydra jobs log to files: don't squeeze tables into the 80 columns rich assumes off a terminal.
console = Console(width=None if sys.stdout.isatty() else 160)


class Point(NamedTuple):
    batch: int
    prefix: int
    tree: str


def job(cfg: DictConfig, run_dir: Path, choices: dict | None = None, group: str | None = None) -> None:
    """`experiment=tree_attention`'s job (the app's job signature): the benchmark of ``cfg.bench``."""
    return run(cfg.bench, run_dir)


def run(cfg: DictConfig, out_dir: Path | str | None = None) -> None:
    out_dir = Path.cwd() if out_dir is None else Path(out_dir)
    if cfg.quick:
        cfg = OmegaConf.merge(cfg, cfg.quick_grid)
    device = _device(cfg.device)
    dtype = _dtype(cfg, device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        torch.manual_seed(cfg.seed)
        _attention_part(cfg, device, dtype, out_dir)
        if cfg.free_tokens.enabled:
            _free_tokens_part(cfg, device, dtype, out_dir)
    finally:
        torch.set_num_threads(threads_before)  # Hydra's local launcher runs several jobs in one process


def sweep_points(cfg: DictConfig) -> list[Point]:
    """``axes``: vary one coordinate at a time around ``center``; ``grid``: the full product."""
    if cfg.sweep == "grid":
        return [Point(*p) for p in itertools.product(cfg.batch_sizes, cfg.prefix_lens, cfg.trees)]
    if cfg.sweep != "axes":
        raise ValueError(f"bench.sweep must be 'axes' or 'grid', got {cfg.sweep!r}")
    c = cfg.center
    points = (
        [Point(c.batch, p, c.tree) for p in cfg.prefix_lens]
        + [Point(c.batch, c.prefix, t) for t in cfg.trees]
        + [Point(b, c.prefix, c.tree) for b in cfg.batch_sizes]
    )
    return list(dict.fromkeys(points))


def largest_tensor_mib(batch: int, heads: DictConfig, prefix: int, nodes: int, dtype: torch.dtype) -> float:
    """The biggest single tensor an implementation may allocate: K repeated to the query heads
    (GQA fallbacks; never smaller than K itself) or a float32 score matrix (unfused kernels)."""
    keys = prefix + nodes
    repeated_kv_bytes = batch * heads.q_heads * keys * heads.head_dim * dtype.itemsize
    score_bytes = batch * heads.q_heads * nodes * keys * 4
    return max(repeated_kv_bytes, score_bytes) / 2**20


def _attention_part(cfg: DictConfig, device: torch.device, dtype: torch.dtype, out_dir: Path) -> None:
    trees = {name: Tree.from_config(cfg.tree_shapes[name]) for name in dict.fromkeys([*cfg.trees, cfg.center.tree])}
    impls = [get(name) for name in cfg.implementations]
    cap_mib = cfg.max_tensor_mib.get(device.type)
    rows = []
    for head_name in cfg.heads:
        heads = cfg.head_shapes[head_name]
        for point in sweep_points(cfg):
            tree = trees[point.tree]
            base = {
                "heads": head_name, **heads, **point._asdict(), "shape": cfg.tree_shapes[point.tree].shape,
                "nodes": tree.num_nodes, "paths": len(tree.paths), "depth": tree.depth,
                "device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            }  # fmt: skip
            size_mib = largest_tensor_mib(point.batch, heads, point.prefix, tree.num_nodes, dtype)
            if cap_mib is not None and size_mib > cap_mib:
                skip = f"skipped: needs a {size_mib:.0f} MiB tensor > max_tensor_mib.{device.type}={cap_mib}"
                rows += [{**base, "impl": impl.name, "status": skip} for impl in impls]
                continue
            rows += _time_point(cfg, impls, base, tree, heads, point, device, dtype)
            console.print(_progress_line(rows[-len(impls) :]))
    _write_csv(out_dir / CSV_NAME, rows, FIELDS)
    names = [impl.name for impl in impls]
    center = {"batch": cfg.center.batch, "prefix": cfg.center.prefix, "tree": cfg.center.tree}
    plots.plot_times(rows, center, names, out_dir)
    plots.plot_speedups(rows, center, names, out_dir)
    console.print(_table(rows, names))


def _time_point(cfg, impls, base, tree, heads, point, device, dtype) -> list[dict]:
    shape_q = (point.batch, heads.q_heads, tree.num_nodes, heads.head_dim)
    shape_kv = (point.batch, heads.kv_heads, point.prefix + tree.num_nodes, heads.head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype)
    k, v = (torch.randn(shape_kv, device=device, dtype=dtype) for _ in range(2))
    # masked_sdpa is the definition in one call; the other outputs are checked against it
    expected = masked_sdpa.attend(q, k, v, tree, point.prefix).float()
    rows = []
    for impl in impls:
        ok, reason = impl.available(device)
        if not ok:
            rows.append({**base, "impl": impl.name, "status": f"skipped: {reason}"})
            continue
        try:
            error = (impl.attend(q, k, v, tree, point.prefix).float() - expected).abs().max().item()
            times = measure(
                lambda: impl.attend(q, k, v, tree, point.prefix), device, cfg.warmup, cfg.repeats, cfg.budget_s
            )
        except Exception as exc:  # one implementation failing on one shape must not lose the sweep
            rows.append({**base, "impl": impl.name, "status": f"failed: {type(exc).__name__}: {exc}".splitlines()[0]})
            continue
        rows.append(
            {
                **base, "impl": impl.name, "status": "ok", "median_ms": statistics.median(times) * 1e3,
                "min_ms": min(times) * 1e3, "repeats": len(times), "max_abs_err": error,
            }
        )  # fmt: skip
    return rows


def _free_tokens_part(cfg: DictConfig, device: torch.device, dtype: torch.dtype, out_dir: Path) -> None:
    ft = cfg.free_tokens
    rows, shape = free_tokens.run(ft, device, dtype, timing=cfg), free_tokens.model_shape(ft)
    fields = ["nodes", "tokens", "prefix", "batch", "median_ms", "min_ms", "repeats", "vs_decode"]
    _write_csv(out_dir / FREE_TOKENS_CSV_NAME, [{**r, "device": str(device), "dtype": str(dtype)} for r in rows],
               [*fields, "device", "dtype"])  # fmt: skip
    title = (
        f"target forward of root + n tree nodes after a {ft.prefix}-token cache, batch {ft.batch} "
        f"(random {shape['num_hidden_layers']}-layer Llama, hidden {shape['hidden_size']}; {device}, "
        f"{str(dtype).removeprefix('torch.')})"
    )
    plots.plot_free_tokens(rows, title, out_dir / "free_tokens.png")
    table = Table(title="free tokens: forward time vs tree nodes (0 = one-token decode)")
    for column in ("nodes", "median ms", "x decode"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["nodes"]), f"{r['median_ms']:.1f}", f"{r['vs_decode']:.2f}")
    console.print(table)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    name = cfg.dtype.get(device.type)
    if name is None:
        raise ValueError(f"bench.dtype has no entry for device type {device.type!r}")
    return getattr(torch, name)


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _progress_line(rows: list[dict]) -> str:
    r = rows[0]
    times = "  ".join(
        f"{x['impl']} {x['median_ms']:.2f} ms" if x["status"] == "ok" else f"{x['impl']} {x['status'].split(':')[0]}"
        for x in rows
    )
    return f"[dim]{r['heads']} B={r['batch']} prefix={r['prefix']} {r['tree']}:[/dim] {times}"


def _table(rows: list[dict], impls: list[str]) -> Table:
    """Median ms per implementation and the best one-pass speedup over sequential, per point."""
    table = Table(title="tree attention: median ms per call (x = speedup of the best over sequential)")
    for column in ("heads", "batch", "prefix", "tree", "nodes/paths", *impls, "best", "x seq", "goal"):
        table.add_column(column, justify="right")
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_point.setdefault((r["heads"], r["batch"], r["prefix"], r["tree"]), {})[r["impl"]] = r
    for (heads, batch, prefix, tree), cells in by_point.items():
        ok = {name: r["median_ms"] for name, r in cells.items() if r["status"] == "ok"}
        one_pass = {name: ms for name, ms in ok.items() if name != "sequential"}
        any_row = next(iter(cells.values()))
        best, speedup = "", ""
        if one_pass and "sequential" in ok:
            best = min(one_pass, key=one_pass.get)
            speedup = f"{ok['sequential'] / one_pass[best]:.1f}"
        times = [f"{ok[name]:.2f}" if name in ok else cells[name]["status"].split(":")[0] for name in impls]
        goal = f"{any_row['paths'] / 2:g}"
        table.add_row(heads, str(batch), str(prefix), tree, f"{any_row['nodes']}/{any_row['paths']}", *times,
                      best, speedup, goal)  # fmt: skip
    return table
