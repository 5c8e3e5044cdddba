"""PNG pictures of benchmark and evaluation results (``--plot DIR``).

matplotlib is an optional extra (``pip install 'streamrecall[devtools]'``; ``make`` installs it):
the figures are for people reading docs/benchmarks.md, not for the roles, so the runtime does
not pull it in. Every function takes plain data and a path and writes one PNG with the
non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import click
import numpy as np


def plot_option(f: Any) -> Any:
    """``--plot DIR``: also write the run's pictures as PNG files into DIR."""
    return click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Also write PNG pictures of the results into this directory (needs matplotlib: "
                             "pip install 'streamrecall[devtools]').")(f)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install 'streamrecall[devtools]' (make setup installs it)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def cdf(path: Path, series: Mapping[str, Sequence[float]], *, title: str, xlabel: str,
        target: float | None = None) -> Path | None:
    """Empirical CDFs of latencies (seconds), one line per series, with the p99 marked."""
    series = {name: values for name, values in series.items() if len(values)}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in series.items():
        x = np.sort(np.asarray(values, dtype=float))
        y = np.arange(1, len(x) + 1) / len(x)
        p99 = float(np.percentile(x, 99))
        ax.plot(x, y, label=f"{name} (n={len(x):,}, p99 {p99:.3f} s)")
    if target is not None:
        ax.axvline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g} s")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set(title=title, xlabel=xlabel, ylabel="share of events", ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def recall_vs_qps(path: Path, points: Sequence[Mapping[str, float]], *, title: str) -> Path | None:
    """recall@10 against queries/s over ef, ours and raw hnswlib (keys ef, recall, qps, raw_recall, raw_qps)."""
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for prefix, label, marker in (("", "ItemIndex.query", "o"), ("raw_", "raw hnswlib knn_query", "s")):
        xs = [p[f"{prefix}qps"] for p in points]
        ys = [p[f"{prefix}recall"] for p in points]
        ax.plot(xs, ys, marker=marker, label=label)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"ef={int(p['ef'])}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(title=title, xlabel="single queries/s (k=100, one thread)", ylabel="recall@10 vs exact search")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def per_chunk(path: Path, series: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
              xlabel: str = "test chunk (in time order)") -> Path | None:
    """One line per recommender: a figure (e.g. HR@K) in each evaluation chunk."""
    series = {name: values for name, values in series.items() if len(values)}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=f"{name} (mean {np.mean(values):.3f})", linewidth=1.2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    return _save(fig, path)


def over_time(path: Path, t: Sequence[float], series: Mapping[str, Sequence[float]], *, title: str,
              ylabel: str, xlabel: str = "seconds since the start") -> Path | None:
    """Time series (e.g. latency or staleness over a run), one line per series, same time axis."""
    if not len(t):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, values in series.items():
        ax.plot(t, values, label=name, linewidth=1.0)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
