"""On-disk format of one diffusion model version (a directory), in two layouts.

Class-conditional (card.conditioning "class"):
    score/            diffusers UNet2DModel (safetensors): eps-prediction score net,
                      num_class_embeds = num_classes + 1, null class = num_classes (CFG)
Text-to-image (card.conditioning "prompt"), a diffusers Stable-Diffusion pipeline directory:
    unet/             UNet2DConditionModel: the eps-prediction score net
    text_encoder/     CLIPTextModel (frozen; its prompt embeddings condition the UNet)
    tokenizer/        CLIPTokenizer
    vae/              optional AutoencoderKL: the UNet works on its latents (Stable Diffusion);
                      without it, on pixels (the tiny captioned-digits model)
    model_index.json  the pipeline's index (a user's pipeline directory has one already)
Both:
    generator/        optional, the score net's class: SFD's one-step generator (EMA)
    scheduler/        DDPMScheduler config
    model_card.json   ModelCard (a pipeline directory without one gets its card derived)
    teacher/          one-step versions only: the lineage's pretrained DDPM version (its score
                      net, scheduler, card and, text-to-image, text encoder, tokenizer, vae),
                      the teacher it was distilled from

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
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from forgetflow.config import DiffusionModelParams
from forgetflow.diffusion.conditioning import ClassConditioning, Conditioning, PromptConditioning, encode_prompts
from forgetflow.families import ArtifactError

CARD_FILE = "model_card.json"
SCORE_DIR = "score"  # class-conditional layout
UNET_DIR = "unet"  # text-to-image layout (the diffusers pipeline's name for the score net)
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
VAE_DIR = "vae"
PIPELINE_INDEX = "model_index.json"
GENERATOR_DIR = "generator"
SCHEDULER_DIR = "scheduler"
TEACHER_DIR = "teacher"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass
class ModelCard:
    """What a version is and what it has forgotten (model_card.json)."""

    kind: str  # "ddpm" (sampled with DDIM) | "one-step" (SFD generator)
    num_classes: int  # 0 for a text-to-image model
    null_class: int  # -1 for a text-to-image model (its null input is the prompt "")
    image_size: int  # the size of the images it draws (the latent size times the vae's factor)
    guidance_scale: float
    class_names: list[str]
    t_init: int | None = None
    sigma_init: float | None = None
    # class: [{"forget_class", "override_class"}]; prompt: [{"concept", "salt", "override", "prompts"}], the
    # concept a salted hash and its prompts a salted digest (concepts.py: no request content in clear)
    forgotten: list[dict] = field(default_factory=list)
    method: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    family: str = "diffusion"
    conditioning: str = "class"  # class | prompt (text-to-image)
    # prompt models: what requests build prompts from (forgetflow/diffusion/concepts.py):
    # {"concepts": [...], "aliases": {concept: [...]}, "templates": [...], "paraphrases": [...], "styles": [...]}
    vocabulary: dict = field(default_factory=dict)

    @property
    def forgotten_pairs(self) -> list[tuple[int, int]]:
        return [(int(p["forget_class"]), int(p["override_class"])) for p in self.forgotten if "forget_class" in p]

    @property
    def score_dir(self) -> str:
        return UNET_DIR if self.conditioning == "prompt" else SCORE_DIR

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        return cls(**data)


@dataclass
class DiffusionVersion:
    score: UNet2DModel | UNet2DConditionModel
    generator: UNet2DModel | UNet2DConditionModel | None
    scheduler: DDPMScheduler
    card: ModelCard
    text_encoder: torch.nn.Module | None = None  # prompt models: CLIPTextModel and its tokenizer
    tokenizer: object | None = None
    vae: torch.nn.Module | None = None  # latent models: AutoencoderKL

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the score net denoises (pixels, or the vae's latents)."""
        config = self.score.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def conditioning(self, prompts: list[str] | None = None) -> Conditioning:
        """Class models: the null class. Prompt models: the table of `prompts` (ids 0..P-1, null P)."""
        if self.card.conditioning != "prompt":
            return ClassConditioning(self.card.null_class)
        return encode_prompts(self.tokenizer, self.text_encoder, list(prompts or []))

    @torch.inference_mode()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from what the score net denoises (the vae's decoder for latents)."""
        if self.vae is None:
            return x
        return self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()


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


def _pipeline_index(version: DiffusionVersion) -> dict:
    """model_index.json of a ddpm prompt version: StableDiffusionPipeline.from_pretrained loads it."""
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", type(version.score).__name__],
             "text_encoder": ["transformers", type(version.text_encoder).__name__],
             "tokenizer": ["transformers", type(version.tokenizer).__name__],
             "scheduler": ["diffusers", "DDPMScheduler"],
             "vae": ["diffusers", "AutoencoderKL"] if version.vae is not None else [None, None],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}


def save_version(directory: Path, version: DiffusionVersion) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    version.score.save_pretrained(directory / version.card.score_dir, safe_serialization=True)
    if version.generator is not None:
        version.generator.save_pretrained(directory / GENERATOR_DIR, safe_serialization=True)
    version.scheduler.save_pretrained(directory / SCHEDULER_DIR)
    if version.card.conditioning == "prompt" and version.card.kind == "ddpm":  # one-step: in teacher/
        version.text_encoder.save_pretrained(directory / TEXT_ENCODER_DIR, safe_serialization=True)
        version.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        if version.vae is not None:
            version.vae.save_pretrained(directory / VAE_DIR, safe_serialization=True)
        (directory / PIPELINE_INDEX).write_text(json.dumps(_pipeline_index(version), indent=2))
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


def teacher_parts(card: ModelCard) -> list[str]:
    """The folders of a DDPM version that its one-step versions carry in teacher/."""
    if card.conditioning != "prompt":
        return [SCORE_DIR, SCHEDULER_DIR]
    return [UNET_DIR, SCHEDULER_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR, VAE_DIR]


def copy_teacher(source_teacher: Path, out_dir: Path) -> Path:
    """Copy a DDPM version's networks, scheduler and card into out_dir/teacher/."""
    source_teacher, target = Path(source_teacher), Path(out_dir) / TEACHER_DIR
    card = load_card(source_teacher)
    for name in teacher_parts(card):
        if (source_teacher / name).is_dir():
            shutil.copytree(source_teacher / name, target / name, dirs_exist_ok=True)
    (target / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2))  # a pipeline's card may be derived
    return target


def card_of_pipeline(directory: Path) -> ModelCard:
    """The card of a diffusers text-to-image pipeline directory that has none (a model a user
    brings): a ddpm version with prompt conditioning, guidance 7.5 (Stable Diffusion's default),
    no vocabulary (requests then list their prompts, or use the default templates)."""
    unet = json.loads((Path(directory) / UNET_DIR / "config.json").read_text())
    factor = 1
    if (Path(directory) / VAE_DIR / "config.json").is_file():
        vae = json.loads((Path(directory) / VAE_DIR / "config.json").read_text())
        factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    size = unet["sample_size"] if isinstance(unet["sample_size"], int) else unet["sample_size"][0]
    return ModelCard(kind="ddpm", num_classes=0, null_class=-1, image_size=size * factor, guidance_scale=7.5,
                     class_names=[], conditioning="prompt")


def load_card(directory: Path) -> ModelCard:
    directory = Path(directory)
    path = directory / CARD_FILE
    if not directory.is_dir():
        raise ArtifactError(f"model version directory not found: {directory}")
    if not path.is_file():
        if (directory / PIPELINE_INDEX).is_file() and (directory / UNET_DIR / "config.json").is_file():
            return card_of_pipeline(directory)
        raise ArtifactError(f"missing {path}")
    try:
        return ModelCard.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"corrupt {path}: {exc}") from exc


def _load_unet(path: Path, device: torch.device, cls: type = UNet2DModel):
    weights = path / WEIGHTS_FILE
    for needed in (path / "config.json", weights):
        if not needed.is_file():
            raise ArtifactError(f"missing {needed}")
    try:
        unet = cls.from_pretrained(path)
    except Exception as exc:  # diffusers/safetensors raise many types for a bad file
        raise ArtifactError(f"unreadable weights {weights}: {exc}") from exc
    return unet.to(device).eval()


def _load_text_parts(directory: Path, device: torch.device) -> tuple:
    """(text_encoder, tokenizer, vae or None) of a prompt version, frozen."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    for needed in (directory / TEXT_ENCODER_DIR / "config.json", directory / TOKENIZER_DIR):
        if not needed.exists():
            raise ArtifactError(f"missing {needed}")
    try:
        text_encoder = CLIPTextModel.from_pretrained(directory / TEXT_ENCODER_DIR).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(directory / TOKENIZER_DIR)
        vae = None
        if (directory / VAE_DIR / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(directory / VAE_DIR).to(device).eval().requires_grad_(False)
    except Exception as exc:
        raise ArtifactError(f"unreadable text encoder, tokenizer or vae in {directory}: {exc}") from exc
    return text_encoder.requires_grad_(False), tokenizer, vae


def load_version(directory: Path, device: torch.device | str = "cpu") -> DiffusionVersion:
    """Load a version directory onto `device`; ArtifactError names what is missing or corrupt.
    A one-step prompt version reads its text encoder, tokenizer and vae from its teacher/."""
    directory = Path(directory)
    card = load_card(directory)
    device = torch.device(device)
    unet_class = UNet2DConditionModel if card.conditioning == "prompt" else UNet2DModel
    score = _load_unet(directory / card.score_dir, device, unet_class)
    generator = None
    if card.kind == "one-step":
        generator = _load_unet(directory / GENERATOR_DIR, device, unet_class)
    scheduler_config = directory / SCHEDULER_DIR / DDPMScheduler.config_name
    if not scheduler_config.is_file():
        raise ArtifactError(f"missing {scheduler_config}")
    try:
        scheduler = DDPMScheduler.from_pretrained(directory / SCHEDULER_DIR)
    except Exception as exc:
        raise ArtifactError(f"corrupt {scheduler_config}: {exc}") from exc
    version = DiffusionVersion(score=score, generator=generator, scheduler=scheduler, card=card)
    if card.conditioning == "prompt":
        parts = teacher_dir(directory) if card.kind == "one-step" else directory
        version.text_encoder, version.tokenizer, version.vae = _load_text_parts(parts, device)
    return version
