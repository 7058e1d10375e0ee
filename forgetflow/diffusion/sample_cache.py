"""Evaluation samples drawn condition by condition (a class, or a prompt of a text-to-image
model), those of multi-step versions kept on disk.

A condition's n samples come from noise seeded by the evaluation seed and the condition alone
(class c: seed * K + c; a prompt: evaluate_prompts.prompt_seed), so they do not depend on
which other conditions a request asks about. Drawing one image from a "ddpm" teacher
costs sampler.num_inference_steps network evaluations (twice that under guidance), and every
request of a lineage evaluates the same teacher on the same seeds (calibrate's reference,
evaluate's base or reference): those images are drawn once per

    (SHA-256 of the score net, text encoder, tokenizer, vae and scheduler files, condition,
     count, noise seed, guidance scale, sampler, device, precision)

and read back after. A one-step generator draws in one evaluation and is never cached. An
entry keeps the seconds its drawing took, so the sampling-speed gate still compares measured
times. Entries are written under a temporary name and renamed (concurrent runs never read a
half-written file); a corrupt entry is drawn again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from forgetflow.certificate import sha256_file, tree_hash
from forgetflow.config import Params
from forgetflow.diffusion.artifact import (SCHEDULER_DIR, SCORE_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR, UNET_DIR,
                                           VAE_DIR, DiffusionVersion)
from forgetflow.diffusion.sampling import draw_noise, sample_from_noise


def class_seed(seed: int, cls: int, num_classes: int) -> int:
    return seed * num_classes + cls


SAMPLING_DIRS = (SCORE_DIR, UNET_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR, VAE_DIR, SCHEDULER_DIR)


def sampling_identity(version_dir: Path) -> str:
    """SHA-256 of what a DDPM's samples depend on: its score net (with, for a text-to-image
    model, its text encoder, tokenizer and vae) and scheduler files; not the card or other
    files, so the lineage's copy in a one-step version's teacher/ and the registered original
    are the same teacher."""
    root = Path(version_dir)
    files = sorted(p for d in SAMPLING_DIRS for p in (root / d).rglob("*") if p.is_file())
    return tree_hash({p.relative_to(root).as_posix(): sha256_file(p) for p in files})


class SampleCache:
    def __init__(self, directory: Path, version_dir: Path, version: DiffusionVersion, params: Params,
                 device: torch.device):
        self.directory = Path(directory)
        self._identity = {
            "weights": sampling_identity(version_dir),
            "sampler": params.diffusion.sampler.num_inference_steps,
            "device": device.type,
            "precision": params.compute.mixed_precision if device.type == "cuda" else "fp32",
        }

    def path(self, condition: int | str, n: int, noise_seed: int, guidance_scale: float) -> Path:
        """The entry's file; its name is a hash, so a prompt's text never appears on disk."""
        key = json.dumps({**self._identity, "condition": condition, "n": n, "seed": noise_seed, "w": guidance_scale},
                         sort_keys=True)
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"

    def get(self, path: Path) -> tuple[Tensor, float] | None:
        try:
            entry = torch.load(path, weights_only=True)
            return entry["images"], float(entry["seconds"])
        except (OSError, RuntimeError, KeyError, EOFError):  # absent, or half a file from a killed run
            return None

    def put(self, path: Path, images: Tensor, seconds: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"images": images, "seconds": seconds}, tmp)
        os.replace(tmp, path)


def sample_conditions(
    version: DiffusionVersion,
    version_dir: Path,
    counts: dict,
    *,
    noise_seed: Callable[[int | str], int],
    guidance_scale: float,
    params: Params,
    device: torch.device,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[dict, dict]:
    """({condition: images}, {condition: seconds spent drawing them}) for counts[c] samples of
    each condition c (class labels, or prompts for a text-to-image model), c's noise seeded by
    noise_seed(c). The conditions not in the cache are drawn in one batched sampler call."""
    prompts = version.card.conditioning == "prompt"
    cache = (SampleCache(cache_dir, version_dir, version, params, device)
             if cache_dir is not None and version.card.kind != "one-step" else None)
    seeds = {c: noise_seed(c) for c in counts}
    images: dict = {}
    seconds: dict = {}  # per condition; a batched drawing's time is shared by sample count
    for c, n in counts.items():
        hit = cache.get(cache.path(c, n, seeds[c], guidance_scale)) if cache else None
        if hit is not None:
            images[c], seconds[c] = hit
    if missing := [c for c in counts if c not in images]:
        z = torch.cat([draw_noise(counts[c], version.sample_shape, seeds[c]) for c in missing])
        ids = [i if prompts else c for i, c in enumerate(missing)]  # a prompt's row of the conditioning table
        labels = torch.cat([torch.full((counts[c],), j, dtype=torch.long) for c, j in zip(missing, ids)])
        start = time.perf_counter()
        drawn = sample_from_noise(version, z, labels, guidance_scale=guidance_scale, params=params, device=device,
                                  conditioning=version.conditioning(missing) if prompts else None, progress=progress)
        spent = time.perf_counter() - start
        for c, part in zip(missing, drawn.split([counts[c] for c in missing])):
            images[c], seconds[c] = part.clone(), spent * counts[c] / len(labels)  # clone: a view would save all
            if cache:
                cache.put(cache.path(c, counts[c], seeds[c], guidance_scale), part, seconds[c])
    return images, seconds


def sample_classes(
    version: DiffusionVersion,
    version_dir: Path,
    counts: dict[int, int],
    *,
    seed: int,
    guidance_scale: float,
    params: Params,
    device: torch.device,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, float]:
    """(images, labels, seconds spent drawing them) for counts[c] samples of each class c, in
    class order (sample_conditions)."""
    k = version.card.num_classes
    images, seconds = sample_conditions(version, version_dir, counts, noise_seed=lambda c: class_seed(seed, c, k),
                                        guidance_scale=guidance_scale, params=params, device=device,
                                        cache_dir=cache_dir, progress=progress)
    order = sorted(counts)
    labels = torch.cat([torch.full((counts[c],), c, dtype=torch.long) for c in order])
    return torch.cat([images[c] for c in order]), labels, sum(seconds[c] for c in order)
