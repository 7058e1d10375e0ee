"""Figures of a report: the guidance calibration curve and the base-vs-new metric bars."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_guidance_curve(curve: list[dict], chosen: float, out: Path) -> Path:
    """Every numeric column of the calibration sweep against the guidance scale, one line
    per guidance space where the sweep has several (LLM: log and prob); a scale whose row
    failed a gate (`passed` False) is drawn as a red x, so the chosen scale reads as the
    smallest circle."""
    skip = {"guidance_scale", "passed", "worst_margin"}
    keys = [k for k, v in curve[0].items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
    spaces = sorted({row.get("guidance_space", "") for row in curve})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for space in spaces:
            rows = [r for r in curve if r.get("guidance_space", "") in (space, curve[0].get("guidance_space", ""))
                    and (r.get("guidance_space", "") == space or r["guidance_scale"] == 1.0)]
            rows = sorted({r["guidance_scale"]: r for r in rows}.values(), key=lambda r: r["guidance_scale"])
            xs = [r["guidance_scale"] for r in rows]
            ys = [r[key] if r[key] is not None else float("nan") for r in rows]
            line, = ax.plot(xs, ys, "-", label=space or None)
            failed = [r.get("passed") is False for r in rows]
            ax.scatter([x for x, f in zip(xs, failed) if not f], [y for y, f in zip(ys, failed) if not f],
                       marker="o", color=line.get_color(), zorder=3)
            ax.scatter([x for x, f in zip(xs, failed) if f], [y for y, f in zip(ys, failed) if f],
                       marker="x", color="tab:red", zorder=3)
        ax.axvline(chosen, color="tab:green", ls="--", lw=1)
        ax.set_title(key.replace("_", " "), fontsize=9)
        ax.set_xlabel("guidance scale")
        if len(spaces) > 1:
            ax.legend(fontsize=7, title="space", title_fontsize=7)
    fig.suptitle(f"guidance calibration: chosen {chosen:g} (green line); o every gate passes, red x a gate fails",
                 fontsize=10)
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
    """Images [N, C, H, W] in [-1, 1] (C 1: grey, 3: RGB) as a grid of `rows` rows (one per
    label or prompt)."""
    import numpy as np

    images = np.asarray(images)
    cols = len(images) // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        pixels = ((images[i] + 1) / 2).clip(0, 1)
        if pixels.shape[0] == 3:
            ax.imshow(pixels.transpose(1, 2, 0))
        else:
            ax.imshow(pixels[0], cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    fig.tight_layout(pad=0.1)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_leak_by_attack(metrics: dict, out: Path) -> Path:
    """LLM family: leak rate of the forgotten subjects' values per attack, base vs new
    (with the control-phrase-only baseline where measured)."""
    attacks = list(metrics["base"]["leak_rate_by_attack"])
    series = [("base", metrics["base"]["leak_rate_by_attack"], "tab:gray")]
    control = metrics["base"].get("control_phrase")
    if control:
        series.append(("control phrase only", control["leak_rate_by_attack"], "tab:orange"))
    series.append(("new (served)", metrics["new"]["leak_rate_by_attack"], "tab:blue"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for i, (label, values, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(attacks))]
        ax.bar(xs, [values[a] for a in attacks], width, label=label, color=color)
    ax.set_xticks(range(len(attacks)), [a.replace("_", " ") for a in attacks], fontsize=8)
    ax.set_ylabel("leak rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("forgotten values emitted, by attack", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
