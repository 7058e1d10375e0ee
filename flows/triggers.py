"""How a new request reaches the pipeline by itself: a Prefect event and the trigger on it.

`forgetflow request submit` and POST /requests record the request in the ledger first
(DESIGN.md invariant 1), then emit `forgetflow.request.accepted` for a request that is new;
the trigger of the `unlearn-on-request` deployment (flows/deployments.py) starts a flow run
for it. A duplicate submission emits nothing, so it starts nothing. Should the event not
reach the server, the request is still safe in the ledger and the scheduled
`process-pending` sweep applies it.

The event names the request by id (as the ledger and the flow parameters do); the request
document, which names the people, never leaves the ledger.
"""
from __future__ import annotations

from prefect.events import emit_event
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.settings import PREFECT_API_URL

from forgetflow.ledger import Entry, Ledger
from forgetflow.request import DeletionRequest
from forgetflow.runs import request_hash

REQUEST_ACCEPTED = "forgetflow.request.accepted"
RESOURCE_PREFIX = "forgetflow.request."


def announce_accepted(entry: Entry) -> bool:
    """Emit the accepted event; False when no Prefect server is configured (the ephemeral
    API runs no automations, so only the sweep would pick the request up)."""
    if not PREFECT_API_URL.value():
        return False
    event = emit_event(
        REQUEST_ACCEPTED,
        resource={"prefect.resource.id": RESOURCE_PREFIX + request_hash(entry.request_id),
                  "prefect.resource.name": f"{entry.model}-{request_hash(entry.request_id)}",
                  "forgetflow.model": entry.model, "forgetflow.family": entry.family},
        payload={"request_id": entry.request_id, "model": entry.model},
    )
    return event is not None


def submit_request(request: DeletionRequest, ledger: Ledger) -> tuple[Entry, bool, bool]:
    """Record `request` and announce it if it is new: (entry, created, announced)."""
    entry, created = ledger.submit(request)
    return entry, created, created and announce_accepted(entry)


def on_request_trigger() -> DeploymentEventTrigger:
    """Run the deployment once per accepted event, with the event's request id."""
    return DeploymentEventTrigger(
        name="request accepted",
        expect={REQUEST_ACCEPTED},
        match={"prefect.resource.id": RESOURCE_PREFIX + "*"},
        parameters={"request_id": "{{ event.payload.request_id }}"},
    )
