"""The judge: a small CNN digit classifier used only for evaluation.

Trained on the train split (cross-entropy, random translations of up to judge_max_shift
pixels), scored on the test split. It gives P(class | image) for unlearning accuracy and
override fidelity, and its penultimate-layer features for Frechet distances.
Stored as judge.safetensors + judge_card.json (architecture and test_accuracy).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import trange

from forgetflow.compute import autocast, resolve_device
from forgetflow.config import Params
from forgetflow.diffusion import captions
from forgetflow.diffusion.artifact import ArtifactError
from forgetflow.diffusion.data import load_digits_split

WEIGHTS_FILE = "judge.safetensors"
CARD_FILE = "judge_card.json"


class Judge(nn.Module):
    """Conv blocks (conv-ReLU-conv-ReLU-maxpool per width), then a hidden layer (the
    features, width channels[-1]) and a linear classifier."""

    def __init__(self, image_size: int, num_classes: int, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        side = image_size // 2 ** len(channels)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, channels[-1]), nn.ReLU())
        self.head = nn.Linear(channels[-1], num_classes)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(images))

    @torch.inference_mode()
    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features [N, D] (for Frechet distances), on the CPU."""
        return self.body(images.to(self.device).float()).float().cpu()

    @torch.inference_mode()
    def predict_proba(self, images: Tensor) -> Tensor:
        """P(class | image) [N, num_classes], on the CPU."""
        return self(images.to(self.device).float()).float().softmax(dim=1).cpu()


def _random_shift(images: Tensor, max_shift: int, rng: torch.Generator) -> Tensor:
    """Translate each image by integer offsets in [-max_shift, max_shift]; background stays -1."""
    n, _, h, w = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=rng, device=images.device).float()
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2.0 * shifts[:, 0] / w
    theta[:, 1, 2] = 2.0 * shifts[:, 1] / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0


def accuracy(judge: Judge, images: Tensor, labels: Tensor) -> float:
    return (judge.predict_proba(images).argmax(dim=1) == labels.cpu()).float().mean().item()


def _split(split: str, image_size: int, captioned: bool) -> tuple[Tensor, Tensor]:
    if not captioned:
        return load_digits_split(split, image_size)
    images, labels, _ = captions.load_captioned_split(split, image_size)
    return images, labels


def train_judge(params: Params, out_dir: Path, *, device: torch.device | None = None, progress: bool = True,
                captioned: bool = False) -> Path:
    """Train on the train split only; write weights and judge_card.json (with test_accuracy).
    captioned: on both stroke styles of the captioned digits, with the digit words as class
    names (the text-to-image model's concepts)."""
    cfg, base = params.diffusion, params.diffusion.base
    device = device or resolve_device(params.compute)
    torch.manual_seed(base.seed)
    rng = torch.Generator(device).manual_seed(base.seed)
    images, labels = _split("train", cfg.model.image_size, captioned)
    images, labels = images.to(device), labels.to(device)

    judge = Judge(cfg.model.image_size, cfg.model.num_classes, tuple(base.judge_channels)).to(device)
    optimizer = torch.optim.Adam(judge.parameters(), lr=base.judge_lr)
    for _ in trange(base.judge_epochs, disable=not progress, desc="judge"):
        judge.train()
        for idx in torch.randperm(len(images), generator=rng, device=device).split(base.judge_batch_size):
            x = _random_shift(images[idx], base.judge_max_shift, rng)
            with autocast(device, params.compute):
                logits = judge(x)
            loss = F.cross_entropy(logits.float(), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    judge.eval()

    test_images, test_labels = _split("test", cfg.model.image_size, captioned)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in judge.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    card = {
        "image_size": cfg.model.image_size,
        "num_classes": cfg.model.num_classes,
        "class_names": captions.DIGIT_WORDS if captioned else [str(c) for c in range(cfg.model.num_classes)],
        "channels": list(base.judge_channels),
        "feature_dim": base.judge_channels[-1],
        "test_accuracy": accuracy(judge, test_images, test_labels),
        "train_accuracy": accuracy(judge, images, labels),
        "hyperparameters": {k: v for k, v in base.model_dump(mode="json").items()
                            if k.startswith("judge") or k == "seed"},
    }
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2))
    return out_dir


def load_judge_card(directory: Path) -> dict:
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ArtifactError(f"missing {path}")
    return json.loads(path.read_text())


def load_judge(directory: Path, device: torch.device | str = "cpu") -> Judge:
    directory = Path(directory)
    card_path, weights = directory / CARD_FILE, directory / WEIGHTS_FILE
    for needed in (card_path, weights):
        if not needed.is_file():
            raise ArtifactError(f"missing {needed}")
    try:
        card = json.loads(card_path.read_text())
        judge = Judge(card["image_size"], card["num_classes"], tuple(card["channels"]))
        judge.load_state_dict(load_file(str(weights)))
    except Exception as exc:
        raise ArtifactError(f"corrupt judge in {directory}: {exc}") from exc
    return judge.to(device).eval()
