"""Concept forgetting for text-to-image models: a request's prompts, built or checked.

A text-to-image request names a concept ("seven") and an override phrase ("eight"). Each
forget prompt p_f names the concept; its override prompt p_o is the same sentence with the
concept (and its aliases) replaced by the override (SFD's text-to-image setting: the teacher
is asked for p_o where the generator is asked for p_f). Retain prompts are SFD's keep rows.
Without lists, prompts come from the model card's vocabulary:

    forget   = templates x {concept} x styles            override = the same with the override
    retain   = templates x (concepts not forgotten, not the concept) x styles
    paraphrases (evaluation only, never trained on) = card paraphrases x {concept, its aliases}

A model without a vocabulary (a pipeline a user brings) needs both lists in the request.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from forgetflow.families import TargetError


@dataclass(frozen=True)
class PromptForget:
    """What one SFD run on a prompt model forgets and keeps: `forget` records
    {concept, override, forget_prompt, override_prompt} and the `retain` prompts."""

    forget: list[dict]
    retain: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"forget": self.forget, "retain": self.retain}

    @classmethod
    def from_dict(cls, data: dict) -> "PromptForget":
        return cls(forget=list(data["forget"]), retain=list(data["retain"]))


def mentions(prompt: str, words: list[str]) -> bool:
    """True if the prompt names any of `words` as a whole word (case-insensitive)."""
    return any(re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", prompt, flags=re.IGNORECASE) for w in words)


def replace_concept(prompt: str, words: list[str], override: str) -> str:
    """The prompt with every whole-word mention of `words` replaced by `override`."""
    for w in sorted(words, key=len, reverse=True):
        prompt = re.sub(rf"(?<![\w]){re.escape(w)}(?![\w])", override, prompt, flags=re.IGNORECASE)
    return prompt


def _fill(templates: list[str], concept: str, alias: str, styles: list[str]) -> list[str]:
    out = []
    for template in templates:
        for style in styles if "{style}" in template else styles[:1]:
            out.append(template.format(concept=concept, alias=alias, style=style))
    return list(dict.fromkeys(out))


def concept_words(vocabulary: dict, concept: str) -> list[str]:
    return [concept, *vocabulary.get("aliases", {}).get(concept, [])]


def template_prompts(vocabulary: dict, concept: str) -> list[str]:
    """The request templates filled with `concept` (its first alias where a template asks for one)."""
    alias = (vocabulary.get("aliases", {}).get(concept) or [concept])[0]
    return _fill(vocabulary.get("templates", []), concept, alias, vocabulary.get("styles", [""]) or [""])


def paraphrase_prompts(vocabulary: dict, concept: str) -> list[str]:
    """The card's held-out paraphrases of `concept` (never in a request's training prompts)."""
    out = []
    for alias in vocabulary.get("aliases", {}).get(concept) or [concept]:
        out += _fill(vocabulary.get("paraphrases", []), concept, alias, vocabulary.get("styles", [""]) or [""])
    return list(dict.fromkeys(out))


def build_prompt_forget(vocabulary: dict, concept: str, override: str, *, forgotten: list[str],
                        forget_prompts: list[str] | None = None, retain_prompts: list[str] | None = None) -> PromptForget:
    """The forget records and retain prompts of a request (see the module docstring).
    `forgotten`: concepts earlier requests of the lineage forgot (never retained)."""
    words = concept_words(vocabulary, concept)
    if forget_prompts is None:
        if not vocabulary.get("templates"):
            raise TargetError("this model has no prompt vocabulary: list the request's forget_prompts and retain_prompts")
        forget_prompts = template_prompts(vocabulary, concept)
    missing = [p for p in forget_prompts if not mentions(p, words)]
    if missing:
        raise TargetError(f"{len(missing)} forget prompt(s) do not name the concept {concept!r}")
    records = [{"concept": concept, "override": override, "forget_prompt": p,
                "override_prompt": replace_concept(p, words, override)} for p in forget_prompts]
    gone = [concept, *forgotten]
    if retain_prompts is None:
        if not vocabulary.get("templates"):
            raise TargetError("this model has no prompt vocabulary: list the request's retain_prompts")
        retain_prompts = [p for c in vocabulary.get("concepts", []) if c not in gone
                          for p in template_prompts(vocabulary, c)]
    gone_words = [w for c in gone for w in concept_words(vocabulary, c)]
    leaking = [p for p in retain_prompts if mentions(p, gone_words)]
    if leaking:
        raise TargetError(f"{len(leaking)} retain prompt(s) name a concept being or already forgotten")
    if not retain_prompts:
        raise TargetError("no retain prompts: nothing would anchor what the model keeps")
    return PromptForget(forget=records, retain=list(dict.fromkeys(retain_prompts)))


def merge_prompt_records(previous: list[dict], new: list[dict]) -> list[dict]:
    """previous ∪ new forget records (a new record replaces an old one for the same forget
    prompt); ValueError if an override prompt is itself a forget prompt."""
    merged = {r["forget_prompt"]: r for r in previous}
    merged.update({r["forget_prompt"]: r for r in new})
    for r in merged.values():
        if r["override_prompt"] in merged:
            raise ValueError(f"an override prompt is itself a forget prompt (concept {r['concept']!r})")
    return list(merged.values())
