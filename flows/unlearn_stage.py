"""Deployment `unlearn-stage`: the unlearn stage as its own flow run, on the pool
`orchestration.unlearn_work_pool` (a GPU pool), started and awaited by the forget flow's
unlearn task (tasks/unlearn.py). It trains exactly what the in-process stage trains, with the
same retries of transient failures (a retry resumes from the newest checkpoint in S3)."""
from __future__ import annotations

from prefect import flow, task
from prefect.runtime import flow_run

from forgetflow.config import load_params
from forgetflow.runs import RunContext, request_hash
from tasks.common import retry_if_transient, with_retries
from tasks.unlearn import train


def _run_name() -> str:
    ctx = flow_run.parameters["ctx"]
    return f"unlearn-{ctx['model']}-{request_hash(ctx['request_id'])}"


@flow(name="unlearn-stage", flow_run_name=_run_name, log_prints=False)
def unlearn_stage(ctx: dict) -> None:
    run_ctx = RunContext(**ctx)
    delays = load_params(run_ctx.params_path, preset=run_ctx.preset).orchestration.stage_retry_delays_s
    train_, = with_retries(delays, task(train, name="train", retry_condition_fn=retry_if_transient))
    train_(run_ctx)
