"""Registry of diffusion unlearning methods.

A method is a class with a `name` and a classmethod
    unlearn(base_dir, out_dir, forget_pairs, params, *, device, checkpoints, progress) -> Path
that writes a new model version directory (artifact.py format). SFD, its two-stage variant and
plain SiD (the distillation baseline, which forgets nothing) are data-free; ESD-style
fine-tuning uses real digits. Retrain, the gold standard, is the teacher's own recipe without
the class (train_base.train_teacher; `forgetflow bench` runs it).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol

import torch

from forgetflow.checkpoints import CheckpointSink
from forgetflow.config import Params
from forgetflow.diffusion.esd import ESD
from forgetflow.diffusion.sfd import SFD_VARIANTS


class DiffusionMethod(Protocol):
    name: ClassVar[str]

    @classmethod
    def unlearn(cls, base_dir: Path, out_dir: Path, forget_pairs: list[tuple[int, int]], params: Params,
                *, device: torch.device | None = None, checkpoints: CheckpointSink | None = None,
                progress: bool = True) -> Path: ...


DIFFUSION_METHODS: dict[str, type] = {**SFD_VARIANTS, ESD.name: ESD}


def get_method(name: str) -> type:
    try:
        return DIFFUSION_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown diffusion unlearning method {name!r}; known: {sorted(DIFFUSION_METHODS)}") from None
