"""Deployment `process-pending` (cron from params.yaml): the sweep.

    collect inbox -> plan batches per model -> one forget run per batch (models side by side)

Every pending request of one model goes into as few runs as fit (forgetflow/batching.py:
one training job forgets several classes or several people at once), applied in
submission order. A batch whose targets do not all fit the model (an unknown class, a
class forgotten before) fails at intake before any training; its members are then applied
one by one so that the bad request fails alone, with its own reason.
"""
from __future__ import annotations

from collections import defaultdict

from prefect import flow, get_run_logger, task
from prefect.futures import wait

from flows.forget import forget
from forgetflow.batching import plan_batches
from forgetflow.config import load_params
from forgetflow.families import TargetError
from forgetflow.inbox import collect_inbox
from forgetflow.ledger import Ledger
from forgetflow.registry import UnknownModel
from forgetflow.runs import request_hash
from forgetflow.services import resolve_settings
from forgetflow.storage import ObjectStore


@task(name="collect-inbox", retries=2, retry_delay_seconds=[2, 10])
def collect(state_dir: str, params_path: str | None, preset: str | None) -> int:
    params = load_params(params_path, preset=preset)
    sweep = collect_inbox(ObjectStore(resolve_settings(params, state_dir)), Ledger(state_dir),
                          params.orchestration.inbox_prefix)
    for key, reason in sweep.refused.items():
        get_run_logger().warning("inbox document %s refused: %s", key.rsplit("/", 1)[-1], reason)
    return len(sweep.accepted)


@task(name="apply-model-batches")
def apply_batches(model: str, batches: list[list[str]], state_dir: str, params_path: str | None,
                  preset: str | None) -> list[dict]:
    """Apply one model's batches in order (a task, so that models run side by side)."""
    out = []
    for ids in batches:
        try:
            report = forget(ids[0], model, state_dir, params_path, preset, batch=ids[1:])
            out.append({"request_ids": ids, "status": report["status"]})
        except (TargetError, UnknownModel, LookupError):
            if len(ids) == 1:
                out.append({"request_ids": ids, "status": "failed"})
                continue
            get_run_logger().warning("batch %s does not fit the model; applying its %d requests one by one",
                                     request_hash(ids[0]), len(ids))
            out += apply_batches.fn(model, [[i] for i in ids], state_dir, params_path, preset)
        except Exception:  # recorded in the ledger and the report; the next batch builds on the champion
            out.append({"request_ids": ids, "status": "failed"})
    return out


@flow(name="process-pending", log_prints=False)
def process_pending(state_dir: str, params_path: str | None = None, preset: str | None = None,
                    retry_failed: bool = False) -> list[dict]:
    """Apply every accepted request (and failed ones with `retry_failed`), batched per model."""
    collect(state_dir, params_path, preset)
    ledger = Ledger(state_dir)
    states = ("accepted", "failed") if retry_failed else ("accepted",)
    by_model: dict[str, list] = defaultdict(list)
    for entry in ledger.list():
        if entry.state in states:
            by_model[entry.model].append(ledger.load_request(entry.request_id))
    limit = load_params(params_path, preset=preset).orchestration.max_batch_requests
    futures = [apply_batches.submit(model, [[r.request_id for r in b] for b in plan_batches(requests, limit)],
                                    state_dir, params_path, preset)
               for model, requests in by_model.items()]
    wait(futures)
    return [row for f in futures for row in f.result()]
