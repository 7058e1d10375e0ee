"""The forgetflow DAG: one deletion request through the six stages.

    intake -> synthesize -> unlearn -> calibrate -> evaluate -> promote

On any failure the request is marked `failed` in the ledger with the reason, a report with
status "failed" is written, and @champion stays where it was (only promote moves it, and
only after every gate passed). Rerunning a failed request resumes from its checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from forgetflow.config import load_params
from forgetflow.families import get_family
from forgetflow.ledger import FINAL_STATES, Ledger
from forgetflow.report import build_report, code_revisions, write_report
from forgetflow.runs import RunContext, request_hash
from forgetflow.tracking import RequestRun
from tasks.calibrate import calibrate
from tasks.evaluate import evaluate
from tasks.intake import intake
from tasks.promote import promote
from tasks.synthesize import synthesize
from tasks.unlearn import unlearn


def _run_name() -> str:
    params = flow_run.parameters
    return f"forget-{params['model']}-{request_hash(params['request_id'])}"


@flow(name="forget", flow_run_name=_run_name, log_prints=False)
def forget(request_id: str, model: str, state_dir: str, params_path: str | None = None,
           preset: str | None = None) -> dict:
    """Apply one accepted deletion request to the current @champion of `model`."""
    ledger = Ledger(state_dir)
    entry = ledger.get(request_id)
    if entry.state in FINAL_STATES:  # idempotent: a request is one piece of work
        get_run_logger().info("request %s is already %s", request_hash(request_id), entry.state)
        return json.loads(Path(entry.report_path).read_text())
    family = get_family(entry.family)
    ctx = RunContext(request_id=request_id, model=model, family=entry.family,
                     method=entry.method or family.default_method, state_dir=state_dir,
                     params_path=params_path, preset=preset)
    ledger.update(request_id, "running", flow_run_id=str(flow_run.id or ""), error=None)
    try:
        ctx = intake(ctx)
        ctx = synthesize(ctx)
        ctx = unlearn(ctx)
        ctx, scale = calibrate(ctx)
        ctx, metrics, gates = evaluate(ctx)
        return promote(ctx, scale, metrics, gates)
    except Exception as exc:  # every failure is recorded, then re-raised for Prefect
        _record_failure(ctx, exc)
        raise


def _record_failure(ctx: RunContext, exc: Exception) -> None:
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    get_run_logger().error("%s failed: %s", ctx.run_label, reason)
    params = load_params(ctx.params_path, preset=ctx.preset)
    report = build_report(request_id=ctx.request_id, status="failed", model=ctx.model, family=ctx.family,
                          method=ctx.method, base_version=ctx.base_version, durations_s=ctx.durations_s,
                          revisions=code_revisions(), error=reason)
    report_path = write_report(report, Path(params.services.reports_dir) / ctx.request_id)
    Ledger(ctx.state_dir).update(ctx.request_id, "failed", error=reason, report_path=str(report_path))
    if ctx.mlflow_run_id:
        try:
            from forgetflow.services import resolve_settings

            run = RequestRun(resolve_settings(params, ctx.state_dir).mlflow_uri, ctx.mlflow_run_id)
            run.tags({"forgetflow.status": "failed"})
            run.end(ok=False)
        except Exception:  # the tracking server may be what failed; the ledger has the truth
            pass
