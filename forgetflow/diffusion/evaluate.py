"""Metrics of a model version, judged by the CNN judge, and before/after sample grids.

For forget pairs (c_f, c_o), over samples conditioned on c_f (pooled over the forget classes):
    unlearning_accuracy = 1 - P(judge says c_f)       override_fidelity = P(judge says c_o)
    attacks.forget      = P(judge says c_f) as a record with n and exact bounds (forgetflow/stats.py)
    forget_confidence   = mean_x max_k p(k | x)       forget_fd = FD(samples, real test c_o)
(a random override, c_o = RANDOM_OVERRIDE, is met by any remaining class, and its forget_fd is
taken against real test digits of every remaining class)
Over the remaining classes R (all classes minus the request's and the card's forget classes):
    remaining_class_accuracy = mean_{c in R} P(judge says c | sample of c)
    remaining_fd   = FD(samples of R, real TEST digits of R)
    real_fd_floor  = FD(real train digits of R, real test digits of R)
seconds_per_1000_samples is the wall-clock of drawing those metric samples, per 1000.
"P(judge says k)" is the fraction of samples whose argmax is k. FD is the Frechet distance
of the judge's penultimate features:
    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from forgetflow.compute import resolve_device
from forgetflow.config import Params
from forgetflow.diffusion.artifact import load_card, load_version
from forgetflow.diffusion.data import load_digits_split
from forgetflow.diffusion.judge import load_judge
from forgetflow.diffusion.sample_cache import sample_classes
from forgetflow.diffusion.sampling import nfe, sample
from forgetflow.diffusion.sfd import RANDOM_OVERRIDE
from forgetflow.stats import rate_record


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (eigen-based:
    stable for rank-deficient covariances)."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def evaluate_version(
    version_dir: Path,
    judge_dir: Path,
    forget_pairs: list[tuple[int, int]],
    params: Params,
    *,
    seed: int,
    guidance_scale: float | None = None,
    device: torch.device | None = None,
    samples_scale: float = 1.0,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> dict:
    """All metrics of one version (see the module docstring); forget metrics are None when
    forget_pairs is empty. samples_scale scales the sample counts (calibration uses fewer).
    Samples are drawn class by class (forgetflow/diffusion/sample_cache.py), a multi-step
    version's kept in cache_dir when one is given."""
    ev = params.diffusion.evaluate
    device = device or resolve_device(params.compute)
    version = load_version(version_dir, device)
    judge = load_judge(judge_dir, device)
    card = version.card
    pairs = {int(f): int(o) for f, o in forget_pairs}
    forgotten = set(pairs) | {f for f, _ in card.forgotten_pairs}
    remaining = [c for c in range(card.num_classes) if c not in forgotten]

    n_remaining = max(1, round(ev.samples_per_remaining_class * samples_scale))
    n_forget = math.ceil(max(1, round(ev.forget_samples * samples_scale)) / max(1, len(pairs)))
    counts = {c: n_forget if c in pairs else n_remaining for c in range(card.num_classes)}
    w = card.guidance_scale if guidance_scale is None else float(guidance_scale)
    # the sampling speed is timed on the metric samples themselves (no second sampling run)
    images, labels, seconds = sample_classes(version, version_dir, counts, seed=seed, guidance_scale=w,
                                             params=params, device=device, cache_dir=cache_dir, progress=progress)
    seconds_per_1000 = seconds * 1000.0 / len(labels)
    said = judge.predict_proba(images).argmax(dim=1)
    feats = judge.features(images)
    per_class = {str(c): (said[labels == c] == c).float().mean().item() for c in range(card.num_classes)}

    test_images, test_labels = load_digits_split("test", card.image_size)
    train_images, train_labels = load_digits_split("train", card.image_size)
    test_feats, train_feats = judge.features(test_images), judge.features(train_images)
    remaining_t = torch.tensor(remaining)
    keep_test, keep_train = torch.isin(test_labels, remaining_t), torch.isin(train_labels, remaining_t)
    keep_gen = torch.isin(labels, remaining_t)

    metrics = {
        "kind": card.kind,
        "unlearning_accuracy": None,
        "override_fidelity": None,
        "forget_confidence": None,
        "forget_fd": None,
        "remaining_class_accuracy": float(np.mean([per_class[str(c)] for c in remaining])),
        "per_class_accuracy": per_class,
        "remaining_fd": frechet_distance(feats[keep_gen], test_feats[keep_test]),
        "real_fd_floor": frechet_distance(train_feats[keep_train], test_feats[keep_test]),
        "samples": {"per_forget_class": n_forget if pairs else 0, "per_remaining_class": n_remaining},
    }
    if pairs:
        is_forget = torch.isin(labels, torch.tensor(list(pairs)))
        override = torch.tensor([pairs.get(int(c), -2) for c in labels])
        # a random override is met by any remaining class; its FD reference is every remaining class
        wanted = torch.where(override == RANDOM_OVERRIDE, torch.isin(said, remaining_t), said == override)
        probs = judge.predict_proba(images[is_forget])
        targets = {o for o in pairs.values() if o != RANDOM_OVERRIDE} | (set(remaining) if RANDOM_OVERRIDE in pairs.values() else set())
        real_override = torch.isin(test_labels, torch.tensor(sorted(targets)))
        judged_forgotten = int((said[is_forget] == labels[is_forget]).sum())
        metrics.update(
            random_override=RANDOM_OVERRIDE in pairs.values(),
            attacks={"forget": rate_record(judged_forgotten, int(is_forget.sum()))},
            unlearning_accuracy=1.0 - judged_forgotten / int(is_forget.sum()),
            override_fidelity=wanted[is_forget].float().mean().item(),
            forget_confidence=probs.max(dim=1).values.mean().item(),
            forget_fd=frechet_distance(feats[is_forget], test_feats[real_override]),
        )
    metrics.update(
        seconds_per_1000_samples=seconds_per_1000,
        nfe=nfe(version, guidance_scale, params),
        guidance_scale=w,
    )
    return metrics


def _to_uint8(images: Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()


def sample_grid(version_dir: Path, params: Params, *, seed: int, per_class: int = 8,
                guidance_scale: float | None = None, device: torch.device | None = None,
                prompts: list[str] | None = None) -> Image.Image:
    """A greyscale grid: row c holds `per_class` samples conditioned on class c (a prompt
    model: on prompts[c])."""
    device = device or resolve_device(params.compute)
    version = load_version(version_dir, device)
    conditioning = version.conditioning(prompts) if prompts is not None else None
    k, size = (len(prompts) if prompts is not None else version.card.num_classes), version.card.image_size
    labels = torch.arange(k).repeat_interleave(per_class)
    pixels = _to_uint8(sample(version, labels, seed=seed, guidance_scale=guidance_scale, conditioning=conditioning,
                              params=params, device=device))
    grid = np.zeros((k * (size + 1) + 1, per_class * (size + 1) + 1), dtype=np.uint8)
    for i, image in enumerate(pixels):
        row, col = divmod(i, per_class)
        grid[1 + row * (size + 1): (row + 1) * (size + 1), 1 + col * (size + 1): (col + 1) * (size + 1)] = image[0]
    return Image.fromarray(grid, mode="L")


def _describe(version_dir: Path) -> str:
    card = load_card(version_dir)
    forgotten = ", ".join(f"{f}->{'random' if o == RANDOM_OVERRIDE else o}" for f, o in card.forgotten_pairs)
    concepts = [f"#{r['concept']}->{r['override']}" for r in card.forgotten if "concept" in r]  # salted hashes
    forgotten = forgotten or ", ".join(concepts) or "nothing"
    return f"{card.kind} ({card.method or 'base'}), w={card.guidance_scale:g}, forgot {forgotten}"


def save_comparison_grid(base_dir: Path, new_dir: Path, out_png: Path, params: Params, seed: int,
                         prompts: dict[str, str] | None = None) -> Path:
    """One PNG: base version's grid beside the new version's (rows = classes, or `prompts`,
    {prompt: its row label})."""
    rows = list(prompts.values()) if prompts is not None else [str(c) for c in range(params.diffusion.model.num_classes)]
    fig = Figure(figsize=(8, 5.5), dpi=150)
    for ax, directory, title in zip(fig.subplots(1, 2), (base_dir, new_dir), ("before", "after")):
        grid = sample_grid(directory, params, seed=seed, prompts=list(prompts) if prompts is not None else None)
        ax.imshow(np.asarray(grid), cmap="gray", interpolation="nearest")
        ax.set_title(f"{title}: {_describe(directory)}", fontsize=7)
        cell = grid.height / len(rows)
        ax.set_yticks([cell * (c + 0.5) for c in range(len(rows))])
        ax.set_yticklabels(rows, fontsize=5 if prompts is not None else None)
        ax.set_xticks([])
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png
