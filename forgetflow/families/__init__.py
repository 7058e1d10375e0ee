"""Model families: the seam where diffusion and LLM unlearning plug into one pipeline.

The six pipeline stages (tasks/) are family-agnostic: they move files, keep the ledger,
talk to S3 and MLflow. Everything that depends on what the model *is* goes through a
:class:`Family`, chosen by the request's target kind. Every method takes and returns
local paths (never live models), so stages can run in separate processes or pods.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from forgetflow.checkpoints import CheckpointSink
from forgetflow.config import Params
from forgetflow.gates import Gate
from forgetflow.request import DeletionRequest


class TargetError(ValueError):
    """The request names something the model does not have (class, subject, concept)."""


class Family(Protocol):
    name: str
    default_method: str

    def methods(self) -> list[str]: ...

    def check_target(self, request: DeletionRequest, model_dir: Path, params: Params) -> None:
        """Raise TargetError if the request cannot apply to this model version."""

    def synthesize(self, request: DeletionRequest, model_dir: Path, out_dir: Path, params: Params) -> dict:
        """Write the forget / replacement data to out_dir (no real data for diffusion).
        Returns a summary that is safe to log (no request content)."""

    def unlearn(self, model_dir: Path, synth_dir: Path, out_dir: Path, params: Params, *,
                method: str, checkpoints: CheckpointSink | None, progress: bool) -> Path:
        """Train the unlearned version into out_dir (a model directory)."""

    def calibrate(self, base_dir: Path, new_dir: Path, synth_dir: Path, eval_kit: Path,
                  params: Params, out_dir: Path) -> tuple[float, list[dict]]:
        """Choose the guidance scale on calibration data; write it into new_dir's card."""

    def evaluate(self, base_dir: Path, new_dir: Path, synth_dir: Path, eval_kit: Path,
                 params: Params, out_dir: Path) -> dict:
        """Held-out metrics {"base": {...}, "new": {...}}, plus figures written to out_dir."""

    def gates(self, metrics: dict, params: Params) -> list[Gate]: ...


def get_family(name: str) -> Family:
    if name == "diffusion":
        from forgetflow.families.diffusion import DiffusionFamily

        return DiffusionFamily()
    raise TargetError(f"unknown model family {name!r}; known: ['diffusion']")
