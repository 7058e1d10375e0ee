"""Sampling a model version, and the VP quantities shared with training.

VP / DDPM with eps-prediction: x_t = a_t x0 + b_t eps, a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t),
noise level sigma_t = b_t / a_t = sqrt(1/abar_t - 1).
Denoiser: D(x_t; c, t) = (x_t - b_t eps_hat(x_t; c, t)) / a_t.
Classifier-free guidance with weight w: eps_null + w (eps_c - eps_null) (w = 1: plain c).
The condition c is an id that a Conditioning turns into the UNet's inputs (a class label, or
a prompt's embeddings: forgetflow/diffusion/conditioning.py).

"ddpm" versions are sampled with DDIM (params.diffusion.sampler.num_inference_steps);
"one-step" versions with the SFD generator: x = b_{t_init} z, out = D_G(x; c, t_init).
A version with a vae denoises its latents; sampling returns the decoded images.
"""
from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor
from tqdm.auto import tqdm

from forgetflow.compute import autocast
from forgetflow.config import ComputeParams, Params
from forgetflow.diffusion.artifact import DiffusionVersion
from forgetflow.diffusion.conditioning import Conditioning, PromptConditioning


def sigmas(scheduler: DDPMScheduler) -> Tensor:
    """sigma_t = sqrt(1/abar_t - 1) for every training timestep t."""
    return (1.0 / scheduler.alphas_cumprod.double() - 1.0).sqrt()


def t_for_sigma(scheduler: DDPMScheduler, sigma: float) -> int:
    """The timestep whose sigma is nearest to `sigma` (maps noise levels across schedules)."""
    return int((sigmas(scheduler) - sigma).abs().argmin())


def vp_coefficients(scheduler: DDPMScheduler, t: Tensor) -> tuple[Tensor, Tensor]:
    """(a_t, b_t) shaped [N, 1, 1, 1] on t's device."""
    abar = scheduler.alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)
    return abar.sqrt(), (1.0 - abar).sqrt()


def eps_prediction(
    unet: UNet2DModel, x_t: Tensor, t: Tensor, c: Tensor, guidance_scale: float,
    cond: Conditioning, compute: ComputeParams,
) -> Tensor:
    """eps_hat(x_t; c, t) in fp32, guided when guidance_scale != 1 (one batched forward)."""
    with autocast(x_t.device, compute):
        if guidance_scale == 1.0:
            return unet(x_t, t, **cond.unet_inputs(c)).sample.float()
        both_c = torch.cat([c, cond.null_ids(c)])
        both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), **cond.unet_inputs(both_c)).sample
    eps_c, eps_null = both.float().chunk(2)
    return eps_null + guidance_scale * (eps_c - eps_null)


def denoise(
    unet: UNet2DModel, scheduler: DDPMScheduler, x_t: Tensor, t: Tensor, c: Tensor,
    guidance_scale: float, cond: Conditioning, compute: ComputeParams,
) -> Tensor:
    """D(x_t; c, t) = (x_t - b_t eps_hat) / a_t."""
    a_t, b_t = vp_coefficients(scheduler, t)
    eps_hat = eps_prediction(unet, x_t, t, c, guidance_scale, cond, compute)
    return (x_t - b_t * eps_hat) / a_t


def generate_one_step(
    generator: UNet2DModel, scheduler: DDPMScheduler, z: Tensor, c: Tensor, t_init: int,
    guidance_scale: float, cond: Conditioning, compute: ComputeParams,
) -> Tensor:
    """G_theta(z; c) = D_G(b_{t_init} z; c, t_init) (1 NFE, 2 when guided)."""
    t = torch.full((z.shape[0],), t_init, device=z.device, dtype=torch.long)
    _, b_init = vp_coefficients(scheduler, t)
    return denoise(generator, scheduler, b_init * z, t, c, guidance_scale, cond, compute)


def _sample_ddim(
    version: DiffusionVersion, z: Tensor, c: Tensor, guidance_scale: float, cond: Conditioning, params: Params,
) -> Tensor:
    ddim = DDIMScheduler.from_config(version.scheduler.config)
    ddim.set_timesteps(params.diffusion.sampler.num_inference_steps, device=z.device)
    x = z * ddim.init_noise_sigma
    for t in ddim.timesteps:
        t_batch = t.expand(x.shape[0]).to(z.device)
        eps_hat = eps_prediction(version.score, x, t_batch, c, guidance_scale, cond, params.compute)
        x = ddim.step(eps_hat, t, x).prev_sample  # eta = 0: deterministic given z
    return x


def draw_noise(n: int, shape: tuple[int, int, int], seed: int) -> Tensor:
    """z ~ N(0, I) [n, *shape] (shape: the version's sample_shape) on the CPU (the same on
    every device), from one torch.Generator seeded with `seed`."""
    rng = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=rng)


@torch.inference_mode()
def sample_from_noise(
    version: DiffusionVersion,
    z: Tensor,
    labels: Tensor,
    *,
    guidance_scale: float | None = None,
    conditioning: Conditioning | None = None,
    params: Params,
    device: torch.device | str,
    progress: bool = False,
) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] (on the CPU) for condition ids `labels` from the noise
    `z` (deterministic in z: DDIM with eta 0, or the one-step generator). Batched by
    sampler.batch_size. guidance_scale None takes the version card's scale; conditioning None
    is the version's class conditioning (a prompt version needs its prompt table)."""
    device = torch.device(device)
    w = version.card.guidance_scale if guidance_scale is None else float(guidance_scale)
    cond = conditioning if conditioning is not None else version.conditioning()
    if isinstance(cond, PromptConditioning):
        cond = cond.to(device)
    out = []
    batch = params.diffusion.sampler.batch_size
    for z_chunk, c in tqdm(zip(z.split(batch), labels.split(batch)), total=math.ceil(len(labels) / batch),
                           disable=not progress, desc="sampling"):
        z_chunk, c = z_chunk.to(device), c.to(device)
        if version.card.kind == "one-step":
            x = generate_one_step(version.generator, version.scheduler, z_chunk, c, version.card.t_init, w, cond,
                                  params.compute)
        else:
            x = _sample_ddim(version, z_chunk, c, w, cond, params)
        out.append(version.decode(x).clamp(-1.0, 1.0).float().cpu())
    size = version.card.image_size
    return torch.cat(out) if out else torch.empty((0, 1, size, size))


def sample(
    version: DiffusionVersion,
    labels: Tensor,
    *,
    seed: int,
    guidance_scale: float | None = None,
    conditioning: Conditioning | None = None,
    params: Params,
    device: torch.device | str,
    progress: bool = False,
) -> Tensor:
    """sample_from_noise on noise drawn from `seed` (draw_noise): deterministic in `seed`."""
    z = draw_noise(len(labels), version.sample_shape, seed)
    return sample_from_noise(version, z, labels, guidance_scale=guidance_scale, conditioning=conditioning,
                             params=params, device=device, progress=progress)


def nfe(version: DiffusionVersion, guidance_scale: float | None, params: Params) -> int:
    """Network evaluations per sample: 1 (one-step) or DDIM steps, doubled under guidance."""
    w = version.card.guidance_scale if guidance_scale is None else float(guidance_scale)
    per_step = 1 if w == 1.0 else 2
    steps = 1 if version.card.kind == "one-step" else params.diffusion.sampler.num_inference_steps
    return steps * per_step
