"""Stage 5, evaluate: forget and utility metrics of the base and the new version on held-out
seeds / prompts (never the training or calibration ones), and the gates."""
from __future__ import annotations

import json

from prefect import task

from forgetflow.runs import RunContext
from tasks.common import StageEnv, retry_if_transient, timed


@task(name="evaluate", retry_condition_fn=retry_if_transient)
def evaluate(ctx: RunContext) -> tuple[RunContext, dict, list[dict]]:
    env = StageEnv(ctx)
    with timed(ctx, "evaluate"):
        metrics = env.family.evaluate(ctx.base_dir, ctx.new_dir, ctx.synth_dir, ctx.eval_kit_dir,
                                      env.params, ctx.evaluation_dir, cache_dir=ctx.cache_dir)
        gates = [g.to_dict() for g in env.family.gates(metrics, env.params)]
        (ctx.evaluation_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "gates": gates}, indent=2))
        for name in ("base", "new", "reference"):  # reference: the lineage's teacher (chained diffusion)
            if name in metrics:
                env.run.metrics(metrics[name], prefix=f"{name}.")
        env.run.metrics({f"gate.{g['name']}": g["value"] for g in gates if g["value"] is not None})
    return ctx, metrics, gates
