"""Bringing a model under forgetflow: register a model directory with its evaluation kit.

The same path serves a user's own diffusers model (a forgetflow model folder, or a diffusers
text-to-image pipeline folder) and the demo models that `train-base` / `train-text-to-image`
make. The evaluation kit (the judge for diffusion) is uploaded to the object store under
`eval-kits/<model>/<content hash>/` with a hash manifest, and every version of the model
carries its URI in the tag `forgetflow.eval_kit`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from forgetflow.config import Params
from forgetflow.gates import Gate, all_passed
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
        raise FileNotFoundError(f"{model_dir} is not a forgetflow model directory (no model_card.json) "
                                "nor a diffusers text-to-image pipeline (model_index.json, unet/)")
    return json.loads(card.read_text()).get("family", "diffusion")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


@contextmanager
def with_model_card(model_dir: Path):
    """`model_dir` itself when it has a model card; for a diffusers text-to-image pipeline
    without one (a model a user brings), a hard-linked copy with its derived card, so the
    registered version carries the card every stage reads. The user's folder is not written."""
    from forgetflow.diffusion.artifact import CARD_FILE, PIPELINE_INDEX, UNET_DIR, card_of_pipeline

    model_dir = Path(model_dir)
    if (model_dir / CARD_FILE).exists() or not (model_dir / PIPELINE_INDEX).is_file() \
            or not (model_dir / UNET_DIR / "config.json").is_file():
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="forgetflow-pipeline-") as tmp:
        staged = Path(tmp) / model_dir.name
        shutil.copytree(model_dir, staged, copy_function=_link_or_copy)
        (staged / CARD_FILE).write_text(json.dumps(card_of_pipeline(model_dir).to_dict(), indent=2))
        yield staged


def upload_eval_kit(name: str, eval_kit: Path, store: ObjectStore) -> str:
    """Upload a kit under eval-kits/<name>/<content hash> (idempotent); returns the prefix."""
    prefix = f"eval-kits/{name}/{_dir_hash(Path(eval_kit))}"
    store.put_dir(Path(eval_kit), prefix)
    return prefix


@dataclass
class Registered:
    """What `register_model` registered: the model's version and, where its family makes one,
    the serving version distilled from it with its gates (serving None: none was made)."""

    version: str
    serving: str | None = None
    gates: list[Gate] = field(default_factory=list)

    @property
    def champion_candidate(self) -> str:
        """The version to serve: the distilled one when every gate of it passed."""
        return self.serving if self.serving and all_passed(self.gates) else self.version


def register_model(name: str, model_dir: Path, eval_kit: Path, params: Params, settings: Settings,
                   *, make_champion: bool = True, serving: bool = True, cache_dir: Path | None = None,
                   progress: bool = True) -> Registered:
    """Upload the eval kit and register `model_dir` as a new version of `name`. With `serving`,
    the family may also make a faster version to serve in its place (diffusion: a one-step
    generator distilled with SiD, Family.serving_version), registered as the next version with
    its gates. When the model has no @champion yet (and make_champion), the champion becomes
    the distilled version if every gate of it passed, else the registered one."""
    with with_model_card(model_dir) as staged:
        return _register(name, staged, eval_kit, params, settings, make_champion=make_champion, serving=serving,
                         cache_dir=cache_dir, progress=progress)


def _register(name: str, model_dir: Path, eval_kit: Path, params: Params, settings: Settings, *,
              make_champion: bool, serving: bool, cache_dir: Path | None, progress: bool) -> Registered:
    from forgetflow.families import get_family

    family_name = model_family(model_dir)
    family = get_family(family_name)
    family.check_model(model_dir)  # refuse a broken model before anything is registered
    family.check_eval_kit(eval_kit)
    prefix = upload_eval_kit(name, eval_kit, ObjectStore(settings))
    registry = Registry(settings.mlflow_uri)
    tags = {EVAL_KIT_TAG: prefix, "forgetflow.family": family_name, "forgetflow.request_id": ""}
    result = Registered(registry.register(name, Path(model_dir), run_id=None,
                                          tags={**tags, "forgetflow.model_hash": _dir_hash(Path(model_dir))},
                                          description=f"{name}: registered base model"))
    if serving:
        with tempfile.TemporaryDirectory(prefix="forgetflow-serving-") as tmp:
            made = family.serving_version(model_dir, eval_kit, params, Path(tmp) / "version", cache_dir=cache_dir,
                                          progress=progress)
            if made is not None:
                out, result.gates = made
                result.serving = registry.register(
                    name, out, run_id=None, description=f"{name}: one-step version of v{result.version} for serving",
                    tags={**tags, "forgetflow.model_hash": _dir_hash(out), "forgetflow.base_version": result.version,
                          "forgetflow.gates_passed": str(all_passed(result.gates)).lower(),
                          **{f"forgetflow.gate.{g.name}": f"{g.value:.4g}" for g in result.gates}})
    if make_champion and registry.alias_version(name, "champion") is None:
        registry.set_alias(name, "champion", result.champion_candidate)
    return result


def champion_version(name: str, settings: Settings) -> str | None:
    """The @champion version of `name`, or None when the model or the alias does not exist."""
    from forgetflow.registry import UnknownModel

    try:
        return Registry(settings.mlflow_uri).alias_version(name, "champion")
    except UnknownModel:
        return None


def ensure_demo_model(name: str, params: Params, settings: Settings, out: Path, cache_dir: Path | None = None) -> str:
    """The demo model registered as `name@champion` (with its one-step serving version), trained
    first if not on disk (DVC stage `train_base` makes the same folders)."""
    from forgetflow.diffusion.train_base import train_teacher

    return _ensure_diffusion_demo(name, params, settings, out, cache_dir, train_teacher, captioned=False)


def ensure_demo_text_to_image(name: str, params: Params, settings: Settings, out: Path,
                              cache_dir: Path | None = None) -> str:
    """The demo text-to-image model (captioned digits, tiny CLIP text encoder) registered as
    `name@champion` with its one-step serving version, trained first if not on disk, with its
    judge of both stroke styles (DVC stage `train_text_to_image` makes the same folders)."""
    from forgetflow.diffusion.text_model import train_text_teacher

    return _ensure_diffusion_demo(name, params, settings, out, cache_dir, train_text_teacher, captioned=True)


def _ensure_diffusion_demo(name: str, params: Params, settings: Settings, out: Path, cache_dir: Path | None,
                           train_model, *, captioned: bool) -> str:
    """@champion of `name`, else train_model and the judge into out/model and out/judge (each
    only if not on disk) and register them."""
    from forgetflow.compute import resolve_device
    from forgetflow.diffusion.judge import train_judge

    current = champion_version(name, settings)
    if current is not None:
        return current
    device = resolve_device(params.compute)
    if not (out / "model" / "model_card.json").exists():
        train_model(params, out / "model", device=device)
    if not (out / "judge" / "judge_card.json").exists():
        train_judge(params, out / "judge", device=device, captioned=captioned)
    return register_model(name, out / "model", out / "judge", params, settings,
                          cache_dir=cache_dir).champion_candidate


def ensure_demo_llm(name: str, params: Params, settings: Settings, out: Path, cache_dir: Path | None = None) -> str:
    """The demo support chat model registered as `name@champion`: the corpus of fictitious
    customers, the fine-tuned model and its evaluation kit are made first if not on disk
    (DVC stage `train_support_llm` makes the same folders)."""
    from forgetflow.llm.support_model import finetune_model, make_support_corpus

    current = champion_version(name, settings)
    if current is not None:
        return current
    if not (out / "corpus.jsonl").exists() or not (out / "eval_kit" / "eval_kit_card.json").exists():
        make_support_corpus(params, out)
    if not (out / "model" / "model_card.json").exists():
        finetune_model(out / "corpus.jsonl", out / "model", params)
    return register_model(name, out / "model", out / "eval_kit", params, settings,
                          cache_dir=cache_dir).champion_candidate
