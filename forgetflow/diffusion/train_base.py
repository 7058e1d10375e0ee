"""Train the class-conditional DDPM teacher f_phi on digits (the model a user would bring).

Loss (eps-prediction, Ho et al. 2020): E_{x0,c,t,eps} || eps_phi(a_t x0 + b_t eps; c, t) - eps ||^2
with a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t), t ~ U{0..T-1}; the label is replaced by the
null class with probability class_dropout so the model also learns the unconditional score
(classifier-free guidance). The saved weights are the EMA weights.
`exclude_classes` trains without those classes: the "Retrain" gold standard of unlearning.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm.auto import trange

from forgetflow.compute import autocast, checkpointed, grad_scaler, resolve_device
from forgetflow.config import Params
from forgetflow.diffusion.artifact import DiffusionVersion, ModelCard, new_scheduler, new_unet, save_version
from forgetflow.diffusion.data import load_digits_split
from forgetflow.distributed import average_gradients

TRAINING_LOG = "training_log.json"


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    parameters: Iterable[torch.nn.Parameter],
    clip_value: float | None = None,
) -> None:
    """backward, gradients averaged over data-parallel ranks (if any), optional element-wise
    clipping to [-clip_value, clip_value], step."""
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    average_gradients(parameters)
    if clip_value is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_value_(parameters, clip_value)
    scaler.step(optimizer)
    scaler.update()


def train_teacher(
    params: Params,
    out_dir: Path,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    exclude_classes: Sequence[int] = (),
) -> Path:
    """Train the teacher and write a "ddpm" version directory at `out_dir`."""
    cfg, base = params.diffusion, params.diffusion.base
    device = device or resolve_device(params.compute)
    torch.manual_seed(base.seed)
    rng = torch.Generator(device).manual_seed(base.seed)

    images, labels = load_digits_split("train", cfg.model.image_size)
    keep = ~torch.isin(labels, torch.tensor(list(exclude_classes), dtype=torch.long))
    images, labels = images[keep].to(device), labels[keep].to(device)
    null_class = cfg.model.num_classes

    unet = checkpointed(new_unet(cfg.model), params.compute).to(device).train()
    scheduler = new_scheduler(cfg.model)
    ema = EMAModel(unet.parameters(), decay=base.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=base.lr)
    scaler = grad_scaler(device, params.compute)

    losses = []
    start = time.perf_counter()
    for _ in trange(base.steps, disable=not progress, desc="teacher"):
        idx = torch.randint(len(images), (base.batch_size,), generator=rng, device=device)
        x0, c = images[idx], labels[idx]
        dropped = torch.rand(base.batch_size, generator=rng, device=device) < base.class_dropout
        c = torch.where(dropped, torch.full_like(c, null_class), c)
        t = torch.randint(cfg.model.num_train_timesteps, (base.batch_size,), generator=rng, device=device)
        eps = torch.randn(x0.shape, generator=rng, device=device)
        x_t = scheduler.add_noise(x0, eps, t)
        with autocast(device, params.compute):
            eps_hat = unet(x_t, t, class_labels=c).sample
        loss = F.mse_loss(eps_hat.float(), eps)
        optimizer_step(loss, optimizer, scaler, unet.parameters())
        ema.step(unet.parameters())
        losses.append(loss.item())
    seconds = time.perf_counter() - start

    ema.copy_to(unet.parameters())
    card = ModelCard(
        kind="ddpm",
        num_classes=cfg.model.num_classes,
        null_class=null_class,
        image_size=cfg.model.image_size,
        guidance_scale=cfg.sampler.guidance_scale,
        class_names=[str(i) for i in range(cfg.model.num_classes)],
        method="retrain" if exclude_classes else None,
        hyperparameters={
            "model": cfg.model.model_dump(mode="json"),
            "base": base.model_dump(mode="json"),
            "exclude_classes": sorted(int(c) for c in exclude_classes),
        },
    )
    out_dir = save_version(Path(out_dir), DiffusionVersion(unet.eval(), None, scheduler, card))
    (out_dir / TRAINING_LOG).write_text(
        json.dumps(
            {"seconds": seconds, "steps": base.steps, "steps_per_second": base.steps / seconds,
             "mean_loss": sum(losses) / len(losses), "final_loss": losses[-1]},
            indent=2,
        )
    )
    return out_dir
