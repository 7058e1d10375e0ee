"""Between evaluate and promote: a person approves the version (orchestration.promotion_approval:
manual). Not a task: the flow run itself pauses (Prefect's pause_flow_run) while holding its
model's slot, so no other request of the model can start from a champion about to change.
Only a version whose gates all passed waits; a rejected one goes straight to promote, which
records it as @challenger evidence. The ledger shows `awaiting-approval` until
`forgetflow approve <id>` (or Resume on the flow run in the Prefect UI); a run not approved
within approval_timeout_s fails with that reason and @champion stays where it was."""
from __future__ import annotations

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.settings import PREFECT_API_URL

from forgetflow.config import OrchestrationParams
from forgetflow.gates import records_passed
from forgetflow.runs import RunContext
from tasks.common import StageEnv, timed


class ApprovalTimeout(RuntimeError):
    """Nobody approved the promotion in time."""


class ApprovalUnavailable(RuntimeError):
    """Manual approval is configured but nobody could give it (no Prefect server)."""


def check_approval_possible(settings: OrchestrationParams) -> None:
    """Refuse a manual-approval run before it trains when there is no Prefect server: a run
    paused on Prefect's ephemeral in-process API cannot be resumed from anywhere else."""
    if settings.promotion_approval == "manual" and not PREFECT_API_URL.value():
        raise ApprovalUnavailable("orchestration.promotion_approval is manual but no Prefect server is configured "
                                  "(PREFECT_API_URL): run `forgetflow up`, or set promotion_approval: auto")


def await_approval(ctx: RunContext, gates: list[dict]) -> None:
    env = StageEnv(ctx)
    settings = env.params.orchestration
    if settings.promotion_approval != "manual" or not records_passed(gates):
        return
    for request_id in ctx.request_ids:
        env.ledger.update(request_id, "awaiting-approval")
    with timed(ctx, "approval"):
        try:
            pause_flow_run(timeout=settings.approval_timeout_s, poll_interval=settings.approval_poll_s,
                           key=f"approve-{ctx.request_id}")
        except FlowPauseTimeout:
            raise ApprovalTimeout(f"not approved within {settings.approval_timeout_s} s; @champion unchanged, "
                                  f"rerun the request to evaluate it again") from None
    for request_id in ctx.request_ids:
        env.ledger.update(request_id, "running")
