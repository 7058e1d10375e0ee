"""ESD-style fine-tuning (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models") in its
class-conditional form: a peer of SFD for `forgetflow bench`; unlike SFD it needs real data.

The score net eps_theta, initialised from the frozen teacher eps*, is fine-tuned so that
conditioning on a forgotten class c_f predicts the teacher's score guided away from it,

    L_erase    = || eps_theta(x_t; c_f, t) - [eps*(x_t; null, t) - eta (eps*(x_t; c_f, t) - eps*(x_t; null, t))] ||^2
    L_preserve = || eps_theta(x_t; c, t) - eps*(x_t; c, t) ||^2     (c a remaining class)
    L = L_erase + preserve_weight * L_preserve

with x_t = a_t x0 + b_t eps, x0 real digits of c_f (L_erase) and of the remaining classes
(L_preserve, our addition: in a class-conditional net every class shares the weights). The
forgotten class is redrawn as whatever the guided-away score makes of it, so the version's
card records a random override. The result is a multi-step ("ddpm") version, sampled with DDIM
like the teacher. No checkpoints: a killed run starts again.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import trange

from forgetflow.checkpoints import CheckpointSink
from forgetflow.compute import autocast, grad_scaler, resolve_device
from forgetflow.config import Params
from forgetflow.diffusion.artifact import ArtifactError, DiffusionVersion, ModelCard, load_version, save_version
from forgetflow.diffusion.data import load_digits_split
from forgetflow.diffusion.sfd import RANDOM_OVERRIDE, merge_forget_pairs
from forgetflow.diffusion.train_base import TRAINING_LOG, optimizer_step


class ESD:
    name = "esd"

    @classmethod
    def unlearn(cls, base_dir: Path, out_dir: Path, forget_pairs: list[tuple[int, int]], params: Params,
                *, device: torch.device | None = None, checkpoints: CheckpointSink | None = None,
                progress: bool = True) -> Path:
        """The method-registry entry point (see methods.py); `checkpoints` is not used."""
        return train_esd(base_dir, out_dir, [f for f, _ in forget_pairs], params, device=device, progress=progress)


def train_esd(base_dir: Path, out_dir: Path, forget_classes: list[int], params: Params, *,
              device: torch.device | None = None, progress: bool = True) -> Path:
    esd, model = params.diffusion.esd, params.diffusion.model
    device = device or resolve_device(params.compute)
    base = load_version(base_dir, device)
    if base.card.kind != "ddpm":
        raise ArtifactError(f"ESD fine-tunes a multi-step score net; {base_dir} is a {base.card.kind} version")
    torch.manual_seed(esd.seed)
    rng = torch.Generator(device).manual_seed(esd.seed)
    pairs = merge_forget_pairs(base.card.forgotten_pairs, [(c, RANDOM_OVERRIDE) for c in forget_classes],
                               base.card.num_classes)
    images, labels = load_digits_split("train", base.card.image_size)
    is_forget = torch.isin(labels, torch.tensor(sorted(pairs)))
    forget_x, keep_x, keep_c = images[is_forget].to(device), images[~is_forget].to(device), labels[~is_forget].to(device)
    forget_c = labels[is_forget].to(device)
    null = base.card.null_class

    teacher = base.score.requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=esd.lr)
    scaler = grad_scaler(device, params.compute)
    scheduler = base.scheduler

    def noised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(model.num_train_timesteps, (len(x),), generator=rng, device=device)
        eps = torch.randn(x.shape, generator=rng, device=device)
        return scheduler.add_noise(x, eps, t), t

    losses, start = [], time.perf_counter()
    for _ in trange(esd.iterations, disable=not progress, desc="esd"):
        i = torch.randint(len(forget_x), (esd.batch_size,), generator=rng, device=device)
        j = torch.randint(len(keep_x), (esd.batch_size,), generator=rng, device=device)
        (x_f, t_f), (x_k, t_k) = noised(forget_x[i]), noised(keep_x[j])
        c_f, c_k = forget_c[i], keep_c[j]
        with torch.no_grad(), autocast(device, params.compute):
            both = teacher(torch.cat([x_f, x_f, x_k]), torch.cat([t_f, t_f, t_k]),
                           class_labels=torch.cat([c_f, torch.full_like(c_f, null), c_k])).sample.float()
        eps_c, eps_null, eps_keep = both.split([len(c_f), len(c_f), len(c_k)])
        target = eps_null - esd.negative_guidance * (eps_c - eps_null)
        with autocast(device, params.compute):
            pred = student(torch.cat([x_f, x_k]), torch.cat([t_f, t_k]), class_labels=torch.cat([c_f, c_k])).sample.float()
        pred_f, pred_k = pred.split([len(c_f), len(c_k)])
        loss = F.mse_loss(pred_f, target) + esd.preserve_weight * F.mse_loss(pred_k, eps_keep)
        optimizer_step(loss, optimizer, scaler, student.parameters())
        losses.append(loss.item())
    seconds = time.perf_counter() - start

    card = ModelCard(**{**base.card.to_dict(), "method": "esd",
                        "forgotten": [{"forget_class": f, "override_class": o} for f, o in pairs.items()],
                        "hyperparameters": {"esd": esd.model_dump(mode="json")}})
    out_dir = save_version(Path(out_dir), DiffusionVersion(student.eval(), None, scheduler, card))
    (out_dir / TRAINING_LOG).write_text(json.dumps({"method": "esd", "iterations": esd.iterations, "seconds": seconds,
                                                    "final_loss": losses[-1] if losses else None}, indent=2))
    return out_dir
