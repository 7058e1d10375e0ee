"""Batching: several pending deletion requests of one model applied by ONE unlearning run.

Both methods forget a set at once (SFD: several (forget, override) class pairs in one
distillation; CFG-ORPO: several subjects' forget rows in one adapter), so a sweep of N
pending requests costs one training job, not N. A batch is the union of its requests'
targets under the id of its first (oldest) request, which keys the run's work folder, S3
prefix and MLflow run; every member keeps its own ledger entry, state and key.

Requests fit one batch only when the union is itself a valid request: same model, family,
method, override rule (diffusion) or scope (LLM), no override class that another member
forgets, no person listed with conflicting known values. A text-to-image concept request runs
alone: a request names one concept, and the version's card keeps it under that request's salt.
Batches keep submission order: a request that does not fit starts the next batch, so requests
are still applied in order.
"""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from forgetflow.request import DeletionRequest, DiffusionClassTarget, DiffusionConceptTarget, LLMSubjectsTarget


class BatchError(ValueError):
    """These requests cannot be applied by one run; the message says why (no request content)."""


def _same(requests: Sequence[DeletionRequest], what: str, value) -> None:
    values = {value(r) for r in requests}
    if len(values) > 1:
        raise BatchError(f"the requests differ in {what}")


def _diffusion_union(targets: list[DiffusionClassTarget]) -> dict:
    classes: list[int] = []
    override: dict[int, int] = {}
    for t in targets:
        classes += [c for c in t.classes if c not in classes]
        for forget, to in t.override.items():
            if override.setdefault(forget, to) != to:
                raise BatchError(f"class {forget} has two different override classes")
    return {"kind": "diffusion-class", "classes": classes, "override": override,
            "override_rule": targets[0].override_rule}


def _llm_union(targets: list[LLMSubjectsTarget]) -> dict:
    subjects: dict[str, dict] = {}
    for t in targets:
        for s in t.subjects:
            known = subjects.setdefault(s.name.lower(), {"name": s.name, "values": {}})
            for field, value in s.values.items():
                if known["values"].setdefault(field, value) != value:
                    raise BatchError(f"a subject is listed twice with different known {field} values")
    return {"kind": "llm-subjects", "scope": targets[0].scope, "subjects": list(subjects.values())}


def merge_requests(requests: Sequence[DeletionRequest]) -> DeletionRequest:
    """The union of `requests` as one request under the first one's id (BatchError if they
    cannot share a run)."""
    if not requests:
        raise BatchError("an empty batch")
    if len(requests) == 1:
        return requests[0]
    _same(requests, "model", lambda r: r.model)
    _same(requests, "target kind", lambda r: r.target.kind)
    _same(requests, "method", lambda r: r.method)
    targets = [r.target for r in requests]
    if isinstance(targets[0], DiffusionConceptTarget):
        raise BatchError("a concept request runs alone (one concept per request)")
    if isinstance(targets[0], DiffusionClassTarget):
        _same(requests, "override rule", lambda r: r.target.override_rule)
        target = _diffusion_union(targets)
    else:
        _same(requests, "scope", lambda r: r.target.scope)
        target = _llm_union(targets)
    lead = requests[0]
    try:
        return DeletionRequest.model_validate({
            "request_id": lead.request_id, "model": lead.model, "target": target, "method": lead.method,
            "requester": "forgetflow batch", "reason": f"batch of {len(requests)} requests"})
    except ValidationError as exc:  # e.g. one member's override class is another member's forget class
        raise BatchError("their union is not a valid request: " + exc.errors()[0]["msg"]) from None


def plan_batches(requests: Sequence[DeletionRequest], max_requests: int) -> list[list[DeletionRequest]]:
    """Split one model's pending requests (oldest first) into consecutive batches that each
    fit one run, at most `max_requests` long."""
    batches: list[list[DeletionRequest]] = []
    for request in requests:
        current = batches[-1] if batches else None
        if current is not None and len(current) < max_requests:
            try:
                merge_requests([*current, request])
                current.append(request)
                continue
            except BatchError:
                pass
        batches.append([request])
    return batches
