"""Session fixtures of the diffusion tests (imported explicitly by the test modules).

Trained artifacts are built once per pytest session (tests/session_cache.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from forgetflow.config import Params, load_params
from forgetflow.diffusion.artifact import DiffusionVersion, ModelCard, new_scheduler, new_unet, save_version
from forgetflow.diffusion.judge import train_judge
from forgetflow.diffusion.text_model import train_text_teacher
from forgetflow.diffusion.train_base import train_teacher
from tests.session_cache import built_once


def with_overrides(params: Params, **sections: dict) -> Params:
    """A copy of `params` with fields of diffusion sections replaced, e.g. sfd={"iterations": 4}."""
    diffusion = params.diffusion.model_copy(
        update={name: getattr(params.diffusion, name).model_copy(update=fields) for name, fields in sections.items()}
    )
    return params.model_copy(update={"diffusion": diffusion})


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return load_params(preset="tiny")


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory, tiny_params) -> Path:
    return built_once(tmp_path_factory, "diffusion-judge", lambda d: train_judge(tiny_params, d, progress=False))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_params) -> Path:
    """The class-conditional teacher of the `tiny` preset (about 2.5 minutes on 2 CPU cores)."""
    return built_once(tmp_path_factory, "diffusion-teacher", lambda d: train_teacher(tiny_params, d, progress=False))


@pytest.fixture(scope="session")
def untrained_version(tmp_path_factory, tiny_params) -> Path:
    """A "ddpm" version with freshly initialised weights: for format, sampler and loop tests."""
    model = tiny_params.diffusion.model

    def build(directory: Path) -> None:
        card = ModelCard(kind="ddpm", num_classes=model.num_classes, null_class=model.num_classes,
                         image_size=model.image_size, guidance_scale=2.0,
                         class_names=[str(c) for c in range(model.num_classes)])
        save_version(directory, DiffusionVersion(new_unet(model), None, new_scheduler(model), card))

    return built_once(tmp_path_factory, "diffusion-untrained", build)


@pytest.fixture(scope="session")
def t2i_teacher(tmp_path_factory, tiny_params) -> Path:
    """The captioned-digits text-to-image model of the `tiny` preset."""
    return built_once(tmp_path_factory, "t2i-teacher", lambda d: train_text_teacher(tiny_params, d, progress=False))


@pytest.fixture(scope="session")
def t2i_judge_dir(tmp_path_factory, tiny_params) -> Path:
    """The judge of both stroke styles, classes named by the digit words (the model's concepts)."""
    return built_once(tmp_path_factory, "t2i-judge",
                      lambda d: train_judge(tiny_params, d, progress=False, captioned=True))
