"""On-disk format of one LLM model version (a directory), and loading it with its lineage.

    model_card.json   LLMCard
    weights/          kind "full": a transformers causal LM + its tokenizer (safetensors)
    adapter/          kind "adapter": a peft LoRA adapter trained on top of the parent version
    parent/           materialised on download only (never registered): the parent version's
                      directory, itself possibly an adapter with its own parent/

A version made by unlearning is the adapter plus a pointer to its parent version and the
calibrated guidance scale (issue 3: "the LoRA adapter + a pointer to its base version + gamma").
Loading merges every adapter of the chain into the root weights in order, so version k+1's
adapter is always trained and applied on exactly the weights version k served.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forgetflow.families import ArtifactError

CARD_FILE = "model_card.json"
WEIGHTS_DIR = "weights"
ADAPTER_DIR = "adapter"
PARENT_DIR = "parent"


@dataclass
class LLMCard:
    kind: str  # "full" | "adapter"
    parent_version: str | None = None
    guidance_scale: float = 1.0
    guidance_space: str = "log"  # "log" | "prob" (the paper's probability-space variant)
    positive_condition: str | None = None  # system prompt of the guided (safe) branch
    negative_condition: str | None = None  # system prompt of the unconditional (unsafe) branch
    forgotten: list[dict] = field(default_factory=list)  # [{"subject": salted hash, "fields": [...]}]
    method: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    base_model: str = ""  # what the root weights were made from (e.g. "SmolLM2-135M-Instruct")
    family: str = "llm"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LLMCard":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


def read_card(model_dir: Path) -> LLMCard:
    path = Path(model_dir) / CARD_FILE
    if not path.exists():
        raise ArtifactError(f"{model_dir} is not a forgetflow model directory (no {CARD_FILE})")
    data = json.loads(path.read_text())
    if data.get("family") != "llm":
        raise ArtifactError(f"{model_dir} holds a {data.get('family', 'diffusion')!r} model, not an LLM")
    return LLMCard.from_dict(data)


def write_card(model_dir: Path, card: LLMCard) -> None:
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    (Path(model_dir) / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2))


def save_full(model, tokenizer, model_dir: Path, card: LLMCard) -> Path:
    """A root version: full weights + tokenizer."""
    model_dir = Path(model_dir)
    model.save_pretrained(model_dir / WEIGHTS_DIR, safe_serialization=True)
    tokenizer.save_pretrained(model_dir / WEIGHTS_DIR)
    write_card(model_dir, card)
    return model_dir


def check_version(model_dir: Path) -> LLMCard:
    """Refuse a broken directory before anything is registered or trained on it."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    if card.kind == "full":
        if not (model_dir / WEIGHTS_DIR / "config.json").exists():
            raise ArtifactError(f"{model_dir}: kind 'full' but no {WEIGHTS_DIR}/config.json")
    elif card.kind == "adapter":
        if not (model_dir / ADAPTER_DIR / "adapter_config.json").exists():
            raise ArtifactError(f"{model_dir}: kind 'adapter' but no {ADAPTER_DIR}/adapter_config.json")
        if not card.parent_version:
            raise ArtifactError(f"{model_dir}: an adapter version needs parent_version in {CARD_FILE}")
    else:
        raise ArtifactError(f"{model_dir}: unknown kind {card.kind!r} in {CARD_FILE}")
    return card


def load_lm(model_dir: Path, device: torch.device | str = "cpu", *, parent: Path | None = None):
    """(model, tokenizer, card) with every adapter of the lineage merged in, in eval mode.

    An adapter version needs its parent version's directory: `parent`, else `parent/` inside
    it (Registry.download materialises the lineage there). A mismatched adapter (its base layers are not in the parent)
    raises ArtifactError naming both directories."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    card = check_version(model_dir)
    if card.kind == "full":
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir / WEIGHTS_DIR, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(model_dir / WEIGHTS_DIR)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{model_dir}/{WEIGHTS_DIR}: cannot load the weights: {exc}") from None
    else:
        parent = Path(parent) if parent is not None else model_dir / PARENT_DIR
        if not (parent / CARD_FILE).exists():
            raise ArtifactError(f"{model_dir}: adapter version without its parent v{card.parent_version} "
                                f"(looked in {parent})")
        model, tokenizer, _ = load_lm(parent, "cpu")
        try:
            model = PeftModel.from_pretrained(model, model_dir / ADAPTER_DIR).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ArtifactError(f"{model_dir}/{ADAPTER_DIR} does not match its parent v{card.parent_version}: "
                                f"{str(exc).splitlines()[0][:200]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer, card
