"""Guidance calibration of an unlearned version and the diffusion promotion gates.

Gates (params.diffusion.gates), new = the unlearned version, base = the lineage's pretrained
DDPM teacher (the base version itself for a first request; the `teacher/` of a one-step base
for a chained one, so quality and speed never drift request after request), both measured on
the classes that remain after every forgetting so far:
    unlearning_accuracy      = new.UA                                        >= min
    override_fidelity        = new.override_fidelity                         >= min
    remaining_accuracy_drop  = base.remaining_acc - new.remaining_acc        <= max
    remaining_fd_ratio       = new.remaining_fd / base.remaining_fd          <= max
    nfe_reduction            = base.nfe / new.nfe                            >= min
(network evaluations per sample, not seconds: a wall-clock speed-up depends on the device. The
tiny digits UNet samples 56x faster in one step than in 50 on this CPU but only 10x on an H200,
where a kernel launch costs more than the network; seconds_per_1000_samples stays in the report.)
Calibration: evaluate every scale of calibrate.guidance_scales on the calibration seed
(samples_per_class per remaining class) and take the smallest scale whose gates all pass,
else the scale with the largest worst-gate margin.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from forgetflow.config import GateParams, Params
from forgetflow.diffusion.evaluate import evaluate_version
from forgetflow.gates import Gate, all_passed

CURVE_METRICS = ("unlearning_accuracy", "override_fidelity", "remaining_class_accuracy", "remaining_fd")


def diffusion_gates(base_metrics: dict, new_metrics: dict, gate_params: GateParams) -> list[Gate]:
    """The gates above; the forgetting ones only where something is forgotten (a version
    distilled at registration forgets nothing and is gated on quality and NFE alone)."""
    forgetting = [
        Gate("unlearning_accuracy", new_metrics["unlearning_accuracy"], gate_params.unlearning_accuracy_min, "min"),
        Gate("override_fidelity", new_metrics["override_fidelity"], gate_params.override_fidelity_min, "min"),
    ] if new_metrics["unlearning_accuracy"] is not None else []
    return forgetting + [
        Gate("remaining_accuracy_drop",
             base_metrics["remaining_class_accuracy"] - new_metrics["remaining_class_accuracy"],
             gate_params.remaining_accuracy_drop_max, "max"),
        Gate("remaining_fd_ratio", new_metrics["remaining_fd"] / base_metrics["remaining_fd"],
             gate_params.remaining_fd_ratio_max, "max"),
        Gate("nfe_reduction", base_metrics["nfe"] / new_metrics["nfe"], gate_params.nfe_reduction_min, "min"),
    ] + (realism_gates(base_metrics, new_metrics, gate_params) if new_metrics.get("random_override") else [])


def realism_gates(base_metrics: dict, new_metrics: dict, gate_params: GateParams) -> list[Gate]:
    """A random override must draw real digits on the forget row, not shapeless blobs that a
    judge merely fails to call the forgotten class: the judge is confident about them and
    their FD against real remaining digits is near the base's remaining FD."""
    return [
        Gate("forget_confidence", new_metrics["forget_confidence"], gate_params.forget_confidence_min, "min"),
        Gate("forget_fd_ratio", new_metrics["forget_fd"] / base_metrics["remaining_fd"],
             gate_params.forget_fd_ratio_max, "max"),
    ]


def calibrate_guidance(
    version_dir: Path,
    judge_dir: Path,
    forget_pairs: list[tuple[int, int]],
    params: Params,
    base_metrics: dict,
    *,
    device: torch.device | None = None,
) -> tuple[float, list[dict]]:
    """(chosen guidance scale, one curve row per scale)."""
    cal = params.diffusion.calibrate
    scale = cal.samples_per_class / params.diffusion.evaluate.samples_per_remaining_class
    rows, margins = [], []
    for w in sorted(cal.guidance_scales):
        metrics = evaluate_version(version_dir, judge_dir, forget_pairs, params, seed=cal.seed,
                                   guidance_scale=w, device=device, samples_scale=scale)
        gates = diffusion_gates(base_metrics, metrics, params.diffusion.gates)
        rows.append({
            "guidance_scale": w,
            **{k: metrics[k] for k in CURVE_METRICS},
            "passed": all_passed(gates),
            "gates": [g.to_dict() for g in gates],
        })
        margins.append(min(g.margin for g in gates))
    passing = [row["guidance_scale"] for row in rows if row["passed"]]
    if passing:
        return passing[0], rows
    return rows[max(range(len(rows)), key=margins.__getitem__)]["guidance_scale"], rows


def calibrate_version(version_dir: Path, reference_dir: Path, judge_dir: Path, forget_pairs: list[tuple[int, int]],
                      params: Params, *, device: torch.device | None = None,
                      cache_dir: Path | None = None) -> tuple[float, list[dict]]:
    """Calibrate `version_dir` against `reference_dir` (the lineage's DDPM teacher, measured on
    the calibration seed) and write the chosen scale into its model card; (scale, curve)."""
    cal = params.diffusion.calibrate
    reference = evaluate_version(reference_dir, judge_dir, forget_pairs, params, seed=cal.seed, device=device,
                                 samples_scale=cal.samples_per_class / params.diffusion.evaluate.samples_per_remaining_class,
                                 cache_dir=cache_dir)
    scale, curve = calibrate_guidance(version_dir, judge_dir, forget_pairs, params, reference, device=device)
    card_path = Path(version_dir) / "model_card.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "guidance_scale": scale}, indent=2))
    return scale, curve
