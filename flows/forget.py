"""The forgetflow DAG: one deletion request (or one batch of them) through the six stages.

    [model slot] intake -> synthesize -> unlearn -> calibrate -> evaluate -> (approval) -> promote

The run holds its model's slot, a Prefect global concurrency limit of 1 named
`forgetflow-model-<model>`, from the idempotency check to the end of promote: requests for
one model are applied one after another, each starting from the champion the previous one
produced (DESIGN.md invariant 3), while other models run side by side. Promote still
compares-and-sets @champion, so a run that lost the race anyway fails loudly.

A stage that cannot reach a service (object store, MLflow) is retried after each delay of
orchestration.stage_retry_delays_s; any other error fails it at once. With
orchestration.promotion_approval: manual, a run whose gates all passed pauses before promote
until a person approves it (tasks/approve.py).

On any failure the request is marked `failed` in the ledger with the reason, a report with
status "failed" is written, and @champion stays where it was (only promote moves it, and
only after every gate passed). Rerunning a failed request resumes from its checkpoints.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run

from forgetflow.config import load_params
from forgetflow.families import get_family
from forgetflow.ledger import FINAL_STATES, Ledger, LedgerError
from forgetflow.report import build_report, code_revisions, write_report
from forgetflow.runs import RunContext, request_hash
from forgetflow.tracking import RequestRun
from tasks.approve import await_approval, check_approval_possible
from tasks.calibrate import calibrate
from tasks.common import with_retries
from tasks.evaluate import evaluate
from tasks.intake import intake
from tasks.promote import promote
from tasks.synthesize import synthesize
from tasks.unlearn import unlearn


def _run_name() -> str:
    params = flow_run.parameters
    more = len(params.get("batch") or [])
    return f"forget-{params['model']}-{request_hash(params['request_id'])}" + (f"+{more}" if more else "")


def model_slot_name(model: str) -> str:
    return f"forgetflow-model-{model}"


@contextmanager
def model_slot(model: str, lease_s: float):
    """Hold the model's one slot (created on first use; waits while another run holds it). The
    slot is a lease of `lease_s` seconds that this run renews while it lives, so a run killed
    outright frees its model at most `lease_s` (plus the server's 15 s sweep) later."""
    name = model_slot_name(model)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    with concurrency(name, occupy=1, strict=True, lease_duration=lease_s):
        yield


@flow(name="forget", flow_run_name=_run_name, log_prints=False)
def forget(request_id: str, model: str, state_dir: str, params_path: str | None = None,
           preset: str | None = None, batch: list[str] | None = None) -> dict:
    """Apply an accepted deletion request to the current @champion of `model`; with `batch`
    (the ids of further requests of the same model, oldest first) apply them all in this one
    run, under `request_id`. Members already promoted or rejected are skipped: a request is
    one piece of work however often it is submitted or triggered."""
    ledger = Ledger(state_dir)
    settings = load_params(params_path, preset=preset).orchestration
    check_approval_possible(settings)
    intake_, synthesize_, unlearn_, calibrate_, evaluate_, promote_ = with_retries(
        settings.stage_retry_delays_s, intake, synthesize, unlearn, calibrate, evaluate, promote)
    with model_slot(model, settings.model_slot_lease_s):
        entries = [ledger.get(r) for r in [request_id, *(batch or [])]]
        if wrong := [e.request_id for e in entries if e.model != model]:
            raise LedgerError(f"requests {wrong} are not for model {model}")
        pending = [e for e in entries if e.state not in FINAL_STATES]
        if not pending:
            get_run_logger().info("request %s is already %s", request_hash(request_id), entries[0].state)
            return json.loads(Path(entries[0].report_path).read_text())
        lead = pending[0]
        family = get_family(lead.family)
        ctx = RunContext(request_id=lead.request_id, model=model, family=lead.family,
                         method=lead.method or family.default_method, state_dir=state_dir,
                         params_path=params_path, preset=preset, batch=[e.request_id for e in pending[1:]],
                         started_at=time.time())
        for rid in ctx.request_ids:
            ledger.update(rid, "running", flow_run_id=str(flow_run.id or ""), error=None)
        try:
            ctx = intake_(ctx)
            ctx = synthesize_(ctx)
            ctx = unlearn_(ctx)
            ctx, scale = calibrate_(ctx)
            ctx, metrics, gates = evaluate_(ctx)
            await_approval(ctx, gates)
            return promote_(ctx, scale, metrics, gates)
        except Exception as exc:  # every failure is recorded, then re-raised for Prefect
            _record_failure(ctx, exc)
            raise


def _record_failure(ctx: RunContext, exc: Exception) -> None:
    """The ledger first (the durable truth, a small write), then the failure report: on a
    full or read-only disk the report may not be written, the ledger entry still says why."""
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    logger = get_run_logger()
    logger.error("%s failed: %s", ctx.run_label, reason)
    params = load_params(ctx.params_path, preset=ctx.preset)
    ledger = Ledger(ctx.state_dir)
    for request_id in ctx.request_ids:
        ledger.update(request_id, "failed", error=reason)
    report = build_report(request_id=ctx.request_id, request_ids=ctx.request_ids, status="failed", model=ctx.model, family=ctx.family,
                          method=ctx.method, base_version=ctx.base_version, durations_s=ctx.durations_s,
                          revisions=code_revisions(), error=reason)
    try:
        report_path = write_report(report, Path(params.services.reports_dir) / ctx.request_id)
    except OSError as write_error:
        logger.error("%s: the failure report was not written: %s", ctx.run_label, write_error)
    else:
        for request_id in ctx.request_ids:
            ledger.update(request_id, report_path=str(report_path))
    if ctx.mlflow_run_id:
        try:
            from forgetflow.services import resolve_settings

            run = RequestRun(resolve_settings(params, ctx.state_dir).mlflow_uri, ctx.mlflow_run_id)
            run.tags({"forgetflow.status": "failed"})
            run.end(ok=False)
        except Exception:  # the tracking server may be what failed; the ledger has the truth
            pass
