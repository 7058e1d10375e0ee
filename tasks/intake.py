"""Stage 1, intake: the request (or batch) is in the ledger; mark it running, resolve the base version
(the model's current @champion, or the base of a champion this run already produced), fetch it
and its evaluation kit, check the target fits."""
from __future__ import annotations

from prefect import task

from forgetflow.bootstrap import EVAL_KIT_TAG
from forgetflow.runs import RunContext
from forgetflow.tracking import RequestRun
from tasks.common import StageEnv, retry_if_transient, timed


@task(name="intake", retry_condition_fn=retry_if_transient)
def intake(ctx: RunContext) -> RunContext:
    env = StageEnv(ctx)
    with timed(ctx, "intake"):
        request = env.request()
        champion = env.registry.champion(request.model)  # UnknownModel if not registered
        if champion is None:
            raise LookupError(f"model {request.model} has no @champion version to unlearn from")
        if champion.tags.get("forgetflow.request_ids") == ",".join(ctx.request_ids):
            # an earlier attempt of this very run moved @champion, then died before the ledger
            # heard of it: redo the run on ITS base, so promote finds that version (one version
            # per request, never a second one stacked on the first)
            champion = env.registry.get_version(request.model, champion.tags["forgetflow.base_version"])
        ctx.base_version = champion.version
        ctx.eval_kit_uri = champion.tags.get(EVAL_KIT_TAG)
        if not ctx.eval_kit_uri:
            raise LookupError(f"{request.model} v{champion.version} has no evaluation kit (tag {EVAL_KIT_TAG})")
        env.registry.download(request.model, champion.version, ctx.base_dir)
        env.store.get_dir(ctx.eval_kit_uri, ctx.eval_kit_dir)
        env.family.check_target(request, ctx.base_dir, env.params)
        if ctx.mlflow_run_id is None:
            run = RequestRun.start(env.settings.mlflow_uri, request.model, request.request_id, {
                "forgetflow.family": ctx.family, "forgetflow.method": ctx.method,
                "forgetflow.base_version": ctx.base_version,
                "forgetflow.request_ids": ",".join(ctx.request_ids)})
            ctx.mlflow_run_id = run.run_id
        for request_id in ctx.request_ids:
            env.ledger.update(request_id, "running", base_version=ctx.base_version)
    return ctx
