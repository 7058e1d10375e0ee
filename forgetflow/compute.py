"""Device and precision choice, from params.yaml `compute` (never from code edits).

`auto` takes CUDA when present (then MPS), else the CPU. Mixed precision applies on CUDA
only: bf16 where the GPU supports it, fp16 otherwise if asked; the CPU always runs fp32.
"""
from __future__ import annotations

import contextlib

import torch

from forgetflow.config import ComputeParams
from forgetflow.distributed import average_gradients


def resolve_device(compute: ComputeParams) -> torch.device:
    if compute.num_threads:
        torch.set_num_threads(compute.num_threads)
    if compute.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if compute.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but no CUDA device is visible")
    return torch.device(compute.device)


def checkpointed(model: torch.nn.Module, compute: ComputeParams) -> torch.nn.Module:
    """`model` set to recompute its activations in the backward pass when
    compute.gradient_checkpointing is on (transformers and diffusers models both offer it;
    non-reentrant, so frozen weights under a LoRA adapter need no input gradients)."""
    if not compute.gradient_checkpointing:
        return model
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        model.enable_gradient_checkpointing()
    else:
        raise ValueError(f"{type(model).__name__} cannot checkpoint its activations")
    return model


def autocast_dtype(device: torch.device, compute: ComputeParams) -> torch.dtype | None:
    """The autocast dtype for this device, or None for full fp32."""
    if device.type != "cuda" or compute.mixed_precision == "no":
        return None
    if compute.mixed_precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, compute: ComputeParams):
    """`torch.autocast` on CUDA with the configured dtype; a no-op context elsewhere."""
    dtype = autocast_dtype(device, compute)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, compute: ComputeParams) -> torch.amp.GradScaler:
    """Loss scaling, needed only when autocast runs in fp16 (a no-op otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, compute) == torch.float16)


def clipped_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 parameters, max_norm: float) -> None:
    """backward (scaled under fp16), gradients averaged over data-parallel ranks (if any),
    gradient-norm clipping on the unscaled gradients, step."""
    parameters = list(parameters)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    average_gradients(parameters)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    scaler.step(optimizer)
    scaler.update()
