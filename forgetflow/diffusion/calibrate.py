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
Text-to-image versions (evaluate_prompts.py), on the retain and forget prompts:
    forget_rate              = new.forget_rate                               <= max
    paraphrase_forget_rate   = new.paraphrase_forget_rate                    <= max
    override_fidelity        = new.override_fidelity (when the judge knows the override) >= min
    remaining_accuracy_drop  = base.retain_accuracy - new.retain_accuracy    <= max
    style_accuracy_drop      = base.style_accuracy - new.style_accuracy      <= max
    remaining_fd_ratio       = new.retain_fd / base.retain_fd                <= max
    nfe_reduction            as above
A forgetting gate whose metric could not be computed fails closed with the reason (never drops
out of the list). The evaluate stage adds the attack gates (DiffusionFamily.gates).
Calibration: evaluate every scale of calibrate.guidance_scales on the calibration seed
(samples_per_class per remaining class) and take the smallest scale whose gates all pass,
else the scale with the largest worst-gate margin.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from forgetflow.config import GateParams, Params
from forgetflow.diffusion.artifact import load_card
from forgetflow.diffusion.evaluate import evaluate_version
from forgetflow.diffusion.evaluate_prompts import evaluate_prompt_version
from forgetflow.gates import Gate, all_passed, metric_gate

CURVE_METRICS = {"class": ("unlearning_accuracy", "override_fidelity", "remaining_class_accuracy", "remaining_fd"),
                 "prompt": ("forget_rate", "paraphrase_forget_rate", "retain_accuracy", "retain_fd")}


def measure_version(version_dir: Path, judge_dir: Path, forget: list[tuple[int, int]] | dict, params: Params, *,
                    seed: int, guidance_scale: float | None = None, device: torch.device | None = None,
                    samples_scale: float = 1.0, cache_dir: Path | None = None, progress: bool = False) -> dict:
    """The metrics of a version: evaluate_version for a class model (forget = class pairs),
    evaluate_prompt_version for a text-to-image one (forget = its prompt spec)."""
    if load_card(version_dir).conditioning == "prompt":
        return evaluate_prompt_version(version_dir, judge_dir, forget, params, seed=seed, guidance_scale=guidance_scale,
                                       device=device, samples_scale=samples_scale, cache_dir=cache_dir,
                                       progress=progress)
    return evaluate_version(version_dir, judge_dir, forget, params, seed=seed, guidance_scale=guidance_scale,
                            device=device, samples_scale=samples_scale, cache_dir=cache_dir, progress=progress)


def diffusion_gates(base_metrics: dict, new_metrics: dict, gate_params: GateParams) -> list[Gate]:
    """The gates above; the forgetting ones only where something is forgotten (a version
    distilled at registration forgets nothing and is gated on quality and NFE alone)."""
    if "retain_accuracy" in new_metrics:
        return prompt_gates(base_metrics, new_metrics, gate_params)
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


def prompt_gates(base_metrics: dict, new_metrics: dict, gate_params: GateParams) -> list[Gate]:
    """A text-to-image version's gates (module docstring)."""
    g, forgetting, attacks = gate_params, [], new_metrics.get("attacks", {})
    if "forget" in attacks:  # a concept was forgotten: its gates fail closed when the judge cannot rate it
        unnamed = attacks["forget"].get("reason", "")
        forgetting.append(metric_gate("forget_rate", new_metrics["forget_rate"], g.forget_rate_max, "max", unnamed))
    if "paraphrase" in attacks:
        forgetting.append(metric_gate("paraphrase_forget_rate", new_metrics["paraphrase_forget_rate"],
                                      g.paraphrase_forget_rate_max, "max", attacks["paraphrase"].get("reason", "")))
    if new_metrics.get("override_fidelity") is not None:  # a free-text override the judge has no class for
        forgetting.append(Gate("override_fidelity", new_metrics["override_fidelity"], g.override_fidelity_min, "min"))
    style = []
    if new_metrics.get("style_accuracy") is not None and base_metrics.get("style_accuracy") is not None:
        style = [Gate("style_accuracy_drop", base_metrics["style_accuracy"] - new_metrics["style_accuracy"],
                      g.style_accuracy_drop_max, "max")]
    return forgetting + [
        Gate("remaining_accuracy_drop", base_metrics["retain_accuracy"] - new_metrics["retain_accuracy"],
             g.remaining_accuracy_drop_max, "max"),
        *style,
        Gate("remaining_fd_ratio", new_metrics["retain_fd"] / base_metrics["retain_fd"], g.remaining_fd_ratio_max, "max"),
        Gate("nfe_reduction", base_metrics["nfe"] / new_metrics["nfe"], g.nfe_reduction_min, "min"),
    ]


def calibrate_guidance(
    version_dir: Path,
    judge_dir: Path,
    forget_pairs: list[tuple[int, int]] | dict,
    params: Params,
    base_metrics: dict,
    *,
    device: torch.device | None = None,
) -> tuple[float, list[dict]]:
    """(chosen guidance scale, one curve row per scale)."""
    cal = params.diffusion.calibrate
    scale = cal.samples_per_class / params.diffusion.evaluate.samples_per_remaining_class
    curve_metrics = CURVE_METRICS[load_card(version_dir).conditioning]
    rows, margins = [], []
    for w in sorted(cal.guidance_scales):
        metrics = measure_version(version_dir, judge_dir, forget_pairs, params, seed=cal.seed,
                                  guidance_scale=w, device=device, samples_scale=scale)
        gates = diffusion_gates(base_metrics, metrics, params.diffusion.gates)
        rows.append({
            "guidance_scale": w,
            **{k: metrics[k] for k in curve_metrics},
            "passed": all_passed(gates),
            "gates": [g.to_dict() for g in gates],
        })
        margins.append(min(g.margin for g in gates))
    passing = [row["guidance_scale"] for row in rows if row["passed"]]
    if passing:
        return passing[0], rows
    return rows[max(range(len(rows)), key=margins.__getitem__)]["guidance_scale"], rows


def calibrate_version(version_dir: Path, reference_dir: Path, judge_dir: Path,
                      forget_pairs: list[tuple[int, int]] | dict, params: Params, *, device: torch.device | None = None,
                      cache_dir: Path | None = None) -> tuple[float, list[dict]]:
    """Calibrate `version_dir` against `reference_dir` (the lineage's DDPM teacher, measured on
    the calibration seed) and write the chosen scale into its model card; (scale, curve).
    forget_pairs: class pairs, or a text-to-image model's prompt spec."""
    cal = params.diffusion.calibrate
    reference = measure_version(reference_dir, judge_dir, forget_pairs, params, seed=cal.seed, device=device,
                                samples_scale=cal.samples_per_class / params.diffusion.evaluate.samples_per_remaining_class,
                                cache_dir=cache_dir)
    scale, curve = calibrate_guidance(version_dir, judge_dir, forget_pairs, params, reference, device=device)
    card_path = Path(version_dir) / "model_card.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "guidance_scale": scale}, indent=2))
    return scale, curve
