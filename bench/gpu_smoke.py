"""Exercise the GPU path of the diffusion family and time it (run where a GPU is present).

    python bench/gpu_smoke.py OUT_DIR [--preset tiny]

Trains the teacher and judge, runs SFD (forget 7 -> 8) and evaluates base and new, all on
the device `compute.device: auto` picks, with the configured mixed precision; writes
OUT_DIR/gpu_smoke.json with wall-clock per stage, device name, dtype and peak memory.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from forgetflow.compute import autocast_dtype, resolve_device
from forgetflow.config import load_params
from forgetflow.diffusion.evaluate import evaluate_version
from forgetflow.diffusion.judge import train_judge
from forgetflow.diffusion.sfd import train_sfd
from forgetflow.diffusion.train_base import train_teacher


def main(out: Path, preset: str | None) -> dict:
    params = load_params(preset=preset)
    device = resolve_device(params.compute)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
              "autocast": str(autocast_dtype(device, params.compute)), "torch": torch.__version__,
              "preset": preset, "seconds": {}}
    stages = [
        ("train_teacher", lambda: train_teacher(params, out / "base", device=device, progress=False)),
        ("train_judge", lambda: train_judge(params, out / "judge", device=device, progress=False)),
        ("sfd", lambda: train_sfd(out / "base", out / "new", [(7, 8)], params, device=device, progress=False)),
        ("evaluate_base", lambda: evaluate_version(out / "base", out / "judge", [(7, 8)], params, seed=30_000, device=device)),
        ("evaluate_new", lambda: evaluate_version(out / "new", out / "judge", [(7, 8)], params, seed=30_000, device=device)),
    ]
    for name, fn in stages:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["seconds"][name] = round(time.perf_counter() - start, 2)
        if isinstance(value, dict):
            result[name] = value
        print(name, result["seconds"][name], flush=True)
    result["sfd_iterations_per_s"] = round(params.diffusion.sfd.iterations / result["seconds"]["sfd"], 2)
    result["teacher_steps_per_s"] = round(params.diffusion.base.steps / result["seconds"]["train_teacher"], 2)
    if device.type == "cuda":
        result["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (out / "gpu_smoke.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    preset = sys.argv[sys.argv.index("--preset") + 1] if "--preset" in sys.argv else None
    print(json.dumps(main(Path(sys.argv[1]), preset), indent=2, default=str))
