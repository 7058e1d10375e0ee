"""The MLflow pyfunc wrapper of a forgetflow model directory (MLflow has no diffusers flavour).

The model directory (the folder holding `model_card.json`) is logged as the pyfunc artifact
"model"; this file is logged with it as "models from code" (no pickled objects), so a
consumer only needs forgetflow installed:

    model = mlflow.pyfunc.load_model("models:/digits-ddpm@champion")
    images = model.predict(pd.DataFrame({"label": [3, 3, 5], "seed": [0, 0, 1]}))

predict returns a float32 numpy array [N, 1, H, W] in [-1, 1], one image per input row, in
input order. Rows with the same seed are sampled together, so a row's image depends on the
labels it is batched with: pass one seed per row for row-independent results. The guidance
scale defaults to the one calibrated for the version (its model card); pass
`params={"guidance_scale": g}` to override it (the logged signature declares the parameter,
default -1 = the calibrated scale; MLflow drops parameters a signature does not declare).
A text-to-image version takes rows of `prompt` (what to draw) instead of `label`:
`model.predict(pd.DataFrame({"prompt": ["a thick one", "number nine"], "seed": [0, 1]}))`.

An LLM version takes rows of `prompt` (the user message) and optional `system`, and returns
one answer string per row (greedy). An unlearned version serves with its calibrated guidance
by default: the positive condition as system prompt, guided away from the negative one at
the registered gamma (`params={"guidance_scale": g}` overrides; 1 = no guidance). A version
stored as a LoRA adapter fetches its parent versions from the same registry at load time.

The heavy imports (torch, forgetflow.diffusion) happen at first predict, so the registry
and its tests never need them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

MODEL_ARTIFACT = "model"
MODEL_CARD = "model_card.json"


def _rows(model_input: Any) -> list[dict]:
    """Accept a DataFrame, a dict of columns (or of scalars), a list of row dicts or labels."""
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, dict):
        values = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in model_input.items()}
        if not any(isinstance(v, (list, tuple)) for v in values.values()):
            values = {k: [v] for k, v in values.items()}
        frame = pd.DataFrame(values)
    elif isinstance(model_input, (list, tuple)) or hasattr(model_input, "tolist"):
        items = model_input.tolist() if hasattr(model_input, "tolist") else model_input
        frame = pd.DataFrame([r if isinstance(r, dict) else {"label": r} for r in items])
    else:
        raise TypeError(f"model input must be a DataFrame or columns with 'label', got {type(model_input).__name__}")
    return frame.to_dict(orient="records")


def _rows_llm(model_input: Any) -> list[dict]:
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        values = {k: (v if isinstance(v, (list, tuple)) else [v]) for k, v in model_input.items()}
        return pd.DataFrame(values).to_dict(orient="records")
    if isinstance(model_input, str):
        return [{"prompt": model_input}]
    raise TypeError(f"model input must be a DataFrame or columns with 'prompt', got {type(model_input).__name__}")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


class ForgetflowModel(mlflow.pyfunc.PythonModel):
    """pyfunc model over a forgetflow model directory (artifact "model")."""

    def load_context(self, context) -> None:
        self.model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        card_path = self.model_dir / MODEL_CARD
        if not card_path.exists():
            raise FileNotFoundError(f"{self.model_dir} has no {MODEL_CARD}; not a forgetflow model directory")
        self.card = json.loads(card_path.read_text())
        self.family = self.card.get("family", "diffusion")
        lineage = context.artifacts.get("lineage")
        self.lineage = json.loads(Path(lineage).read_text()) if lineage else {}
        self._version = None
        self._device = None
        self._params = None
        self._lm = None

    def _load_diffusion(self):
        if self._version is None:
            from forgetflow.compute import resolve_device
            from forgetflow.config import load_params
            from forgetflow.diffusion.artifact import load_version

            self._params = load_params()
            self._device = resolve_device(self._params.compute)
            self._version = load_version(self.model_dir, self._device)
        return self._version

    def _load_llm(self):
        if self._lm is None:
            import tempfile

            import mlflow

            from forgetflow.compute import resolve_device
            from forgetflow.config import load_params
            from forgetflow.llm.artifact import load_lm
            from forgetflow.registry import Registry

            self._params = load_params()
            parent = None
            if self.card.get("parent_version"):
                if "registered_model" not in self.lineage:
                    raise FileNotFoundError("this adapter version carries no lineage artifact; load it from the registry")
                name = self.lineage["registered_model"]
                self._parent_tmp = tempfile.TemporaryDirectory(prefix="forgetflow-parent-")
                parent = Registry(mlflow.get_tracking_uri()).download(name, self.card["parent_version"],
                                                                      Path(self._parent_tmp.name) / "parent")
            self._lm = load_lm(self.model_dir, resolve_device(self._params.compute), parent=parent)
        return self._lm

    def _predict_llm(self, rows: list[dict], params: dict) -> list[str]:
        from forgetflow.llm.evaluate import Policy, ask

        model, tokenizer, card = self._load_llm()
        guidance = params.get("guidance_scale")
        gamma = card.guidance_scale if _is_missing(guidance) or float(guidance) < 0 else float(guidance)
        max_new = int(params.get("max_new_tokens") or 64)
        if any("prompt" not in r or _is_missing(r["prompt"]) for r in rows):
            raise ValueError("every input row needs a 'prompt' (the user message)")
        answers: list[str | None] = [None] * len(rows)
        by_system: dict[str | None, list[int]] = {}
        for i, r in enumerate(rows):
            system = None if _is_missing(r.get("system")) else str(r["system"])
            by_system.setdefault(system, []).append(i)
        for system, idx in by_system.items():
            if system is None and card.positive_condition:
                policy = Policy(card.positive_condition, card.negative_condition, gamma, card.guidance_space)
            else:
                policy = Policy(system)
            out = ask(model, tokenizer, [str(rows[i]["prompt"]) for i in idx], policy, max_new,
                       self._params.llm.evaluate.batch_size, "predict")
            for i, a in zip(idx, out):
                answers[i] = a
        return answers

    # The pd.DataFrame hint (what MLflow passes after enforcing the signature) keeps MLflow from
    # wrapping predict for type-hint validation (and from warning that hints are missing).
    def predict(self, context, model_input: pd.DataFrame, params=None):
        if self.family == "llm":
            rows = [r if isinstance(r, dict) else {"prompt": r} for r in
                    (model_input if isinstance(model_input, list) else _rows_llm(model_input))]
            return self._predict_llm(rows, params or {})
        import numpy as np
        import torch

        from forgetflow.diffusion.sampling import sample

        text = self.card.get("conditioning") == "prompt"
        rows = _rows_llm(model_input) if text else _rows(model_input)
        if not rows:
            return np.zeros((0, 1, 0, 0), dtype=np.float32)
        column = "prompt" if text else "label"
        if any(column not in r or _is_missing(r[column]) for r in rows):
            raise ValueError("every input row needs a 'prompt' (what to draw)" if text else
                             "every input row needs a 'label' (the class to generate)")
        guidance = (params or {}).get("guidance_scale")
        guidance = None if _is_missing(guidance) or float(guidance) < 0 else float(guidance)
        version = self._load_diffusion()
        prompts = list(dict.fromkeys(str(r["prompt"]) for r in rows)) if text else None
        conditioning = version.conditioning(prompts) if text else None
        by_seed: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            seed = row.get("seed")
            by_seed.setdefault(0 if _is_missing(seed) else int(seed), []).append(i)
        out: list[Any] = [None] * len(rows)
        for seed, idx in by_seed.items():
            labels = torch.tensor([prompts.index(str(rows[i]["prompt"])) if text else int(rows[i]["label"])
                                   for i in idx], dtype=torch.long)
            images = sample(version, labels, seed=seed, guidance_scale=guidance, conditioning=conditioning,
                            params=self._params, device=self._device)
            images = images.detach().float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = images[j]
        return np.stack(out).astype(np.float32)


# Models from code: when MLflow loads this file from a logged model (under a generated module
# name), it takes the model set here. Importing forgetflow.pyfunc normally sets nothing.
if not __name__.startswith("forgetflow."):
    mlflow.models.set_model(ForgetflowModel())
