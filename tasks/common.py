"""What every stage needs, rebuilt from the run context (tasks may run in other processes)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

from prefect import Task, get_run_logger

from forgetflow.batching import merge_requests
from forgetflow.config import Params, load_params
from forgetflow.families import Family, get_family
from forgetflow.ledger import Ledger
from forgetflow.registry import Registry
from forgetflow.runs import RunContext
from forgetflow.services import Settings, is_transient, resolve_settings
from forgetflow.storage import ObjectStore
from forgetflow.tracking import RequestRun


@dataclass
class StageEnv:
    ctx: RunContext

    @cached_property
    def params(self) -> Params:
        return load_params(self.ctx.params_path, preset=self.ctx.preset)

    @cached_property
    def settings(self) -> Settings:
        return resolve_settings(self.params, self.ctx.state_dir)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.ctx.state_dir)

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.settings)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.settings.mlflow_uri)

    @cached_property
    def family(self) -> Family:
        return get_family(self.ctx.family)

    @cached_property
    def run(self) -> RequestRun:
        return RequestRun(self.settings.mlflow_uri, self.ctx.mlflow_run_id)

    def request(self):
        """The request this run applies: the union of the batch's requests under the lead's id."""
        return merge_requests([self.ledger.load_request(r) for r in self.ctx.request_ids])


@contextmanager
def timed(ctx: RunContext, stage: str):
    """Record the stage's wall-clock in ctx.durations_s and log it (no request content)."""
    logger = get_run_logger()
    logger.info("%s: %s started", ctx.run_label, stage)
    start = time.perf_counter()
    yield
    ctx.durations_s[stage] = round(time.perf_counter() - start, 2)
    logger.info("%s: %s done in %.1f s", ctx.run_label, stage, ctx.durations_s[stage])


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition for every stage: retry only when a service could not be
    reached (forgetflow.services.is_transient); the delays come from params.yaml
    (orchestration.stage_retry_delays_s, applied by `with_retries`)."""
    return is_transient(state.data if isinstance(state.data, BaseException) else None)


def with_retries(delays_s: tuple[float, ...], *stages: Task) -> list[Task]:
    """The stages with one retry per delay of `delays_s`, taken in turn (a back-off)."""
    return [s.with_options(retries=len(delays_s), retry_delay_seconds=list(delays_s) or 0) for s in stages]
