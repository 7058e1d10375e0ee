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

from forgetflow.runs import RunContext
from tasks.common import StageEnv, timed


class ApprovalTimeout(RuntimeError):
    """Nobody approved the promotion in time."""


def await_approval(ctx: RunContext, gates: list[dict]) -> None:
    env = StageEnv(ctx)
    settings = env.params.orchestration
    if settings.promotion_approval != "manual" or not (gates and all(g["passed"] for g in gates)):
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
