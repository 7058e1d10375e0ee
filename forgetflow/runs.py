"""The working area of one request run and the context the stages pass along.

A run applies one request or a batch of them (forgetflow/batching.py): `request_id` is the
batch's first request, which keys the work folder, the S3 prefix and the MLflow run;
`batch` holds the other members' ids, oldest first.

Stages exchange only this small, JSON-able context (ids, versions, URIs, paths): never
models, never request content. Layout under the state folder::

    runs/<request_id>/base/        the base version, downloaded from the registry
    runs/<request_id>/eval_kit/    the model's evaluation kit (judge), hash-verified
    runs/<request_id>/synth/       forget / replacement data (synthesize)
    runs/<request_id>/new/         the unlearned version (unlearn, then calibrate)
    runs/<request_id>/evaluation/  figures and metric files (calibrate, evaluate)
    cache/                         kept across runs: a teacher's evaluation samples, by content
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RunContext:
    request_id: str
    model: str
    family: str
    method: str
    state_dir: str
    params_path: str | None = None
    preset: str | None = None
    base_version: str | None = None
    mlflow_run_id: str | None = None
    eval_kit_uri: str | None = None
    batch: list[str] = field(default_factory=list)
    durations_s: dict[str, float] = field(default_factory=dict)
    started_at: float | None = None  # epoch seconds the run got its model's slot

    @property
    def work(self) -> Path:
        return Path(self.state_dir) / "runs" / self.request_id

    @property
    def request_ids(self) -> list[str]:
        """Every request this run applies, the lead first."""
        return [self.request_id, *self.batch]

    @property
    def cache_dir(self) -> Path:
        """What families keep across runs (forgetflow/diffusion/sample_cache.py)."""
        return Path(self.state_dir) / "cache"

    @property
    def base_dir(self) -> Path:
        return self.work / "base"

    @property
    def eval_kit_dir(self) -> Path:
        return self.work / "eval_kit"

    @property
    def synth_dir(self) -> Path:
        return self.work / "synth"

    @property
    def new_dir(self) -> Path:
        return self.work / "new"

    @property
    def evaluation_dir(self) -> Path:
        return self.work / "evaluation"

    @property
    def run_label(self) -> str:
        """What Prefect and logs show: the model and a hash of the request id."""
        more = f"+{len(self.batch)}" if self.batch else ""
        return f"{self.model}-{request_hash(self.request_id)}{more}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunContext":
        return cls(**data)


def request_hash(request_id: str) -> str:
    return hashlib.sha256(request_id.encode()).hexdigest()[:10]


def s3_prefix(model: str, request_id: str, part: str) -> str:
    """DESIGN.md S3 layout: <model>/<request_id>/{checkpoints,final,synth}/..."""
    return f"{model}/{request_id}/{part}"
