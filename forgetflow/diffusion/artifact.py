"""On-disk format of one diffusion model version (a directory).

    score/            diffusers UNet2DModel (safetensors): eps-prediction score net,
                      num_class_embeds = num_classes + 1, null class = num_classes (CFG)
    generator/        optional UNet2DModel, same architecture: SFD's one-step generator (EMA)
    scheduler/        DDPMScheduler config
    model_card.json   ModelCard
    teacher/          one-step versions only: the lineage's pretrained DDPM version (score/,
                      scheduler/, model_card.json), the teacher it was distilled from

After SFD the version's `score/` is the trained fake score net f_psi (it tracks the unlearned
generator's distribution) and `generator/` the EMA generator G_theta. A later request
distils again from `teacher/` (never from a fake score net: measured here, a chained request
taught by the previous f_psi drew remaining digits at 2.3x the FD of its base) and starts
G_theta and f_psi from this version's; `teacher/` is also the reference every version of the
lineage is gated against (its quality and its sampling speed).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from forgetflow.config import DiffusionModelParams
from forgetflow.families import ArtifactError

CARD_FILE = "model_card.json"
SCORE_DIR = "score"
GENERATOR_DIR = "generator"
SCHEDULER_DIR = "scheduler"
TEACHER_DIR = "teacher"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass
class ModelCard:
    """What a version is and what it has forgotten (model_card.json)."""

    kind: str  # "ddpm" (sampled with DDIM) | "one-step" (SFD generator)
    num_classes: int
    null_class: int
    image_size: int
    guidance_scale: float
    class_names: list[str]
    t_init: int | None = None
    sigma_init: float | None = None
    forgotten: list[dict] = field(default_factory=list)  # [{"forget_class", "override_class"}]
    method: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    family: str = "diffusion"

    @property
    def forgotten_pairs(self) -> list[tuple[int, int]]:
        return [(int(p["forget_class"]), int(p["override_class"])) for p in self.forgotten]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        return cls(**data)


@dataclass
class DiffusionVersion:
    score: UNet2DModel
    generator: UNet2DModel | None
    scheduler: DDPMScheduler
    card: ModelCard


def new_unet(model: DiffusionModelParams) -> UNet2DModel:
    """The score-net architecture: class-conditional UNet2DModel without attention blocks."""
    n_blocks = len(model.block_out_channels)
    return UNet2DModel(
        sample_size=model.image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(model.block_out_channels),
        layers_per_block=model.layers_per_block,
        down_block_types=("DownBlock2D",) * n_blocks,
        up_block_types=("UpBlock2D",) * n_blocks,
        num_class_embeds=model.num_classes + 1,
    )


def new_scheduler(model: DiffusionModelParams) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=model.num_train_timesteps,
        beta_start=model.beta_start,
        beta_end=model.beta_end,
        beta_schedule=model.beta_schedule,
        prediction_type="epsilon",
    )


def save_version(directory: Path, version: DiffusionVersion) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    version.score.save_pretrained(directory / SCORE_DIR, safe_serialization=True)
    if version.generator is not None:
        version.generator.save_pretrained(directory / GENERATOR_DIR, safe_serialization=True)
    version.scheduler.save_pretrained(directory / SCHEDULER_DIR)
    (directory / CARD_FILE).write_text(json.dumps(version.card.to_dict(), indent=2))
    return directory


def teacher_dir(directory: Path) -> Path:
    """The pretrained DDPM version of a lineage: the version itself for a ddpm, its
    `teacher/` for a one-step version (ArtifactError if a one-step version lacks it)."""
    directory = Path(directory)
    if load_card(directory).kind != "one-step":
        return directory
    teacher = directory / TEACHER_DIR
    if not (teacher / CARD_FILE).is_file():
        raise ArtifactError(f"one-step version {directory} has no {TEACHER_DIR}/ (the DDPM it was distilled from)")
    return teacher


def copy_teacher(source_teacher: Path, out_dir: Path) -> Path:
    """Copy a DDPM version's score/, scheduler/ and card into out_dir/teacher/."""
    source_teacher, target = Path(source_teacher), Path(out_dir) / TEACHER_DIR
    for name in (SCORE_DIR, SCHEDULER_DIR):
        shutil.copytree(source_teacher / name, target / name, dirs_exist_ok=True)
    shutil.copy2(source_teacher / CARD_FILE, target / CARD_FILE)
    return target


def load_card(directory: Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    if not Path(directory).is_dir():
        raise ArtifactError(f"model version directory not found: {directory}")
    if not path.is_file():
        raise ArtifactError(f"missing {path}")
    try:
        return ModelCard.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"corrupt {path}: {exc}") from exc


def _load_unet(path: Path, device: torch.device) -> UNet2DModel:
    weights = path / WEIGHTS_FILE
    for needed in (path / "config.json", weights):
        if not needed.is_file():
            raise ArtifactError(f"missing {needed}")
    try:
        unet = UNet2DModel.from_pretrained(path)
    except Exception as exc:  # diffusers/safetensors raise many types for a bad file
        raise ArtifactError(f"unreadable weights {weights}: {exc}") from exc
    return unet.to(device).eval()


def load_version(directory: Path, device: torch.device | str = "cpu") -> DiffusionVersion:
    """Load a version directory onto `device`; ArtifactError names what is missing or corrupt."""
    directory = Path(directory)
    card = load_card(directory)
    device = torch.device(device)
    score = _load_unet(directory / SCORE_DIR, device)
    generator = None
    if card.kind == "one-step":
        generator = _load_unet(directory / GENERATOR_DIR, device)
    scheduler_config = directory / SCHEDULER_DIR / DDPMScheduler.config_name
    if not scheduler_config.is_file():
        raise ArtifactError(f"missing {scheduler_config}")
    try:
        scheduler = DDPMScheduler.from_pretrained(directory / SCHEDULER_DIR)
    except Exception as exc:
        raise ArtifactError(f"corrupt {scheduler_config}: {exc}") from exc
    return DiffusionVersion(score=score, generator=generator, scheduler=scheduler, card=card)
