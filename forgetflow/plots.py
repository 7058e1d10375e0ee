"""Figures of a report: the guidance calibration curve and the base-vs-new metric bars."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_guidance_curve(curve: list[dict], chosen: float, out: Path) -> Path:
    """Every numeric column of the calibration sweep against the guidance scale."""
    scales = [row["guidance_scale"] for row in curve]
    keys = [k for k, v in curve[0].items() if k not in ("guidance_scale", "passed") and isinstance(v, (int, float))]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(scales, [row[key] for row in curve], "o-")
        ax.axvline(chosen, color="tab:green", ls="--", lw=1)
        ax.set_title(key.replace("_", " "), fontsize=9)
        ax.set_xlabel("guidance scale")
    fig.suptitle(f"guidance calibration (chosen {chosen:g}, green)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_metric_bars(metrics: dict, keys: list[str], out: Path) -> Path:
    """Base vs new for the headline metrics of the family."""
    keys = [k for k in keys if isinstance(metrics["base"].get(k), (int, float))]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [metrics["base"][key], metrics["new"][key]]
        ax.bar(["base", "new"], values, color=["tab:gray", "tab:blue"])
        ax.set_title(key.replace("_", " "), fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def save_image_grid(images, rows: int, out: Path) -> Path:
    """Images [N, C, H, W] in [-1, 1] as a grid of `rows` rows (one per label)."""
    import numpy as np

    images = np.asarray(images)
    cols = len(images) // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.imshow((images[i, 0] + 1) / 2, cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    fig.tight_layout(pad=0.1)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
