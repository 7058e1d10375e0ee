"""Metrics of a text-to-image version, judged per prompt by the digit judge.

Each prompt is judged against the concept it names (the judge's class names are the model's
concepts). Over the samples of a prompt set (each prompt's noise seeded by the evaluation seed
and the prompt's text, so base and new versions see the same noise per prompt):

    forget_rate            = P(judge says the concept | forget prompt)          (trained prompts)
    paraphrase_forget_rate = P(judge says the concept | paraphrase)             (never trained on)
    attacks.forget / .paraphrase  the same two rates as records with n and exact bounds
                             (forgetflow/stats.py); n = 0 with a reason when the judge has no
                             class for the concept (its gates then fail closed)
    override_fidelity      = P(judge says the override | forget prompt)
    retain_accuracy        = mean over retained concepts of P(judge says it | its retain prompts)
    style_accuracy         = P(ink fraction on the prompt's side of the style threshold | retain
                             prompts that name a style)  (captions.style_threshold)
    retain_fd              = FD(judge features of retain samples, real test digits of the
                             retained concepts, both styles)
    real_fd_floor          = FD(real train, real test) of the same digits
FD as in evaluate.py. Forget metrics are None when nothing is forgotten. No metric is keyed by
concept: which concepts are kept would say which one was forgotten (DESIGN invariant 6).
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from forgetflow.compute import resolve_device
from forgetflow.config import Params
from forgetflow.diffusion import captions
from forgetflow.diffusion.artifact import load_version
from forgetflow.diffusion.concepts import concept_words, mentions
from forgetflow.diffusion.evaluate import frechet_distance
from forgetflow.diffusion.judge import load_judge, load_judge_card
from forgetflow.diffusion.sample_cache import sample_conditions
from forgetflow.diffusion.sampling import nfe
from forgetflow.stats import rate_record


def prompt_seed(seed: int, prompt: str) -> int:
    return seed * 1_000_003 + zlib.crc32(prompt.encode())


def named_concept(prompt: str, vocabulary: dict, concepts: list[str]) -> str | None:
    """The one concept of `concepts` that `prompt` names (word or alias), else None."""
    named = [c for c in concepts if mentions(prompt, concept_words(vocabulary, c))]
    return named[0] if len(named) == 1 else None


def named_style(prompt: str, styles: list[str]) -> int | None:
    named = [i for i, s in enumerate(styles) if mentions(prompt, [s])]
    return named[0] if len(named) == 1 else None


def _spread(prompts: list[str], total: int) -> dict[str, int]:
    """`total` samples over `prompts`, as evenly as possible (at least one each)."""
    n = len(prompts)
    return {p: max(1, total // n + (i < total % n)) for i, p in enumerate(prompts)} if n else {}


def evaluate_prompt_version(version_dir: Path, judge_dir: Path, spec: dict, params: Params, *, seed: int,
                            guidance_scale: float | None = None, device: torch.device | None = None,
                            samples_scale: float = 1.0, cache_dir: Path | None = None,
                            progress: bool = False) -> dict:
    """All metrics of one prompt version (module docstring). spec: {"forget": records
    [{concept, override, forget_prompt, override_prompt}], "retain": prompts, "paraphrases":
    {concept: prompts}} (the synthesize stage's). A multi-step version's samples are kept in
    `cache_dir` (sample_cache.py)."""
    ev = params.diffusion.text_to_image.evaluate
    device = device or resolve_device(params.compute)
    version = load_version(version_dir, device)
    judge, judge_card = load_judge(judge_dir, device), load_judge_card(judge_dir)
    names = judge_card.get("class_names") or [str(i) for i in range(judge_card["num_classes"])]
    vocab = version.card.vocabulary
    forgotten = {r["concept"] for r in spec["forget"]}
    kept = [c for c in names if c not in forgotten]

    scaled = lambda n: max(1, round(n * samples_scale))  # noqa: E731
    retain_by_concept: dict[str, list[str]] = {}
    for p in spec["retain"]:
        concept = named_concept(p, vocab, names)
        if concept in kept:
            retain_by_concept.setdefault(concept, []).append(p)
    counts: dict[str, int] = {}
    for prompts in retain_by_concept.values():
        counts.update(_spread(prompts, scaled(ev.samples_per_retained_concept)))
    forget_prompts = [r["forget_prompt"] for r in spec["forget"]]
    paraphrases = [p for ps in spec.get("paraphrases", {}).values() for p in ps]
    counts.update(_spread(forget_prompts, scaled(ev.forget_samples)))
    counts.update(_spread(paraphrases, scaled(ev.forget_samples)))

    prompts = list(counts)
    ids = torch.cat([torch.full((counts[p],), i, dtype=torch.long) for i, p in enumerate(prompts)])
    w = version.card.guidance_scale if guidance_scale is None else float(guidance_scale)
    drawn, spent = sample_conditions(version, version_dir, counts, noise_seed=lambda p: prompt_seed(seed, p),
                                     guidance_scale=w, params=params, device=device, cache_dir=cache_dir,
                                     progress=progress)
    images, seconds = torch.cat([drawn[p] for p in prompts]), sum(spent.values())
    said = judge.predict_proba(images).argmax(dim=1)
    feats = judge.features(images)
    of_prompt = {p: ids == i for i, p in enumerate(prompts)}

    def judged(prompt_list: list[str], concept_of) -> tuple[int, int]:
        """(samples the judge calls concept_of(prompt), samples it can judge): a prompt whose
        concept the judge has no class for counts in neither."""
        hits, n = 0, 0
        for p in prompt_list:
            target = concept_of(p)
            if target is None or target not in names:
                continue
            mask = of_prompt[p]
            hits += int((said[mask] == names.index(target)).sum())
            n += int(mask.sum())
        return hits, n

    def share(prompt_list: list[str], concept_of) -> float | None:
        hits, n = judged(prompt_list, concept_of)
        return hits / n if n else None

    record_of = {r["forget_prompt"]: r for r in spec["forget"]}
    per_concept = {c: share(ps, lambda p, c=c: c) for c, ps in retain_by_concept.items()}
    threshold = captions.style_threshold(version.card.image_size)
    ink = captions.ink_fraction(images)
    styled = [(p, named_style(p, vocab.get("styles", []))) for ps in retain_by_concept.values() for p in ps]
    style_hits = [((ink[of_prompt[p]] > threshold) == bool(s)).float() for p, s in styled if s is not None]

    test_images, test_labels, _ = captions.load_captioned_split("test", version.card.image_size)
    train_images, train_labels, _ = captions.load_captioned_split("train", version.card.image_size)
    kept_ids = torch.tensor([names.index(c) for c in retain_by_concept])
    keep_test, keep_train = torch.isin(test_labels, kept_ids), torch.isin(train_labels, kept_ids)
    test_feats = judge.features(test_images[keep_test])
    retain_mask = torch.zeros(len(ids), dtype=torch.bool)
    for ps in retain_by_concept.values():
        for p in ps:
            retain_mask |= of_prompt[p]
    paraphrase_concept = {p: c for c, ps in spec.get("paraphrases", {}).items() for p in ps}
    kept_accuracy = [a for a in per_concept.values() if a is not None]
    def attack(prompt_list: list[str], concept_of) -> dict:
        hits, n = judged(prompt_list, concept_of)
        return rate_record(hits, n) if n else rate_record(0, 0, reason="the judge has no class for the forgotten "
                                                                          "concept: its rate cannot be measured")

    attacks = {"forget": attack(forget_prompts, lambda p: record_of[p]["concept"])} if forget_prompts else {}
    if paraphrases:
        attacks["paraphrase"] = attack(paraphrases, paraphrase_concept.get)
    return {
        "kind": version.card.kind,
        "attacks": attacks,
        "forget_rate": share(forget_prompts, lambda p: record_of[p]["concept"]) if forget_prompts else None,
        "paraphrase_forget_rate": share(paraphrases, paraphrase_concept.get) if paraphrases else None,
        "override_fidelity": share(forget_prompts, lambda p: record_of[p]["override"]) if forget_prompts else None,
        "retain_accuracy": float(np.mean(kept_accuracy)) if kept_accuracy else None,
        "style_accuracy": torch.cat(style_hits).mean().item() if style_hits else None,
        "retain_fd": frechet_distance(feats[retain_mask], test_feats) if retain_by_concept else None,
        "real_fd_floor": frechet_distance(judge.features(train_images[keep_train]), test_feats) if retain_by_concept else None,
        "samples": {"forget": sum(counts[p] for p in forget_prompts), "paraphrase": sum(counts[p] for p in paraphrases),
                    "retain": int(retain_mask.sum())},
        "seconds_per_1000_samples": seconds * 1000.0 / len(ids),
        "nfe": nfe(version, w, params),
        "guidance_scale": w,
    }
