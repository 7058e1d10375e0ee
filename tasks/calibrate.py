"""Stage 4, calibrate: sweep the guidance scale on calibration seeds / prompts and pick one
by the rule in params.yaml; the curve is plotted and logged."""
from __future__ import annotations

import json

from prefect import task

from forgetflow.plots import plot_guidance_curve
from forgetflow.runs import RunContext
from tasks.common import StageEnv, retry_if_transient, timed


@task(name="calibrate", retry_condition_fn=retry_if_transient)
def calibrate(ctx: RunContext) -> tuple[RunContext, float]:
    env = StageEnv(ctx)
    with timed(ctx, "calibrate"):
        scale, curve = env.family.calibrate(ctx.base_dir, ctx.new_dir, ctx.synth_dir, ctx.eval_kit_dir,
                                            env.params, ctx.evaluation_dir, cache_dir=ctx.cache_dir)
        ctx.evaluation_dir.mkdir(parents=True, exist_ok=True)
        (ctx.evaluation_dir / "guidance_curve.json").write_text(json.dumps(curve, indent=2))
        plot_guidance_curve(curve, scale, ctx.evaluation_dir / "guidance_curve.png")
        for step, row in enumerate(curve):
            env.run.metrics({k: v for k, v in row.items() if k != "passed"}, prefix="calibrate.", step=step)
        env.run.metrics({"guidance_scale": scale})
    return ctx, scale
