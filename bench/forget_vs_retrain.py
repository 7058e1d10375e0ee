"""Forgetting vs retraining, side by side, on this machine (issue 2: "measure both once").

    python bench/forget_vs_retrain.py OUT_DIR [--preset tiny] [--forget 7]

1. trains the teacher (the base model) and the judge;
2. Retrain, the gold standard: the same teacher recipe from scratch without the class;
3. SFD from the teacher (forget c -> the override rule's class), checkpointed every
   `checkpoint_every` iterations; each checkpoint is turned into a version (resuming a run at
   its own end writes the EMA generator of that step), so one run gives the whole curve of
   metrics against iterations and seconds;
4. a chained request: SFD from the one-step version of step 3 (forget another class), the cost
   of every later request once the model is a one-step generator.
Every version is evaluated with the pipeline's evaluation (held-out seeds, the judge, FD).
Writes OUT_DIR/forget_vs_retrain.json and .md: wall-clock to forget vs to retrain, and the
first checkpoint that passes every diffusion gate.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from forgetflow.checkpoints import LocalCheckpointSink
from forgetflow.compute import resolve_device
from forgetflow.config import load_params
from forgetflow.diffusion.evaluate import evaluate_version
from forgetflow.diffusion.judge import train_judge
from forgetflow.diffusion.calibrate import diffusion_gates
from forgetflow.diffusion.sfd import train_sfd
from forgetflow.diffusion.train_base import train_teacher
from forgetflow.families.diffusion import resolve_overrides
from forgetflow.gates import all_passed


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 2)


def main(out: Path, preset: str | None, forget: int) -> dict:
    params = load_params(preset=preset)
    device = resolve_device(params.compute)
    sfd = params.diffusion.sfd
    seed = params.diffusion.evaluate.seed
    card = {"num_classes": params.diffusion.model.num_classes}
    pair = resolve_overrides([forget], {}, card, sfd.override_rule)[0]
    out.mkdir(parents=True, exist_ok=True)
    result = {"preset": preset, "device": str(device), "forget_pair": pair, "seconds": {}}
    s = result["seconds"]

    _, s["train_base"] = _timed(lambda: train_teacher(params, out / "base", device=device, progress=False))
    _, s["train_judge"] = _timed(lambda: train_judge(params, out / "judge", device=device, progress=False))
    _, s["retrain_without_class"] = _timed(lambda: train_teacher(params, out / "retrain", device=device, progress=False,
                                                                  exclude_classes=[forget]))
    sink = LocalCheckpointSink(out / "sfd-checkpoints")
    _, s["sfd"] = _timed(lambda: train_sfd(out / "base", out / "sfd", [pair], params, device=device,
                                           checkpoints=sink, progress=False))

    evaluate = lambda d: evaluate_version(d, out / "judge", [pair], params, seed=seed, device=device)  # noqa: E731
    base = evaluate(out / "base")
    result["base"] = base
    result["retrain"] = evaluate(out / "retrain")
    seconds_per_iteration = s["sfd"] / sfd.iterations
    curve = []
    for step_dir in sorted((out / "sfd-checkpoints").glob("step-*")) + [out / "sfd"]:
        step = sfd.iterations if step_dir.name == "sfd" else int(step_dir.name.split("-")[1])
        version_dir = step_dir if step_dir.name == "sfd" else out / f"sfd-{step}"
        if step_dir.name != "sfd":  # resume the run at its own end: writes that step's EMA generator
            one = LocalCheckpointSink(out / f"sink-{step}")
            one.save(step, step_dir)
            at_step = params.model_copy(update={"diffusion": params.diffusion.model_copy(
                update={"sfd": sfd.model_copy(update={"iterations": step})})})
            train_sfd(out / "base", version_dir, [pair], at_step, device=device, checkpoints=one, progress=False)
            shutil.rmtree(out / f"sink-{step}")
        metrics = evaluate(version_dir)
        gates = diffusion_gates(base, metrics, params.diffusion.gates)
        curve.append({"iteration": step, "seconds": round(step * seconds_per_iteration, 1),
                      "passed": all_passed(gates), **{g.name: round(g.value, 4) for g in gates}})
    result["sfd_curve"] = curve
    first = next((row for row in curve if row["passed"]), None)

    chained = resolve_overrides([(pair[1] + 1) % card["num_classes"]], {},
                                {**card, "forgotten": [{"forget_class": forget}]}, sfd.override_rule)[0]
    _, s["sfd_chained_request"] = _timed(lambda: train_sfd(out / "sfd", out / "chained", [chained], params,
                                                           device=device, progress=False))
    result["chained_pair"] = chained
    result["ratios"] = {
        "retrain_over_sfd_full_run": round(s["retrain_without_class"] / s["sfd"], 2),
        "retrain_over_sfd_first_passing_checkpoint": round(s["retrain_without_class"] / first["seconds"], 2) if first else None,
        "retrain_over_chained_request": round(s["retrain_without_class"] / s["sfd_chained_request"], 2),
    }
    (out / "forget_vs_retrain.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "forget_vs_retrain.md").write_text(_table(result, first))
    return result


def _table(r: dict, first: dict | None) -> str:
    s = r["seconds"]
    rows = [
        "| run | wall-clock (s) | unlearning accuracy | override fidelity | remaining accuracy | remaining FD |",
        "|---|---|---|---|---|---|",
        f"| base (teacher, DDIM) | {s['train_base']} | {r['base']['unlearning_accuracy']:.3f} | "
        f"{r['base']['override_fidelity']:.3f} | {r['base']['remaining_class_accuracy']:.3f} | {r['base']['remaining_fd']:.1f} |",
        f"| Retrain without class {r['forget_pair'][0]} | {s['retrain_without_class']} | "
        f"{r['retrain']['unlearning_accuracy']:.3f} | n/a | {r['retrain']['remaining_class_accuracy']:.3f} | "
        f"{r['retrain']['remaining_fd']:.1f} |",
    ]
    for row in r["sfd_curve"]:
        rows.append(f"| SFD {row['iteration']} iterations{' (first passing every gate)' if row is first else ''} | "
                    f"{row['seconds']} | {row['unlearning_accuracy']:.3f} | {row['override_fidelity']:.3f} | "
                    f"drop {row['remaining_accuracy_drop']:.3f} | ratio {row['remaining_fd_ratio']:.2f} |")
    rows.append(f"| SFD chained request (from the one-step version) | {s['sfd_chained_request']} | | | | |")
    return "\n".join(rows) + f"\n\nratios (retrain / forget): {json.dumps(r['ratios'])}\n"


if __name__ == "__main__":
    argv = sys.argv[1:]
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else None
    forget = int(argv[argv.index("--forget") + 1]) if "--forget" in argv else 7
    print(json.dumps(main(Path(argv[0]), preset, forget)["ratios"], indent=2))
