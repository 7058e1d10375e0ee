"""The deployments, built from params.yaml (the Python equivalent of a prefect.yaml):

    unlearn-on-request   triggered by each `forgetflow.request.accepted` event (flows/triggers.py)
    process-pending      cron `orchestration.process_pending_cron`: batch every model's pending requests
    unlearn-stage        only with `orchestration.unlearn_work_pool`: the unlearn stage of a run as
                         its own flow run on that (GPU) pool (tasks/unlearn.py)

`forgetflow serve` runs them in this process (a Prefect runner: polls the server, executes
up to `orchestration.serve_limit` flow runs at once, so different models run side by side).
`forgetflow deploy` registers them on their work pools (`orchestration.work_pool`, and
`unlearn_work_pool` for the stage), created if missing as `orchestration.work_pool_type`
pools: process, or kubernetes with flows/work_pools.py's job templates for the pods of
infra/k8s/ (the stage's with a GPU), for `prefect worker start --pool <pool>`.
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
from flows.unlearn_stage import unlearn_stage
from flows.work_pools import IMAGE, SERVICE_ENV, STATE_DIR, job_template
from forgetflow.config import Params
from tasks.unlearn import UNLEARN_STAGE

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ON_REQUEST, PROCESS_PENDING = "unlearn-on-request", "process-pending"
FLOWS = {ON_REQUEST: unlearn_on_request, PROCESS_PENDING: process_pending, UNLEARN_STAGE: unlearn_stage}
ENTRYPOINTS = {ON_REQUEST: "flows/on_request.py:unlearn_on_request",
               PROCESS_PENDING: "flows/process_pending.py:process_pending",
               UNLEARN_STAGE: "flows/unlearn_stage.py:unlearn_stage"}


def _settings(params: Params, state_dir: str, params_path: str | None, preset: str | None) -> dict:
    """What every deployment passes its flow runs: absolute paths, valid in any process.
    `unlearn-stage` is deployed only when `orchestration.unlearn_work_pool` is set."""
    orch = params.orchestration
    common = {"state_dir": str(Path(state_dir).resolve()),
              "params_path": str(Path(params_path).resolve()) if params_path else None, "preset": preset}
    settings = {
        ON_REQUEST: {"triggers": [on_request_trigger()], "parameters": common,
                     "description": "Apply one accepted deletion request (after the model's older ones)."},
        PROCESS_PENDING: {"schedule": Cron(orch.process_pending_cron, timezone=orch.timezone), "parameters": common,
                          "description": "Sweep the inbox and apply every pending request, one batched run per model."},
    }
    if orch.unlearn_work_pool:
        settings[UNLEARN_STAGE] = {"description": "The unlearn stage of a forget run, on the GPU pool."}
    return settings


def run_env(params: Params) -> dict[str, str]:
    """Environment of the flow runs a runner or worker starts: runs of different models share
    this machine's cores, so their OpenMP threads wait passively instead of spinning."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", params.orchestration.omp_wait_policy)}


def serve_deployments(params: Params, state_dir: str, params_path: str | None, preset: str | None) -> None:
    os.environ.update(run_env(params))  # the runner's flow-run subprocesses inherit it
    settings = _settings(params, state_dir, params_path, preset)
    # module entrypoints: the runner's subprocesses import the flows whatever the working folder
    serve(*(FLOWS[name].to_deployment(name=name, tags=["forgetflow"], entrypoint_type=EntrypointType.MODULE_PATH, **kw)
            for name, kw in settings.items()),
          limit=params.orchestration.serve_limit, print_starting_message=True)


def deploy_to_pool(params: Params, state_dir: str, params_path: str | None, preset: str | None,
                   work_pool: str | None = None) -> list[str]:
    """Register the deployments on their work pools (created if missing, of
    `orchestration.work_pool_type`): unlearn-stage on `unlearn_work_pool` (a GPU job
    template for a Kubernetes pool), the others on `work_pool`. Returns their ids."""
    from prefect import flow, get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    orch = params.orchestration
    pool = work_pool or orch.work_pool
    kind = orch.work_pool_type
    pools = {name: (orch.unlearn_work_pool if name == UNLEARN_STAGE else pool)
             for name in _settings(params, state_dir, params_path, preset)}
    with get_client(sync_client=True) as client:
        for name, target in pools.items():
            try:
                client.read_work_pool(target)
            except ObjectNotFound:
                gpus = 1 if name == UNLEARN_STAGE else 0
                template = job_template(gpus) if kind == "kubernetes" else {}
                client.create_work_pool(WorkPoolCreate(name=target, type=kind, base_job_template=template))
    if kind == "kubernetes":  # the pods' state volume and the image's params.yaml, not this machine's paths
        state_dir, params_path = STATE_DIR, None
    ids = []
    for name, kw in _settings(params, state_dir, params_path, preset).items():
        # to_deployment + apply, not Flow.deploy: deploy's "any worker online?" hint queries the
        # server with a null page limit, which this server answers 422
        if kind == "kubernetes":  # the code is in the worker image: module entrypoints, no pull steps
            deployment = FLOWS[name].to_deployment(name=name, work_pool_name=pools[name], tags=["forgetflow"],
                                                   entrypoint_type=EntrypointType.MODULE_PATH,
                                                   job_variables={"env": {**SERVICE_ENV, **run_env(params)}}, **kw)
            ids.append(str(deployment.apply(image=IMAGE)))
        else:  # a process worker on this machine runs the code from this checkout
            source = flow.from_source(source=str(PROJECT_ROOT), entrypoint=ENTRYPOINTS[name])
            deployment = source.to_deployment(name=name, work_pool_name=pools[name], tags=["forgetflow"],
                                              job_variables={"env": run_env(params)}, **kw)
            ids.append(str(deployment.apply()))
    return ids
