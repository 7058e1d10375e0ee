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


class ArtifactError(ValueError):
    """A model version directory is missing, incomplete or corrupt; the message names the file."""


class Family(Protocol):
    name: str
    default_method: str

    def methods(self) -> list[str]: ...

    def check_model(self, model_dir: Path) -> None:
        """Raise if model_dir is not a loadable version of this family (before registering)."""

    def check_eval_kit(self, eval_kit: Path) -> None:
        """Raise FileNotFoundError if eval_kit is not this family's evaluation kit."""

    def serving_version(self, model_dir: Path, eval_kit: Path, params: Params, out_dir: Path, *,
                        cache_dir: Path | None = None, progress: bool = True) -> tuple[Path, list[Gate]] | None:
        """A faster version to serve in place of a newly registered model, made once at
        registration and gated against it (diffusion: a one-step generator distilled from a
        multi-step one), or None when the family has nothing to make."""

    def check_target(self, request: DeletionRequest, model_dir: Path, params: Params) -> None:
        """Raise TargetError if the request cannot apply to this model version."""

    def synthesize(self, request: DeletionRequest, model_dir: Path, eval_kit: Path, out_dir: Path,
                   params: Params) -> dict:
        """Write the forget / replacement data to out_dir (no real data for diffusion).
        Returns a summary that is safe to log (no request content)."""

    def unlearn(self, model_dir: Path, synth_dir: Path, out_dir: Path, params: Params, *,
                method: str, base_version: str, checkpoints: CheckpointSink | None, progress: bool) -> Path:
        """Train the unlearned version into out_dir (a model directory whose card points at
        base_version where the family stores versions as deltas)."""

    def calibrate(self, base_dir: Path, new_dir: Path, synth_dir: Path, eval_kit: Path,
                  params: Params, out_dir: Path, *, cache_dir: Path | None = None) -> tuple[float, list[dict]]:
        """Choose the guidance scale on calibration data; write it into new_dir's card.
        cache_dir: where a family may keep what it measured of an unchanged model (the
        diffusion family: its teacher's evaluation samples) for later requests."""

    def evaluate(self, base_dir: Path, new_dir: Path, synth_dir: Path, eval_kit: Path,
                 params: Params, out_dir: Path, *, cache_dir: Path | None = None) -> dict:
        """Held-out metrics {"base": {...}, "new": {...}}, plus figures written to out_dir."""

    def gates(self, metrics: dict, params: Params) -> list[Gate]: ...

    def next_eval_kit(self, eval_kit: Path, synth_dir: Path, out_dir: Path) -> Path | None:
        """The evaluation kit the new version carries, if it differs from the base's."""

    def reverify(self, model_dir: Path, eval_kit: Path, certificate: dict, params: Params, *,
                 base_dir: Path | None = None, subjects: list[dict] | None = None) -> tuple[list[Gate], dict]:
        """(the certificate's forgetting gates re-measured on `model_dir` (e.g. today's
        champion), every attack's record there); `base_dir` is the certified base version,
        `subjects` the names again where the certificate holds only their hashes."""


FAMILIES = ("diffusion", "llm")


def get_family(name: str) -> Family:
    if name == "diffusion":
        from forgetflow.families.diffusion import DiffusionFamily

        return DiffusionFamily()
    if name == "llm":
        from forgetflow.families.llm import LLMFamily

        return LLMFamily()
    raise TargetError(f"unknown model family {name!r}; known: {list(FAMILIES)}")
