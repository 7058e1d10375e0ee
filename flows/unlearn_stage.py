"""Deployment `unlearn-stage`: the unlearn stage as its own flow run, on the pool
`orchestration.unlearn_work_pool` (a GPU pool), started and awaited by the forget flow's
unlearn task (tasks/unlearn.py). It trains exactly what the in-process stage trains."""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from forgetflow.runs import RunContext, request_hash
from tasks.unlearn import train


def _run_name() -> str:
    ctx = flow_run.parameters["ctx"]
    return f"unlearn-{ctx['model']}-{request_hash(ctx['request_id'])}"


@flow(name="unlearn-stage", flow_run_name=_run_name, log_prints=False)
def unlearn_stage(ctx: dict) -> None:
    train(RunContext(**ctx))
