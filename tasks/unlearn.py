"""Stage 3, unlearn: train the unlearned version (GPU when there is one). Checkpoints go to
S3 every `checkpoint_every` steps; a retried or restarted run resumes from the newest."""
from __future__ import annotations

from prefect import task

from forgetflow.runs import RunContext
from forgetflow.storage import S3CheckpointSink
from tasks.common import StageEnv, retry_if_transient, timed


@task(name="unlearn", retry_condition_fn=retry_if_transient)
def unlearn(ctx: RunContext) -> RunContext:
    env = StageEnv(ctx)
    with timed(ctx, "unlearn"):
        sink = S3CheckpointSink(env.store, ctx.model, ctx.request_id)
        env.family.unlearn(ctx.base_dir, ctx.synth_dir, ctx.new_dir, env.params,
                           method=ctx.method, base_version=ctx.base_version, checkpoints=sink, progress=True)
        env.run.tags({"forgetflow.checkpoint_uri": sink.save_final(ctx.new_dir)})
        log = ctx.new_dir / "training_log.json"
        if log.exists():
            env.run.client.log_artifact(ctx.mlflow_run_id, str(log), "training")
    return ctx
