"""MLflow tracking for a request: one run per request in the experiment of its model.

Only ids, hyperparameters, metrics and artifacts that carry no request content are
logged (DESIGN.md invariant 6); run names use the request id, never a subject.
"""
from __future__ import annotations

import math
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class RequestRun:
    """A thin handle on the MLflow run of one request (created at intake, reused after)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    @classmethod
    def start(cls, tracking_uri: str, model: str, request_id: str, tags: dict[str, str]) -> "RequestRun":
        client = MlflowClient(tracking_uri)
        name = f"forgetflow/{model}"
        experiment = client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(name)
        # an earlier run of this request still RUNNING died without ending (a killed process):
        # this one holds the model's slot, so no other run of the request is alive
        for stale in client.search_runs([exp_id], f"tags.`forgetflow.request_id` = '{request_id}' "
                                                  "and attributes.status = 'RUNNING'"):
            client.set_terminated(stale.info.run_id, "KILLED")
        run = client.create_run(exp_id, run_name=request_id, tags={"forgetflow.request_id": request_id, **tags})
        return cls(tracking_uri, run.info.run_id)

    def params(self, params: dict) -> None:
        for key, value in _flatten(params).items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def metrics(self, metrics: dict, prefix: str = "", step: int = 0) -> None:
        for key, value in _flatten(metrics, prefix).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.client.log_metric(self.run_id, key, float(value), step=step)

    def tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def end(self, ok: bool) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(self.run_id, status=status)
