"""The diffusion family: class-conditional and text-to-image diffusion models, forgotten with SFD.

Data-free: the only "forget data" is the mapping forget class -> override class (or forget
prompt -> override prompt, for a concept of a text-to-image model) and the seeds; every image
any loss sees is drawn from the generator (forgetflow/diffusion/sfd.py). The evaluation kit of
a diffusion model is its judge (a digit classifier trained on the train split only),
versioned beside the model.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from forgetflow.checkpoints import CheckpointSink
from forgetflow.config import Params
from forgetflow.families import TargetError
from forgetflow.gates import Gate, attack_gates, metric_gate
from forgetflow.request import DeletionRequest

SPEC_FILE = "forget_spec.json"


def _card(model_dir: Path) -> dict:
    path = Path(model_dir) / "model_card.json"
    if not path.exists():
        raise TargetError(f"{model_dir} is not a forgetflow diffusion model (no model_card.json)")
    return json.loads(path.read_text())


def resolve_overrides(classes: list[int], override: dict[int, int], card: dict, rule: str) -> list[tuple[int, int]]:
    """Pair each forget class with its override class.

    Rule `next` (the default, stated in params.yaml): the next class label, cyclically,
    skipping every class that is being or has been forgotten. Rule `random` (opt-in): the
    pair (c, RANDOM_OVERRIDE), each forget-class sample redrawn as a random remaining class;
    measured on this model it can produce grey blobs that a judge still scores as forgotten
    (sfd.md), so such versions are also gated on realism (calibrate.diffusion_gates). An
    explicit override in the request wins.
    """
    from forgetflow.diffusion.sfd import RANDOM_OVERRIDE

    if rule not in ("next", "random"):
        raise TargetError(f"override rule {rule!r} is not supported by the diffusion family; use 'next' or 'random'")
    k = card["num_classes"]
    gone = set(classes) | {p["forget_class"] for p in card.get("forgotten", [])}
    pairs = []
    for c in classes:
        if c in override:
            pairs.append((c, override[c]))
            continue
        if rule == "random":
            pairs.append((c, RANDOM_OVERRIDE))
            continue
        candidates = [(c + i) % k for i in range(1, k) if (c + i) % k not in gone]
        if not candidates:
            raise TargetError("no class is left to override the forgotten ones with")
        pairs.append((c, candidates[0]))
    return pairs


def _all_pairs(synth_dir: Path) -> list[tuple[int, int]] | dict:
    """What the evaluation measures: every class pair of the lineage, or a text-to-image
    model's prompt spec {forget: every record of the lineage, retain, paraphrases}."""
    spec = json.loads((Path(synth_dir) / SPEC_FILE).read_text())
    if spec.get("conditioning") == "prompt":
        from forgetflow.diffusion.concepts import merge_prompt_records

        return {"forget": merge_prompt_records(spec["lineage_records"], spec["prompt_forget"]["forget"]),
                "retain": spec["prompt_forget"]["retain"], "paraphrases": spec["paraphrases"]}
    return [tuple(p) for p in spec["lineage_pairs"] + spec["forget_pairs"]]


def _registration_prompts(card: dict) -> dict:
    """A prompt model's spec at registration: nothing forgotten, every template prompt retained."""
    from forgetflow.diffusion.concepts import template_prompts

    vocab = card.get("vocabulary", {})
    return {"forget": [], "retain": [p for c in vocab.get("concepts", []) for p in template_prompts(vocab, c)],
            "paraphrases": {}}


class DiffusionFamily:
    name = "diffusion"
    default_method = "sfd"

    def methods(self) -> list[str]:
        from forgetflow.diffusion.methods import DIFFUSION_METHODS

        return sorted(DIFFUSION_METHODS)

    def check_model(self, model_dir: Path) -> None:
        from forgetflow.diffusion.artifact import load_version

        load_version(model_dir, "cpu")

    def check_eval_kit(self, eval_kit: Path) -> None:
        if not (Path(eval_kit) / "judge_card.json").exists():
            raise FileNotFoundError(f"{eval_kit} is not a diffusion evaluation kit (no judge_card.json)")

    def next_eval_kit(self, eval_kit: Path, synth_dir: Path, out_dir: Path) -> Path | None:
        return None  # the judge still judges every class

    def check_target(self, request: DeletionRequest, model_dir: Path, params: Params) -> None:
        card = _card(model_dir)
        prompt_model = card.get("conditioning") == "prompt"
        if (request.target.kind == "diffusion-concept") != prompt_model:
            raise TargetError(f"model {request.model} is {'text-to-image' if prompt_model else 'class-conditional'}: "
                              f"it takes {'diffusion-concept' if prompt_model else 'diffusion-class'} requests")
        method = request.method or self.default_method
        if method not in self.methods():
            raise TargetError(f"unknown method {method!r} for the diffusion family; known: {self.methods()}")
        if prompt_model:
            return _check_concept(request, card, method)
        k = card["num_classes"]
        known = f"classes 0-{k - 1}"
        forgotten = {p["forget_class"] for p in card.get("forgotten", [])}
        target = request.target
        for c in target.classes:
            if not 0 <= c < k:
                raise TargetError(f"class {c} is not in model {request.model} ({known})")
            if c in forgotten:
                raise TargetError(f"class {c} was already forgotten by an earlier request of {request.model}")
        for c, o in target.override.items():
            if not 0 <= o < k:
                raise TargetError(f"override class {o} (for class {c}) is not in model {request.model} ({known})")
            if o in forgotten:
                raise TargetError(f"override class {o} (for class {c}) was itself forgotten earlier")

    def synthesize(self, request: DeletionRequest, model_dir: Path, eval_kit: Path, out_dir: Path,
                   params: Params) -> dict:
        card = _card(model_dir)
        if card.get("conditioning") == "prompt":
            return _synthesize_concept(request, card, out_dir, params)
        rule = request.target.override_rule or params.diffusion.sfd.override_rule
        pairs = resolve_overrides(request.target.classes, request.target.override, card, rule)
        lineage = [(p["forget_class"], p["override_class"]) for p in card.get("forgotten", [])]
        spec = {
            "forget_pairs": pairs,
            "lineage_pairs": lineage,
            "override_rule": rule,
            "seeds": {
                "train": params.diffusion.sfd.seed,
                "calibrate": params.diffusion.calibrate.seed,
                "evaluate": params.diffusion.evaluate.seed,
            },
            "real_data_used": False,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        return {"forget_pairs": len(pairs), "lineage_pairs": len(lineage)}

    def serving_version(self, model_dir: Path, eval_kit: Path, params: Params, out_dir: Path, *,
                        cache_dir: Path | None = None, progress: bool = True) -> tuple[Path, list[Gate]] | None:
        """A multi-step (DDPM) model's one-step generator: plain SiD for distill.iterations (it
        forgets nothing), its guidance scale calibrated, gated against the model on held-out
        seeds (quality and NFE; there is nothing forgotten to gate). None for a one-step model
        or with distill.on_register off. Requests from it run SFD's short forgetting stage
        (sfd.from_one_step) instead of the whole distillation."""
        from forgetflow.diffusion.calibrate import calibrate_version, diffusion_gates, measure_version
        from forgetflow.diffusion.concepts import PromptForget
        from forgetflow.diffusion.sfd import SiD

        distill, card = params.diffusion.distill, _card(model_dir)
        if card["kind"] != "ddpm" or not distill.on_register:
            return None
        nothing: list | dict = []
        if card.get("conditioning") == "prompt":
            if not card.get("vocabulary", {}).get("templates"):
                return None  # no prompts to distil on: the model serves as it is
            nothing = _registration_prompts(card)
        sid = params.model_copy(update={"diffusion": params.diffusion.model_copy(update={
            "sfd": params.diffusion.sfd.model_copy(update={"iterations": distill.iterations})})})
        forget = PromptForget([], nothing["retain"]) if nothing else []
        SiD.unlearn(model_dir, out_dir, forget, sid, progress=progress)
        calibrate_version(out_dir, model_dir, eval_kit, nothing, params, cache_dir=cache_dir)
        ev = params.diffusion.evaluate
        base = measure_version(model_dir, eval_kit, nothing, params, seed=ev.seed, cache_dir=cache_dir, progress=progress)
        new = measure_version(out_dir, eval_kit, nothing, params, seed=ev.seed, progress=progress)
        return Path(out_dir), diffusion_gates(base, new, params.diffusion.gates)

    def unlearn(self, model_dir: Path, synth_dir: Path, out_dir: Path, params: Params, *,
                method: str, base_version: str, checkpoints: CheckpointSink | None, progress: bool) -> Path:
        from forgetflow.diffusion.concepts import PromptForget
        from forgetflow.diffusion.methods import get_method

        spec = json.loads((Path(synth_dir) / SPEC_FILE).read_text())
        if spec.get("conditioning") == "prompt":
            forget = PromptForget.from_dict(spec["prompt_forget"])
        else:
            forget = [tuple(p) for p in spec["forget_pairs"]]
        return get_method(method).unlearn(model_dir, out_dir, forget, params, checkpoints=checkpoints, progress=progress)

    def calibrate(self, base_dir: Path, new_dir: Path, synth_dir: Path, eval_kit: Path,
                  params: Params, out_dir: Path, *, cache_dir: Path | None = None) -> tuple[float, list[dict]]:
        from forgetflow.diffusion.artifact import teacher_dir
        from forgetflow.diffusion.calibrate import calibrate_version

        return calibrate_version(new_dir, teacher_dir(base_dir), eval_kit, _all_pairs(synth_dir), params,
                                 cache_dir=cache_dir)

    def evaluate(self, base_dir: Path, new_dir: Path, synth_dir: Path, eval_kit: Path,
                 params: Params, out_dir: Path, *, cache_dir: Path | None = None) -> dict:
        from forgetflow.diffusion.artifact import teacher_dir
        from forgetflow.diffusion.calibrate import measure_version
        from forgetflow.diffusion.evaluate import save_comparison_grid

        forget = _all_pairs(synth_dir)
        seed = params.diffusion.evaluate.seed
        metrics = {
            "base": measure_version(base_dir, eval_kit, forget, params, seed=seed, cache_dir=cache_dir, progress=True),
            "new": measure_version(new_dir, eval_kit, forget, params, seed=seed, progress=True),
        }
        for name, directory in (("base", base_dir), ("new", new_dir)):
            metrics[name]["attacks"].update(_strong_attacks(directory, eval_kit, forget, params))
        teacher = teacher_dir(base_dir)
        if teacher != Path(base_dir):  # a chained request: gates are measured against the lineage's teacher
            metrics["reference"] = measure_version(teacher, eval_kit, forget, params, seed=seed, cache_dir=cache_dir,
                                                   progress=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_comparison_grid(base_dir, new_dir, out_dir / "samples_before_after.png", params, seed=seed,
                             prompts=_grid_prompts(forget) if isinstance(forget, dict) else None)
        return metrics

    def reverify(self, model_dir: Path, eval_kit: Path, certificate: dict, params: Params, *,
                 base_dir: Path | None = None, subjects: list[dict] | None = None) -> tuple[list[Gate], dict]:
        """The certificate's forgetting gates and every attack re-measured on `model_dir` (a later
        version must still forget every class or concept the certified one did), on fresh
        samples (another seed); a gate whose metric cannot be measured now fails closed."""
        from forgetflow.diffusion.calibrate import measure_version
        from forgetflow.diffusion.concepts import lineage_records, paraphrase_prompts

        forgotten = certificate["forgotten"]
        if forgotten and "concept" in forgotten[0]:  # hashed: the prompts come back from the vocabulary
            vocab = _card(model_dir).get("vocabulary", {})
            records = lineage_records(forgotten, vocab)
            forget = {"forget": records, "retain": [],
                      "paraphrases": {c: paraphrase_prompts(vocab, c) for c in {r["concept"] for r in records}}}
            names = ("forget_rate", "paraphrase_forget_rate", "override_fidelity")
        else:
            forget = [(int(p["forget_class"]), int(p["override_class"])) for p in forgotten]
            names = ("unlearning_accuracy", "override_fidelity")
        m = measure_version(model_dir, eval_kit, forget, params, seed=params.diffusion.evaluate.seed + 1, progress=True)
        m["attacks"].update(_strong_attacks(model_dir, eval_kit, forget, params))
        certified = {g["name"]: g for g in certificate["gates"]}
        gated = {n.removeprefix("attack:"): c["threshold"] for n, c in certified.items() if n.startswith("attack:")}
        return [metric_gate(n, m[n], certified[n]["threshold"], certified[n]["kind"], "cannot be measured on this "
                            "version now") for n in names if n in certified] + attack_gates(m["attacks"], gated), m["attacks"]

    def gates(self, metrics: dict, params: Params) -> list[Gate]:
        """diffusion_gates, and attack:<name> for each attack of gates.attacks (upper95 <= its
        threshold; forgetflow/gates.py) where the version forgets something."""
        from forgetflow.diffusion.calibrate import diffusion_gates

        g, new = params.diffusion.gates, metrics["new"]
        attacks = attack_gates(new["attacks"], g.attacks) if new.get("attacks") else []
        return diffusion_gates(metrics.get("reference", metrics["base"]), new, g) + attacks


def _strong_attacks(version_dir: Path, judge_dir: Path, forget: list[tuple[int, int]] | dict, params: Params) -> dict:
    """relearning and embedding_search (forgetflow/diffusion/attacks.py) on the forgotten classes;
    for a text-to-image version, records that say they were not run (their gates fail closed)."""
    from forgetflow.diffusion.attacks import ATTACKS, run_attacks
    from forgetflow.stats import rate_record

    if isinstance(forget, dict):
        return {name: rate_record(0, 0, reason="not implemented for text-to-image versions yet") for name in ATTACKS}
    return run_attacks(version_dir, judge_dir, sorted({f for f, _ in forget}), params, progress=True)


def _grid_prompts(spec: dict, per_kind: int = 3) -> dict[str, str]:
    """Rows of a text-to-image comparison grid, {prompt: label}: forget prompts, paraphrases,
    retain prompts, labelled by kind and number (the prompts are the request's content)."""
    paraphrases = [p for ps in spec["paraphrases"].values() for p in ps]
    retain = spec["retain"][:: max(1, len(spec["retain"]) // per_kind)]
    kinds = {"forget prompt": [r["forget_prompt"] for r in spec["forget"]], "paraphrase": paraphrases, "kept prompt": retain}
    return {p: f"{kind} {i + 1}" for kind, prompts in kinds.items() for i, p in enumerate(prompts[:per_kind])}


def _check_concept(request: DeletionRequest, card: dict, method: str) -> None:
    """A concept request against a text-to-image model's vocabulary and lineage. The messages
    never repeat the request's concept (DESIGN invariant 6: errors reach logs and reports)."""
    from forgetflow.diffusion.concepts import hashes_to, lineage_records
    from forgetflow.diffusion.sfd import SFD_VARIANTS

    if method not in SFD_VARIANTS:
        raise TargetError(f"method {method!r} forgets classes only; a text-to-image model takes {sorted(SFD_VARIANTS)}")
    target, vocab = request.target, card.get("vocabulary", {})
    recorded = [r for r in card.get("forgotten", []) if "concept" in r]
    if any(hashes_to(r, target.concept) for r in recorded):
        raise TargetError(f"the request's concept was already forgotten by an earlier request of {request.model}")
    if any(hashes_to(r, target.override) for r in recorded):
        raise TargetError("the request's override was itself forgotten earlier")
    concepts = vocab.get("concepts", [])
    if target.forget_prompts is None and concepts and target.concept not in concepts:
        raise TargetError(f"the request's concept is not in model {request.model}'s vocabulary "
                          f"(known: {', '.join(concepts)}); or list the request's forget_prompts")
    lineage_records(recorded, vocab)  # TargetError if the lineage's prompts cannot be re-derived


def _synthesize_concept(request: DeletionRequest, card: dict, out_dir: Path, params: Params) -> dict:
    """The prompt spec of a concept request: forget records, retain prompts, held-out paraphrases
    (in clear: the spec is sealed with the request's key as it leaves the run's folder)."""
    from forgetflow.diffusion.concepts import build_prompt_forget, lineage_records, paraphrase_prompts

    target, vocab = request.target, card.get("vocabulary", {})
    lineage = lineage_records(card.get("forgotten", []), vocab)
    forget = build_prompt_forget(vocab, target.concept, target.override,
                                 forgotten=sorted({r["concept"] for r in lineage}),
                                 forget_prompts=target.forget_prompts, retain_prompts=target.retain_prompts)
    concepts = sorted({r["concept"] for r in lineage} | {target.concept})
    spec = {
        "conditioning": "prompt",
        "prompt_forget": replace(forget, salt=request.request_id).to_dict(),
        "lineage_records": lineage,
        "paraphrases": {c: paraphrase_prompts(vocab, c) for c in concepts if vocab.get("paraphrases")},
        "seeds": {"train": params.diffusion.sfd.seed, "calibrate": params.diffusion.calibrate.seed,
                  "evaluate": params.diffusion.evaluate.seed},
        "real_data_used": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return {"forget_prompts": len(forget.forget), "retain_prompts": len(forget.retain), "lineage_records": len(lineage)}
