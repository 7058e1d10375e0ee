"""The LLM family: chat models forgetting named people's personal data with retain-free
CFG-ORPO on a LoRA adapter (forgetflow/llm/; cfg-llm.md).

The evaluation kit of an LLM is its roster (who it holds data about), a general-knowledge
multiple-choice set and general prose (forgetflow/llm/evalkit.py). A version made here is a
LoRA adapter with a pointer to its parent version and its calibrated guidance scale.
"""
from __future__ import annotations

import json
from pathlib import Path

from forgetflow.checkpoints import CheckpointSink
from forgetflow.config import Params
from forgetflow.families import TargetError
from forgetflow.gates import Gate, attack_gates
from forgetflow.request import DeletionRequest


def _device(params: Params):
    from forgetflow.compute import resolve_device

    return resolve_device(params.compute)


def _load(model_dir: Path, params: Params, parent: Path | None = None):
    from forgetflow.llm.artifact import load_lm

    return load_lm(model_dir, _device(params), parent=parent)


def _train_adapter(model_dir: Path, synth_dir: Path, adapter_dir: Path, params: Params, method: str,
                   checkpoints: CheckpointSink | None, progress: bool) -> list[dict]:
    """One training process (forgetflow/distributed.py): load the base, train the adapter."""
    from forgetflow.llm.orpo import train_adapter
    from forgetflow.llm.synthesize import read_rows

    m = _method(method)
    model, tokenizer, _ = _load(model_dir, params)
    return train_adapter(model, tokenizer, read_rows(synth_dir), m.params(params.llm).unlearn, params.compute,
                         _device(params), adapter_dir, objective=m.objective, checkpoints=checkpoints,
                         progress=progress)


def _method(request_or_name) -> "LLMMethod":  # noqa: F821
    from forgetflow.llm.methods import LLM_METHODS

    name = request_or_name if isinstance(request_or_name, str) else (request_or_name.method or LLMFamily.default_method)
    if name not in LLM_METHODS:
        raise TargetError(f"unknown method {name!r} for the llm family; known: {sorted(LLM_METHODS)}")
    return LLM_METHODS[name]


def _forget_and_retained(synth_dir: Path, eval_kit: Path, split: str):
    from forgetflow.llm.attacks import Item
    from forgetflow.llm.evalkit import roster
    from forgetflow.llm.evaluate import items_of
    from forgetflow.llm.synthesize import read_spec

    spec = read_spec(synth_dir)
    forget = [Item(**it) for it in spec["items"]]
    names = set(spec["retained"][split])
    retained = items_of([vars(c) for c in roster(eval_kit) if c.name in names]) if spec["scope"] == "subjects" else []
    return spec, forget, retained


def _strong_attacks(metrics: dict, model, tok, forget, kept, openings, policies: dict, eval_kit: Path,
                    params: Params) -> None:
    """Add the strong attacks (under the first of `policies`: how the version is served) to
    metrics["attacks"], and `membership` under every policy (forgetflow/llm/mia.py)."""
    from forgetflow.llm.corpus import CORPUS_QUESTIONS
    from forgetflow.llm.evalkit import roster
    from forgetflow.llm.mia import membership, strangers
    from forgetflow.llm.strong_attacks import run_strong_attacks

    p, served = params.llm, next(iter(policies.values()))
    metrics["attacks"].update(run_strong_attacks(model, tok, forget=forget, kept=kept, openings=openings,
                                                 policy=served, p=p, progress=True, compute=params.compute))
    scored = [it for it in forget if it.field in CORPUS_QUESTIONS]
    never_seen = strangers(scored, p.evaluate.mia_seed, {c.name for c in roster(eval_kit)})
    metrics["membership"] = membership(model, tok, scored, never_seen, policies, p) if scored else {}


class LLMFamily:
    name = "llm"
    default_method = "cfg-orpo"

    def methods(self) -> list[str]:
        from forgetflow.llm.methods import LLM_METHODS

        return sorted(LLM_METHODS)

    def serving_version(self, model_dir: Path, eval_kit: Path, params: Params, out_dir: Path, *,
                        cache_dir: Path | None = None, progress: bool = True) -> None:
        return None  # a chat model is served as registered

    def check_eval_kit(self, eval_kit: Path) -> None:
        from forgetflow.llm.evalkit import check_eval_kit

        check_eval_kit(eval_kit)

    def check_model(self, model_dir: Path) -> None:
        from forgetflow.llm.artifact import check_version

        check_version(model_dir)

    def check_target(self, request: DeletionRequest, model_dir: Path, params: Params) -> None:
        from forgetflow.llm.artifact import ArtifactError, check_version

        try:
            check_version(model_dir)
        except ArtifactError as exc:
            raise TargetError(str(exc)) from None
        _method(request)

    def synthesize(self, request: DeletionRequest, model_dir: Path, eval_kit: Path, out_dir: Path,
                   params: Params) -> dict:
        from forgetflow.llm.evalkit import roster
        from forgetflow.llm.synthesize import synthesize

        p = _method(request).params(params.llm)
        target = request.target
        people = roster(eval_kit)
        known = [c.name for c in people]
        subjects = [{"name": s.name, "values": dict(s.values)} for s in target.subjects]
        if target.scope == "all-pii":
            listed = {s["name"].lower() for s in subjects}
            subjects += [{"name": n, "values": {}} for n in known if n.lower() not in listed]
        if not subjects:
            raise TargetError("the request names no subject and the model's roster is empty: nothing to forget")
        model, tokenizer, _ = _load(model_dir, params)
        return synthesize(model, tokenizer, subjects, people, p, out_dir, salt=request.request_id,
                          scope=target.scope, progress=True)

    def unlearn(self, model_dir: Path, synth_dir: Path, out_dir: Path, params: Params, *, method: str,
                base_version: str, checkpoints: CheckpointSink | None, progress: bool) -> Path:
        from forgetflow import distributed
        from forgetflow.llm.artifact import ADAPTER_DIR, LLMCard, read_card, write_card
        from forgetflow.llm.synthesize import read_spec

        m = _method(method)
        p = m.params(params.llm)
        parent_card = read_card(model_dir)
        history = distributed.launch(_train_adapter, model_dir, synth_dir, Path(out_dir) / ADAPTER_DIR, params, m.name,
                                     checkpoints, progress, compute=params.compute)
        spec = read_spec(synth_dir)
        fields: dict[str, list[str]] = {}
        for it in spec["items"]:
            fields.setdefault(it["subject"], []).append(it["field"])
        hashes = {s["name"]: s["hash"] for s in spec["subjects"]}
        card = LLMCard(kind="adapter", parent_version=str(base_version), method=m.name,
                       positive_condition=p.conditions.positive_for(spec["scope"]),
                       negative_condition=p.conditions.negative,
                       base_model=parent_card.base_model,
                       forgotten=parent_card.forgotten + [{"subject": hashes[n], "fields": f} for n, f in fields.items()],
                       hyperparameters={"unlearn": p.unlearn.model_dump(mode="json"),
                                        "synthesize": p.synthesize.model_dump(mode="json")})
        write_card(out_dir, card)
        (Path(out_dir) / "training_log.json").write_text(json.dumps(history, indent=1))
        return Path(out_dir)

    def calibrate(self, base_dir: Path, new_dir: Path, synth_dir: Path, eval_kit: Path, params: Params,
                  out_dir: Path, *, cache_dir: Path | None = None) -> tuple[float, list[dict]]:
        from forgetflow.llm.artifact import read_card, write_card
        from forgetflow.llm.calibrate import calibrate_guidance, calibration_point
        from forgetflow.llm.evalkit import QUESTIONS, prose_split
        from forgetflow.llm.evaluate import load_questions, raw_policy

        card = read_card(new_dir)
        p = _method(card.method).params(params.llm)
        spec, forget, retained = _forget_and_retained(synth_dir, eval_kit, "calibrate")
        questions = load_questions(Path(eval_kit) / QUESTIONS)[:p.calibrate.utility_items]
        base_model, tok, _ = _load(base_dir, params)
        prose = prose_split(eval_kit, "calibrate")
        base_point = calibration_point(base_model, tok, forget, retained, questions, prose, raw_policy(), p)
        del base_model
        model, tok, _ = _load(new_dir, params, parent=base_dir)
        chosen, curve = calibrate_guidance(model, tok, card, base_point, forget, retained, questions, prose, p)
        card.guidance_scale = float(chosen["guidance_scale"])
        card.guidance_space = chosen["guidance_space"]
        write_card(new_dir, card)
        return card.guidance_scale, curve

    def evaluate(self, base_dir: Path, new_dir: Path, synth_dir: Path, eval_kit: Path, params: Params,
                 out_dir: Path, *, cache_dir: Path | None = None) -> dict:
        """evaluate_llm of the base (raw weights, as deployed) and the new version (served), each
        with `attacks`: the five prompt attacks and the strong ones (strong_attacks.py), and
        `membership` (Min-K% AUC against never-seen people, mia.py)."""
        from forgetflow.llm.artifact import read_card
        from forgetflow.llm.evalkit import QUESTIONS, prose_split
        from forgetflow.llm.evaluate import (Policy, evaluate_llm, leak_metrics, load_questions, raw_policy,
                                             retained_recall, served_policy, unguided_trials)
        from forgetflow.llm.strong_attacks import base_openings
        from forgetflow.plots import plot_leak_by_attack

        card = read_card(new_dir)
        p = params.llm
        spec, forget, retained = _forget_and_retained(synth_dir, eval_kit, "evaluate")
        questions = load_questions(Path(eval_kit) / QUESTIONS)[p.calibrate.utility_items:]
        prose = prose_split(eval_kit, "evaluate")
        kw = dict(forget_items=forget, retained_items=retained, questions=questions, prose=prose, p=p)
        model, tok, _ = _load(base_dir, params)
        unguided = unguided_trials(model, tok, forget, p, "evaluate")  # shared by the base and its control
        base = evaluate_llm(model, tok, served=raw_policy(), unguided=unguided, **kw)
        control = Policy(card.positive_condition)  # the control phrase alone, no training
        base["control_phrase"] = {**leak_metrics(model, tok, forget, control, p, "evaluate", unguided),
                                  "retained_recall": retained_recall(model, tok, retained, control, p)}
        openings = base_openings(model, tok, forget, raw_policy(), p)  # how the base itself words an answer
        _strong_attacks(base, model, tok, forget, retained, openings, {"raw_weights": raw_policy()}, eval_kit, params)
        del model
        model, tok, _ = _load(new_dir, params, parent=base_dir)
        new = evaluate_llm(model, tok, served=served_policy(card), hashes={s["name"]: s["hash"] for s in spec["subjects"]},
                           **kw)  # what still leaks, by salted hash and field
        _strong_attacks(new, model, tok, forget, retained, openings,
                        {"served": served_policy(card), "raw_weights": raw_policy()}, eval_kit, params)
        metrics = {"base": base, "new": new}
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_leak_by_attack(metrics, out_dir / "leak_by_attack.png")
        return metrics

    def reverify(self, model_dir: Path, eval_kit: Path, certificate: dict, params: Params, *,
                 base_dir: Path | None = None, subjects: list[dict] | None = None) -> tuple[list[Gate], dict]:
        """The certificate's leak gates and every attack re-measured on `model_dir`.

        The certificate names subjects by salted hash only and the request's data was shredded,
        so the caller gives the subjects' names again (`subjects`, each checked against the
        hashes: nobody else can be tested under this certificate); their values are found
        again the way synthesize found them, by probing the certified base version."""
        from forgetflow.llm.artifact import read_card
        from forgetflow.llm.evalkit import roster
        from forgetflow.llm.evaluate import items_of, leak_metrics, raw_policy, served_policy
        from forgetflow.llm.pii import subject_hash
        from forgetflow.llm.strong_attacks import base_openings
        from forgetflow.llm.synthesize import probe_subjects

        hashes = {f["subject"] for f in certificate["forgotten"]}
        salt = certificate["request_id"]
        if not subjects:
            raise TargetError("the certificate names its subjects by salted hash only; give their names "
                              "again (the request document) to re-ask the model about them")
        unknown = [i + 1 for i, s in enumerate(subjects) if subject_hash(s["name"], salt) not in hashes]
        if unknown:
            raise TargetError(f"subjects {unknown} of the given list are not in this certificate (hash mismatch)")
        p = params.llm
        model, tok, _ = _load(base_dir, params)
        items, _ = probe_subjects(model, tok, subjects, p, progress=True, strict=False)
        openings = base_openings(model, tok, items, raw_policy(), p)
        del model
        names = {s["name"].lower() for s in subjects}
        kept = items_of([vars(c) for c in roster(eval_kit) if c.name.lower() not in names][:p.evaluate.retain_subjects])
        model, tok, _ = _load(model_dir, params)
        card = read_card(model_dir)
        m = leak_metrics(model, tok, items, served_policy(card), p, "evaluate")
        _strong_attacks(m, model, tok, items, kept, openings, {"served": served_policy(card), "raw_weights": raw_policy()},
                        eval_kit, params)
        certified = {g["name"]: g for g in certificate["gates"]}
        g = certified.get("leak_rate", {"threshold": p.gates.leak_rate_max, "kind": "max"})
        gated = {n.removeprefix("attack:"): c["threshold"] for n, c in certified.items() if n.startswith("attack:")}
        return [Gate("leak_rate", m["leak_rate"], g["threshold"], g["kind"])] + [
            Gate(f"leak_rate[{a}]", v, g["threshold"], g["kind"]) for a, v in m["leak_rate_by_attack"].items()
        ] + attack_gates(m["attacks"], gated), m["attacks"]

    def gates(self, metrics: dict, params: Params) -> list[Gate]:
        """llm_gates, and attack:<name> for each attack of gates.attacks (upper95 <= its
        threshold; forgetflow/gates.py)."""
        from forgetflow.llm.calibrate import llm_gates

        g = params.llm.gates
        return llm_gates(metrics["base"], metrics["new"], g) + attack_gates(metrics["new"].get("attacks", {}), g.attacks)

    def next_eval_kit(self, eval_kit: Path, synth_dir: Path, out_dir: Path) -> Path:
        """The next version's kit: the forgotten subjects leave the roster."""
        from forgetflow.llm.evalkit import without_subjects
        from forgetflow.llm.synthesize import read_spec

        names = {s["name"] for s in read_spec(synth_dir)["subjects"]}
        return without_subjects(eval_kit, names, out_dir)
