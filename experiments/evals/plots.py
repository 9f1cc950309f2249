"""PNG plots of a long-context evaluation: perplexity vs length, NLL by position, passkey heatmap.

The figure saving, perplexity-vs-length axes and accuracy heatmap here are shared with the sweep
report's plots (experiments/sweeps/report.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def save(fig: Any, path: Path) -> Path:
    """Lay the figure out, write it to `path` as PNG and close it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ppl_axes(ax: Any, train_len: Optional[int]) -> None:
    """Finish a perplexity-vs-length chart: log2 lengths, log perplexity, a dashed line at the training length."""
    if train_len:
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"train length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs length")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def accuracy_heatmap(
    ax: Any, grid: Sequence[Sequence[Optional[float]]], columns: Sequence[str], rows: Sequence[str]
) -> Any:
    """Draw accuracies grid[row][column] in [0, 1] (None: not measured) with each cell's value and the tick
    labels; returns the image, for a colorbar."""
    data = [[math.nan if v is None else v for v in row] for row in grid]
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    for r, row in enumerate(grid):
        for c, v in enumerate(row):
            if v is not None:
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black", fontsize=8)
    return image


def plot_perplexity(by_setting: dict[str, dict[str, Any]], train_len: int, path: Path) -> None:
    """Perplexity vs length, one line per temperature setting; a dashed line marks the training length."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ppl in by_setting.items():
        ax.plot(ppl["lengths"], ppl["ppl"], marker="o", label=label)
    ppl_axes(ax, train_len)
    save(fig, path)


def plot_position_nll(perplexity: dict[str, Any], path: Path) -> None:
    """NLL by position bucket at the longest length: where extrapolation breaks."""
    buckets = perplexity["buckets"][-1]
    edges = [b["start"] for b in buckets] + [buckets[-1]["end"]]
    values = [b["nll"] for b in buckets]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(edges, values + values[-1:], where="post")  # each bucket's NLL drawn across its positions
    ax.set_xscale("symlog", base=2, linthresh=max(1, buckets[0]["end"]))
    ax.set_xlabel("position")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(f"NLL by position at length {perplexity['lengths'][-1]}")
    save(fig, path)


def plot_passkey(passkey: dict[str, Any], path: Path) -> None:
    """Passkey accuracy heatmap: lengths (x) by depth of the key (y)."""
    lengths, depths = passkey["lengths"], passkey["depths"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    by_depth = list(zip(*passkey["grid"]))  # grid is [lengths][depths]; rows here are depths
    image = accuracy_heatmap(ax, by_depth, [str(n) for n in lengths], [f"{d:g}" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"Passkey accuracy ({passkey['trials']} trials per cell)")
    fig.colorbar(image, ax=ax)
    save(fig, path)
