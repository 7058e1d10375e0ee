"""Stage 3, unlearn: train the unlearned version (GPU when there is one). Checkpoints go to
S3 every `checkpoint_every` steps; a retried or restarted run resumes from the newest.

With `orchestration.unlearn_work_pool` set, the training runs as its own flow run of the
deployment `unlearn-stage` (flows/unlearn_stage.py) on that pool, e.g. a GPU pool, while
this task waits for it: only the stage that needs a GPU holds one. Both share the state
folder (the run's working files), so the stage writes the new version where the next
stages read it."""
from __future__ import annotations

from dataclasses import asdict

from prefect import task

from forgetflow.runs import RunContext
from forgetflow.storage import S3CheckpointSink
from tasks.common import StageEnv, retry_if_transient, timed

UNLEARN_STAGE = "unlearn-stage"


class StageFailed(RuntimeError):
    """The remote unlearn stage ended in another state than Completed."""


def train(ctx: RunContext) -> RunContext:
    """The training itself, wherever it runs: in this task or in the stage's flow run."""
    env = StageEnv(ctx)
    sink = S3CheckpointSink(env.store, ctx.model, ctx.request_id)
    env.family.unlearn(ctx.base_dir, ctx.synth_dir, ctx.new_dir, env.params,
                       method=ctx.method, base_version=ctx.base_version, checkpoints=sink, progress=True)
    env.run.tags({"forgetflow.checkpoint_uri": sink.save_final(ctx.new_dir)})
    log = ctx.new_dir / "training_log.json"
    if log.exists():
        env.run.client.log_artifact(ctx.mlflow_run_id, str(log), "training")
    return ctx


@task(name="unlearn", retry_condition_fn=retry_if_transient)
def unlearn(ctx: RunContext) -> RunContext:
    env = StageEnv(ctx)
    with timed(ctx, "unlearn"):
        if env.params.orchestration.unlearn_work_pool is None:
            return train(ctx)
        from prefect.deployments import run_deployment

        run = run_deployment(f"{UNLEARN_STAGE}/{UNLEARN_STAGE}", parameters={"ctx": asdict(ctx)}, timeout=None)
        if not run.state.is_completed():
            raise StageFailed(f"unlearn stage run {run.name} ended {run.state.name}: "
                              f"{(run.state.message or '').splitlines()[0][:300] if run.state.message else ''}")
    return ctx
