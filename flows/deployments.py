"""The two deployments, built from params.yaml (the Python equivalent of a prefect.yaml):

    unlearn-on-request   triggered by each `forgetflow.request.accepted` event (flows/triggers.py)
    process-pending      cron `orchestration.process_pending_cron`: batch every model's pending requests

`forgetflow serve` runs both in this process (a Prefect runner: polls the server, executes
up to `orchestration.serve_limit` flow runs at once, so different models run side by side).
`forgetflow deploy` registers the same two on the work pool `orchestration.work_pool`
(created if missing, as a `orchestration.work_pool_type` pool: process, or kubernetes with
flows/work_pools.py's job template for the pods of infra/k8s/) for `prefect worker start
--pool <pool>`.
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import serve
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.on_request import unlearn_on_request
from flows.process_pending import process_pending
from flows.triggers import on_request_trigger
from flows.work_pools import IMAGE, SERVICE_ENV, STATE_DIR, job_template
from forgetflow.config import Params

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ON_REQUEST, PROCESS_PENDING = "unlearn-on-request", "process-pending"
ENTRYPOINTS = {ON_REQUEST: "flows/on_request.py:unlearn_on_request",
               PROCESS_PENDING: "flows/process_pending.py:process_pending"}


def _settings(params: Params, state_dir: str, params_path: str | None, preset: str | None) -> dict:
    """What every deployment passes its flow runs: absolute paths, valid in any process."""
    orch = params.orchestration
    common = {"state_dir": str(Path(state_dir).resolve()),
              "params_path": str(Path(params_path).resolve()) if params_path else None, "preset": preset}
    return {
        ON_REQUEST: {"triggers": [on_request_trigger()], "parameters": common,
                     "description": "Apply one accepted deletion request (after the model's older ones)."},
        PROCESS_PENDING: {"schedule": Cron(orch.process_pending_cron, timezone=orch.timezone), "parameters": common,
                          "description": "Sweep the inbox and apply every pending request, one batched run per model."},
    }


def run_env(params: Params) -> dict[str, str]:
    """Environment of the flow runs a runner or worker starts: runs of different models share
    this machine's cores, so their OpenMP threads wait passively instead of spinning."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", params.orchestration.omp_wait_policy)}


def serve_deployments(params: Params, state_dir: str, params_path: str | None, preset: str | None) -> None:
    flows = {ON_REQUEST: unlearn_on_request, PROCESS_PENDING: process_pending}
    os.environ.update(run_env(params))  # the runner's flow-run subprocesses inherit it
    settings = _settings(params, state_dir, params_path, preset)
    # module entrypoints: the runner's subprocesses import the flows whatever the working folder
    serve(*(flows[name].to_deployment(name=name, tags=["forgetflow"], entrypoint_type=EntrypointType.MODULE_PATH, **kw)
            for name, kw in settings.items()),
          limit=params.orchestration.serve_limit, print_starting_message=True)


def deploy_to_pool(params: Params, state_dir: str, params_path: str | None, preset: str | None,
                   work_pool: str | None = None) -> list[str]:
    """Register both deployments on a work pool; returns their ids."""
    from prefect import flow, get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    pool = work_pool or params.orchestration.work_pool
    kind = params.orchestration.work_pool_type
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            template = job_template() if kind == "kubernetes" else {}
            client.create_work_pool(WorkPoolCreate(name=pool, type=kind, base_job_template=template))
    ids = []
    flows = {ON_REQUEST: unlearn_on_request, PROCESS_PENDING: process_pending}
    if kind == "kubernetes":  # the pods' state volume and the image's params.yaml, not this machine's paths
        state_dir, params_path = STATE_DIR, None
    for name, kw in _settings(params, state_dir, params_path, preset).items():
        # to_deployment + apply, not Flow.deploy: deploy's "any worker online?" hint queries the
        # server with a null page limit, which this server answers 422
        if kind == "kubernetes":  # the code is in the worker image: module entrypoints, no pull steps
            deployment = flows[name].to_deployment(name=name, work_pool_name=pool, tags=["forgetflow"],
                                                   entrypoint_type=EntrypointType.MODULE_PATH,
                                                   job_variables={"env": {**SERVICE_ENV, **run_env(params)}}, **kw)
            ids.append(str(deployment.apply(image=IMAGE)))
        else:  # a process worker on this machine runs the code from this checkout
            source = flow.from_source(source=str(PROJECT_ROOT), entrypoint=ENTRYPOINTS[name])
            deployment = source.to_deployment(name=name, work_pool_name=pool, tags=["forgetflow"],
                                              job_variables={"env": run_env(params)}, **kw)
            ids.append(str(deployment.apply()))
    return ids
