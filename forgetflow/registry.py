"""The MLflow model registry as forgetflow uses it (MLflow 3: aliases, no stages).

One registered model per served model. A version is a forgetflow model directory (the folder
holding `model_card.json`) logged as a pyfunc model (`forgetflow/pyfunc.py`, artifact
"model"), with tags carrying its lineage. Aliases: `champion` is what consumers load
(`models:/<name>@champion`), `challenger` the latest candidate.

Ordering (DESIGN.md invariant 3): `move_champion_if` is a compare-and-set on @champion.
MLflow has no atomic compare-and-set on aliases, so it is check-then-set: it is only safe
while the caller holds the model's lock (forgetflow.locks), which every promotion takes, so
no other forgetflow process can move @champion between the check and the set.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from forgetflow.services import ServiceUnavailable, mlflow_gave_up, probe_mlflow
from forgetflow.storage import move_into

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_CARD = "model_card.json"
LINEAGE_FILE = "lineage.json"
PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
_RUNTIME_PACKAGES = ("mlflow", "numpy", "pandas", "torch", "diffusers", "transformers", "peft", "safetensors")


class UnknownModel(LookupError):
    """The registered model (or version) does not exist; the message names what does."""


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    tags: dict[str, str] = field(default_factory=dict)
    source: str = ""
    run_id: str | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    model_id: str | None = None
    created_ms: int = 0

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Use `uri` for MLflow's fluent API inside the block only, restoring both the global URI
    and the MLFLOW_TRACKING_URI variable after (MLflow's own `_use_tracking_uri` unsets the
    variable on exit when no global URI was set before: the user's setting would be lost)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    global_before = getattr(tracking_utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(global_before)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def _requirements() -> list[str]:
    """Pinned runtime requirements of the pyfunc model (given explicitly: MLflow's inference
    would load the model in a subprocess at every registration)."""
    out = []
    for name in _RUNTIME_PACKAGES:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _connection_errors() -> tuple[type[BaseException], ...]:
    try:
        import requests

        return (requests.exceptions.ConnectionError,)
    except ImportError:  # pragma: no cover
        return (ConnectionError,)


def _signature(model_dir: Path):
    """The pyfunc signature by family (diffusion: rows of label, or of prompt for a text-to-image
    model, + optional seed; llm: rows of
    prompt + optional system prompt, and max_new_tokens; both take the guidance scale as a
    parameter, negative = the version's calibrated scale)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    card = json.loads((model_dir / MODEL_CARD).read_text())
    family = card.get("family", "diffusion")
    if family == "llm":
        return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "system", required=False)]),
                              params=ParamSchema([ParamSpec("guidance_scale", "double", -1.0),
                                                  ParamSpec("max_new_tokens", "long", 64)]))
    if family != "diffusion":
        return None
    if card.get("conditioning") == "prompt":  # text-to-image: rows of prompt + optional seed
        return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
                              params=ParamSchema([ParamSpec("guidance_scale", "double", -1.0)]))
    return ModelSignature(inputs=Schema([ColSpec("long", "label"), ColSpec("long", "seed", required=False)]),
                          params=ParamSchema([ParamSpec("guidance_scale", "double", -1.0)]))


def _model_id(source: str | None) -> str | None:
    """`models:/m-...` (an MLflow 3 logged model) -> its id."""
    if source and source.startswith("models:/m-") and "/" not in source[len("models:/"):]:
        return source[len("models:/"):]
    return None


class Registry:
    def __init__(self, tracking_uri: str, *, probe: bool = True):
        if not tracking_uri:
            raise ServiceUnavailable("no MLflow tracking URI: run `forgetflow up` or set MLFLOW_TRACKING_URI")
        if probe:
            probe_mlflow(tracking_uri)
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # ---- errors -------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._errors():
            return sorted(m.name for m in self.client.search_registered_models())

    def _unknown(self, name: str) -> UnknownModel:
        try:
            known = self.names()
        except Exception:  # the message is what matters here
            known = []
        listing = ", ".join(known) if known else "none yet"
        return UnknownModel(f"unknown model {name!r} in the registry at {self.tracking_uri}; "
                            f"registered models: {listing}")

    @contextlib.contextmanager
    def _errors(self, name: str | None = None, version: str | None = None) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            code = getattr(exc, "error_code", "")
            text = str(exc)
            if name and code == "RESOURCE_DOES_NOT_EXIST":
                if version is not None and self._exists(name):
                    known = [v.version for v in self.versions(name)]
                    raise UnknownModel(f"model {name!r} has no version {version}; versions: "
                                       f"{', '.join(known) or 'none'}") from exc
                raise self._unknown(name) from exc
            if mlflow_gave_up(text):
                raise ServiceUnavailable(f"MLflow at {self.tracking_uri} is not reachable; run `forgetflow up` "
                                         f"or check MLFLOW_TRACKING_URI ({text.splitlines()[0][:200]})") from exc
            raise
        except _connection_errors() as exc:
            raise ServiceUnavailable(f"MLflow at {self.tracking_uri} is not reachable: {exc}") from exc

    def _exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException:
            return False

    # ---- reading ------------------------------------------------------------------------
    def _aliases(self, name: str) -> dict[str, str]:
        with self._errors(name):
            return {a: str(v) for a, v in (self.client.get_registered_model(name).aliases or {}).items()}

    def _info(self, mv, aliases: dict[str, str]) -> ModelVersionInfo:
        version = str(mv.version)
        return ModelVersionInfo(name=mv.name, version=version, tags=dict(mv.tags or {}), source=mv.source or "",
                                run_id=mv.run_id or None, aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
                                description=mv.description or "", model_id=getattr(mv, "model_id", None) or _model_id(mv.source),
                                created_ms=int(mv.creation_timestamp or 0))

    def get_version(self, name: str, version: str | int) -> ModelVersionInfo:
        aliases = self._aliases(name)
        with self._errors(name, str(version)):
            return self._info(self.client.get_model_version(name, str(version)), aliases)

    def versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of `name`, oldest first."""
        aliases = self._aliases(name)  # UnknownModel if not registered
        escaped = name.replace("\\", "\\\\").replace("'", "\\'")
        found = []
        with self._errors(name):
            token = None
            while True:
                page = self.client.search_model_versions(f"name='{escaped}'", page_token=token)
                found += list(page)
                token = getattr(page, "token", None)
                if not token:
                    break
        return sorted((self._info(mv, aliases) for mv in found if mv.name == name), key=lambda v: int(v.version))

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version `alias` points to, None if unset; UnknownModel if `name` is unknown."""
        return self._aliases(name).get(alias)

    def champion(self, name: str) -> ModelVersionInfo | None:
        version = self.alias_version(name, CHAMPION)
        return None if version is None else self.get_version(name, version)

    def download(self, name: str, version: str | int, dst: str | Path) -> Path:
        """The model directory of a version as it was registered (with model_card.json), into
        `dst` itself (created; entries of the same name are replaced). Returns dst.

        A version stored as a delta (its card names a `parent_version`, e.g. an LLM LoRA
        adapter) gets its lineage materialised: the parent under `dst/parent/`, recursively."""
        import mlflow
        from mlflow.models import Model

        info = self.get_version(name, version)
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dst.parent))
        try:
            with self._errors(name, str(version)), _tracking_uri(self.tracking_uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.uri, dst_path=str(staging),
                                                                 tracking_uri=self.tracking_uri))
            flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
            rel = (flavor.get("artifacts", {}).get("model", {}) or {}).get("path")
            if not rel or not (local / rel / MODEL_CARD).exists():
                raise UnknownModel(f"{name} v{info.version} is not a forgetflow model (no '{MODEL_CARD}' in its "
                                   f"'model' artifact)")
            move_into(local / rel, dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        parent = json.loads((dst / MODEL_CARD).read_text()).get("parent_version")
        if parent:
            self.download(name, parent, dst / "parent")
        return dst

    # ---- writing ------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def register(self, name: str, model_dir: str | Path, *, run_id: str | None = None,
                 tags: dict[str, str] | None = None, description: str = "") -> str:
        """Log `model_dir` as a pyfunc model in run `run_id` (or a new run in experiment
        `forgetflow/<name>`), register it as a new version of `name` with `tags`; returns
        the version. Aliases are not touched."""
        import mlflow
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException

        model_dir = Path(model_dir)
        if not (model_dir / MODEL_CARD).is_file():
            raise FileNotFoundError(f"{model_dir} has no {MODEL_CARD}: not a forgetflow model directory")
        if (model_dir / "parent").exists():
            raise ValueError(f"{model_dir} holds a materialised parent/: register the version directory itself")
        tags = {k: str(v) for k, v in (tags or {}).items()}
        with self._errors():
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            own_run = run_id is None
            if own_run:
                run = self.client.create_run(self._experiment_id(f"forgetflow/{name}"), run_name=f"register-{name}",
                                             tags={"forgetflow.model": name})
            else:
                run = self.client.get_run(run_id)
            run_id = run.info.run_id
            ok = False
            try:
                logged = self.client.create_logged_model(experiment_id=run.info.experiment_id, name="model",
                                                         source_run_id=run_id, tags={"forgetflow.model": name})
                with _tracking_uri(self.tracking_uri), warnings.catch_warnings():
                    # no input example on purpose: MLflow would run predict (i.e. sample from
                    # the model) at every registration to validate it
                    warnings.filterwarnings("ignore", message=".*input example was not provided")
                    # artifact "lineage": a delta version (LLM adapter) finds its parent by name
                    # when a consumer loads it; the model folder itself is never written to
                    with tempfile.TemporaryDirectory(prefix="forgetflow-lineage-") as tmp:
                        lineage = Path(tmp) / LINEAGE_FILE
                        lineage.write_text(json.dumps({"registered_model": name}))
                        mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE),
                                                artifacts={"model": str(model_dir), "lineage": str(lineage)},
                                                pip_requirements=_requirements(), signature=_signature(model_dir),
                                                model_id=logged.model_id)
                self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
                mv = self.client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id,
                                                      tags=tags, description=description or None,
                                                      model_id=logged.model_id)
                ok = True
            finally:
                if own_run:
                    self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
        return str(mv.version)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        self.get_version(name, version)  # UnknownModel for an unknown model or version
        with self._errors(name, str(version)):
            self.client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        if self.alias_version(name, alias) is not None:
            with self._errors(name):
                self.client.delete_registered_model_alias(name, alias)

    def move_champion_if(self, name: str, version: str | int, expected_current: str | int | None) -> bool:
        """Compare-and-set: point @champion at `version` only if it still points at
        `expected_current` (None: no champion yet); returns whether it moved.

        MLflow offers no atomic compare-and-set on aliases: this is check-then-set, correct
        only while the caller holds the model's lock (see the module docstring)."""
        expected = None if expected_current is None else str(expected_current)
        if self.alias_version(name, CHAMPION) != expected:
            return False
        self.set_alias(name, CHAMPION, version)
        return True

    def set_tags(self, name: str, version: str | int, tags: dict[str, str]) -> None:
        with self._errors(name, str(version)):
            for key, value in tags.items():
                self.client.set_model_version_tag(name, str(version), key, str(value))


class PromotionConflict(RuntimeError):
    """The champion moved while a request ran; it must be rebased, never overwritten."""


def promote_champion(registry: Registry, state_dir: str | Path, name: str, version: str, base_version: str) -> None:
    """Make `version` @champion if @champion is still `base_version` (or already `version`:
    a retried promote), as one step under the model's lock; otherwise PromotionConflict, and
    @champion stays where it is. Of two promotions racing from one base, exactly one wins."""
    from forgetflow.locks import model_lock

    with model_lock(state_dir, name):
        current = registry.alias_version(name, CHAMPION)
        if current != str(version) and not registry.move_champion_if(name, version, base_version):
            raise PromotionConflict(f"{name}: base v{base_version} is no longer @champion (now v{current}); "
                                    f"rerun the request to rebase it on the new champion")


__all__ = ["Registry", "ModelVersionInfo", "UnknownModel", "PromotionConflict", "promote_champion", "CHAMPION",
           "CHALLENGER"]
