"""PNG plots of a long-context evaluation: perplexity vs length, NLL by position, passkey heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_perplexity(by_setting: dict[str, dict[str, Any]], train_len: int, path: Path) -> None:
    """Perplexity vs length, one line per temperature setting; a dashed line marks the training length."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ppl in by_setting.items():
        ax.plot(ppl["lengths"], ppl["ppl"], marker="o", label=label)
    ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"train length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(passkey: dict[str, Any], path: Path) -> None:
    """Passkey accuracy heatmap: lengths (x) by depth of the key (y)."""
    grid = passkey["grid"]  # [lengths][depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(passkey["lengths"]), 1.2 + 0.5 * len(passkey["depths"])))
    image = ax.imshow(list(zip(*grid)), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
    ax.set_xticks(range(len(passkey["lengths"])), [str(n) for n in passkey["lengths"]])
    ax.set_yticks(range(len(passkey["depths"])), [f"{d:g}" for d in passkey["depths"]])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            color = "white" if value < 0.5 else "black"
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"Passkey accuracy ({passkey['trials']} trials per cell)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
