"""Bringing a model under forgetflow: register a model directory with its evaluation kit.

The same path serves a user's own diffusers model and the demo model that `train-base`
makes. The evaluation kit (the judge for diffusion) is uploaded to the object store under
`eval-kits/<model>/<content hash>/` with a hash manifest, and every version of the model
carries its URI in the tag `forgetflow.eval_kit`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from forgetflow.config import Params
from forgetflow.registry import Registry
from forgetflow.services import Settings
from forgetflow.storage import ObjectStore

EVAL_KIT_TAG = "forgetflow.eval_kit"


def _dir_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def model_family(model_dir: Path) -> str:
    card = Path(model_dir) / "model_card.json"
    if not card.exists():
        raise FileNotFoundError(f"{model_dir} is not a forgetflow model directory (no model_card.json)")
    return json.loads(card.read_text()).get("family", "diffusion")


def upload_eval_kit(name: str, eval_kit: Path, store: ObjectStore) -> str:
    """Upload a kit under eval-kits/<name>/<content hash> (idempotent); returns the prefix."""
    prefix = f"eval-kits/{name}/{_dir_hash(Path(eval_kit))}"
    store.put_dir(Path(eval_kit), prefix)
    return prefix


def register_model(name: str, model_dir: Path, eval_kit: Path, params: Params, settings: Settings,
                   *, make_champion: bool = True) -> str:
    """Upload the eval kit, register `model_dir` as a new version of `name`; it becomes
    @champion if the model has none yet (or always, when make_champion and no champion)."""
    from forgetflow.families import get_family

    family_name = model_family(model_dir)
    family = get_family(family_name)
    family.check_model(model_dir)  # refuse a broken model before anything is registered
    family.check_eval_kit(eval_kit)
    prefix = upload_eval_kit(name, eval_kit, ObjectStore(settings))
    registry = Registry(settings.mlflow_uri)
    version = registry.register(name, Path(model_dir), run_id=None,
                                tags={EVAL_KIT_TAG: prefix, "forgetflow.family": family_name,
                                      "forgetflow.request_id": "", "forgetflow.model_hash": _dir_hash(Path(model_dir))},
                                description=f"{name}: registered base model")
    if make_champion and registry.alias_version(name, "champion") is None:
        registry.set_alias(name, "champion", version)
    return version


def _champion(name: str, settings: Settings) -> str | None:
    """The @champion version of `name`, or None when the model or the alias does not exist."""
    from forgetflow.registry import UnknownModel

    try:
        return Registry(settings.mlflow_uri).alias_version(name, "champion")
    except UnknownModel:
        return None


def ensure_demo_model(name: str, params: Params, settings: Settings, out: Path) -> str:
    """The demo model registered as `name@champion`, trained first if not on disk (DVC
    stage `train_base` makes the same folders)."""
    from forgetflow.compute import resolve_device
    from forgetflow.diffusion.judge import train_judge
    from forgetflow.diffusion.train_base import train_teacher

    current = _champion(name, settings)
    if current is not None:
        return current
    device = resolve_device(params.compute)
    if not (out / "model" / "model_card.json").exists():
        train_teacher(params, out / "model", device=device)
    if not (out / "judge" / "judge_card.json").exists():
        train_judge(params, out / "judge", device=device)
    return register_model(name, out / "model", out / "judge", params, settings)


def ensure_demo_llm(name: str, params: Params, settings: Settings, out: Path) -> str:
    """The demo support chat model registered as `name@champion`: the corpus of fictitious
    customers, the fine-tuned model and its evaluation kit are made first if not on disk
    (DVC stage `train_support_llm` makes the same folders)."""
    from forgetflow.llm.support_model import finetune_model, make_support_corpus

    current = _champion(name, settings)
    if current is not None:
        return current
    if not (out / "corpus.jsonl").exists() or not (out / "eval_kit" / "eval_kit_card.json").exists():
        make_support_corpus(params, out)
    if not (out / "model" / "model_card.json").exists():
        finetune_model(out / "corpus.jsonl", out / "model", params)
    return register_model(name, out / "model", out / "eval_kit", params, settings)
