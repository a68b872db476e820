"""PNG plots of the tree-attention benchmark rows (see `benchmark.FIELDS`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

# sweep axis -> (x column, x label); along one axis the other two coordinates stay at the center
AXES = {
    "prefix": ("prefix", "prefix length (tokens)"),
    "tree": ("nodes", "tree size (nodes)"),
    "batch": ("batch", "batch size"),
}
FIXED = {"prefix": ("batch", "tree"), "tree": ("batch", "prefix"), "batch": ("prefix", "tree")}


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def _along(rows: list[dict], axis: str, center: dict) -> list[dict]:
    """Rows where every coordinate but ``axis`` sits at the center, sorted along ``axis``."""
    picked = [r for r in rows if all(r[key] == center[key] for key in FIXED[axis])]
    return sorted(picked, key=lambda r: r[AXES[axis][0]])


def _speedups(rows: list[dict]) -> list[dict]:
    """Rows of the non-sequential implementations with `speedup` = sequential time / own time."""
    sequential = {_point(r): r["median_ms"] for r in rows if r["impl"] == "sequential"}
    return [
        {**r, "speedup": sequential[_point(r)] / r["median_ms"]}
        for r in rows
        if r["impl"] != "sequential" and _point(r) in sequential
    ]


def _point(row: dict) -> tuple:
    return row["heads"], row["batch"], row["prefix"], row["tree"]


def _lines(ax, rows: list[dict], x: str, y: str, impls: list[str], colors: dict) -> None:
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl]
        chains = [r for r in mine if r["shape"] == "chain"]
        branching = [r for r in mine if r["shape"] != "chain"]
        # chains (one path) and branching trees behave differently: separate lines
        for line, style, label in ((chains, "o--", f"{impl} (chains)" if branching else impl), (branching, "s-", impl)):
            if line:
                ax.plot([r[x] for r in line], [r[y] for r in line], style, color=colors[impl], label=label, ms=4)


def plot_times(rows: list[dict], center: dict, impls: list[str], out_dir: Path) -> list[Path]:
    """One PNG per axis: median time per call, one panel per head config."""
    rows = _ok(rows)
    heads = list(dict.fromkeys(r["heads"] for r in rows))
    colors = _colors(impls)
    written = []
    for axis, (x, label) in AXES.items():
        fig, panels = plt.subplots(1, len(heads), figsize=(5.5 * len(heads), 4.2), squeeze=False)
        for ax, head in zip(panels[0], heads):
            _lines(ax, _along([r for r in rows if r["heads"] == head], axis, center), x, "median_ms", impls, colors)
            ax.set(yscale="log", xlabel=label, ylabel="median time per call (ms)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{head}: {_fixed_text(axis, center)}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"tree attention time vs {label}", fontsize=11)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"time_vs_{axis}.png"))
    return written


def plot_speedups(rows: list[dict], center: dict, impls: list[str], out_dir: Path) -> Path:
    """Speedup over `sequential` along each axis (columns) for each head config (rows)."""
    rows = _speedups(_ok(rows))
    heads = list(dict.fromkeys(r["heads"] for r in rows))
    colors = _colors(impls)
    one_pass = [i for i in impls if i != "sequential"]
    fig, panels = plt.subplots(len(heads), len(AXES), figsize=(15, 3.8 * len(heads)), squeeze=False)
    for row_panels, head in zip(panels, heads):
        for ax, (axis, (x, label)) in zip(row_panels, AXES.items()):
            along = _along([r for r in rows if r["heads"] == head], axis, center)
            _lines(ax, along, x, "speedup", one_pass, colors)
            goal = sorted({(r[x], r["paths"] / 2) for r in along})
            if goal:
                ax.plot(*zip(*goal), "x", color="gray", ms=7, label="goal: paths / 2")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set(yscale="log", xlabel=label, ylabel="speedup over sequential (x)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{head}: {_fixed_text(axis, center)}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("one-pass tree attention: speedup over one call per path", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir / "speedup_over_sequential.png")


def plot_free_tokens(rows: list[dict], title: str, out_path: Path) -> Path:
    """Forward time vs tree size, and the same as a multiple of a one-token decode step."""
    nodes = [r["nodes"] for r in rows]
    fig, (time_ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    time_ax.plot(nodes, [r["median_ms"] for r in rows], "o-", ms=3)
    time_ax.axhline(rows[0]["median_ms"], color="gray", ls="--", label="one-token decode")
    time_ax.set(xlabel="tree nodes after the root (0 = decode step)", ylabel="target forward (ms)", ylim=(0, None))
    ratio_ax.plot(nodes, [r["vs_decode"] for r in rows], "o-", ms=3, color="C1")
    ratio_ax.axhline(1.0, color="gray", ls="--")
    ratio_ax.set(xlabel="tree nodes after the root (0 = decode step)", ylabel="forward time / decode-step time")
    for ax in (time_ax, ratio_ax):
        ax.grid(True, alpha=0.3)
    time_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


def _fixed_text(axis: str, center: dict) -> str:
    return ", ".join(f"{key} {center[key]}" for key in FIXED[axis])


def _colors(impls: list[str]) -> dict:
    return {impl: f"C{i}" for i, impl in enumerate(impls)}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
