"""Stage 2, synthesize: the family builds the forget / replacement data from the request
and the base model alone (data-free for diffusion). A copy sealed with the request's key
(forgetflow/sealing.py) goes to <sealed_data_dir>/<request_id>/synth (the forget stages of
dvc.yaml version it) and to S3 beside the run: unreadable once the request is final."""
from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from forgetflow.runs import RunContext, s3_prefix
from forgetflow.sealing import seal_dir
from tasks.common import StageEnv, retry_if_transient, timed


@task(name="synthesize", retry_condition_fn=retry_if_transient)
def synthesize(ctx: RunContext) -> RunContext:
    env = StageEnv(ctx)
    with timed(ctx, "synthesize"):
        summary = env.family.synthesize(env.request(), ctx.base_dir, ctx.eval_kit_dir, ctx.synth_dir, env.params)
        sealed = Path(env.params.services.sealed_data_dir) / ctx.request_id / "synth"
        shutil.rmtree(sealed, ignore_errors=True)
        seal_dir(ctx.synth_dir, sealed, env.ledger.request_key(ctx.request_id))
        env.store.put_dir(sealed, s3_prefix(ctx.model, ctx.request_id, "synth"))
        env.run.metrics(summary, prefix="synth.")
    return ctx
