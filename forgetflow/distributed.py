"""Data-parallel training over several processes of one machine: its GPUs (NCCL) or, without
GPUs, CPU processes (Gloo). How many is `compute.processes` in params.yaml (0: one per visible
GPU), never a code edit. The pipeline itself runs once (one Prefect flow run); only its training
step fans out into ranks, so forgetflow starts them itself rather than being started by torchrun.

    launch(fn, *args, compute=..., **kwargs)
        fn(*args, **kwargs) in `processes_for(compute)` worker processes started by
        torch.distributed's elastic launcher (the engine behind torchrun), each with its
        process group; returns rank 0's result, or re-raises the first rank's exception.
        One process: fn runs right here.
    average_gradients(parameters)
        after backward: every rank's gradients become their mean over the ranks.
    on_main(fn, *args)
        fn on rank 0 only (checkpoints, the final model); if it fails, every rank stops.

Every rank starts from the same weights and applies the same averaged gradients, so the
replicas stay identical; each rank draws its own share of the global batch from its own
random stream, so N ranks train on the recipe's batch about N times faster.

Why not torch's DistributedDataParallel wrapper: SFD freezes and unfreezes the fake score
network between its two steps and evaluates it in the generator step with gradients only
through its input, which DDP's reducer (hooks on every parameter, expecting each to get a
gradient) cannot follow. Averaging the gradients explicitly, once per optimiser step, is the
same arithmetic.
"""
from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from forgetflow.config import ComputeParams


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def processes_for(compute: ComputeParams) -> int:
    """compute.processes, or with 0 one per visible GPU (one on a machine without)."""
    if compute.processes:
        return compute.processes
    gpus = torch.cuda.device_count() if compute.device in ("auto", "cuda") else 0
    return max(1, gpus)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks (one all-reduce of one flat buffer)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (on every rank)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def on_main(fn: Callable[..., Any], *args: Any) -> None:
    """fn(*args) on rank 0 only (saving, uploading); every rank learns whether it failed, so
    that none waits forever in the next collective for a rank that has stopped: rank 0
    re-raises its exception, the others raise one saying so."""
    error = None
    if is_main():
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = exc
    failed = gather(None if error is None else f"{type(error).__name__}: {error}")[0]
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 failed: {failed}")


def launch(fn: Callable[..., Any], *args: Any, compute: ComputeParams, **kwargs: Any) -> Any:
    processes = processes_for(compute)
    if processes == 1 or dist.is_initialized():
        return fn(*args, **kwargs)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"forgetflow-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    outcomes = elastic_launch(config, _worker)(fn, args, kwargs, compute)
    for r in sorted(outcomes):
        if "error" in outcomes[r]:
            raise outcomes[r]["error"]
    return outcomes[0]["result"]


def _worker(fn: Callable[..., Any], args: tuple, kwargs: dict, compute: ComputeParams) -> dict:
    """One rank: bind its GPU (or share the CPU cores), join the group, run fn. An exception
    travels back as a value so that the caller sees its type and message, not a launcher's."""
    cuda = compute.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    elif not compute.num_threads:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        return {"result": fn(*args, **kwargs)}
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return {"error": exc}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
