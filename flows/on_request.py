"""Deployment `unlearn-on-request`: the flow a request's accepted event triggers.

It applies the model's older accepted requests first and then its own, each as its own
version (forget holds the model's slot, so whichever run gets the slot applies the next
request and the others find it done). Triggers that fire out of order, or twice, still
apply every request once and in submission order.
"""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.forget import forget
from forgetflow.ledger import Ledger
from forgetflow.runs import request_hash


def _run_name() -> str:
    return f"on-request-{request_hash(flow_run.parameters['request_id'])}"


@flow(name="unlearn-on-request", flow_run_name=_run_name, log_prints=False)
def unlearn_on_request(request_id: str, state_dir: str, params_path: str | None = None,
                       preset: str | None = None) -> dict:
    ledger = Ledger(state_dir)
    entry = ledger.get(request_id)
    older = [e for e in ledger.list(model=entry.model, state="accepted") if e.created < entry.created]
    for e in older:
        try:
            forget(e.request_id, e.model, state_dir, params_path, preset)
        except Exception:  # recorded in the ledger and its report by forget itself
            get_run_logger().warning("older request %s failed; applying %s on the current champion",
                                     request_hash(e.request_id), request_hash(request_id))
    return forget(request_id, entry.model, state_dir, params_path, preset)
