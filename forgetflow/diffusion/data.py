"""The digits data set (sklearn `load_digits`, bundled: no download).

A fixed stratified split: TEST_FRACTION of every class is held out with SPLIT_SEED, so the
teacher, the judge and every evaluation see the same train / test images. The 8x8 images
(grey levels 0..16) are upsampled bilinearly to `image_size` and scaled to [-1, 1].
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

TEST_FRACTION = 0.2  # the split is part of the data set's definition, not a hyperparameter
SPLIT_SEED = 0
_MAX_GREY = 16.0  # load_digits grey levels are 0..16


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    labels = load_digits().target
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def load_digits_split(split: Literal["train", "test"], image_size: int) -> tuple[Tensor, Tensor]:
    """Images [N, 1, image_size, image_size] float32 in [-1, 1] and labels [N] int64."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    idx = _split_indices()[split]
    images = torch.from_numpy(digits.images[idx]).float().unsqueeze(1) / _MAX_GREY
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0)
    return images.contiguous(), torch.from_numpy(digits.target[idx]).long()
