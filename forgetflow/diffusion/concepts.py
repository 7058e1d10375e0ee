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

A request's concept and prompts are its content (DESIGN invariant 6): they live in the sealed
forget spec only. The model card records each forgotten concept as

    {"concept": salted hash, "salt": request id, "override": the override phrase,
     "prompts": salted digest of its forget prompts}

(the override is what the model now draws: anyone can see it by prompting). A later request of
the lineage, and the re-verification of a certificate, recompute the clear records in memory
from the public vocabulary (`lineage_records`): the concept whose salted hash matches, and its
template prompts, checked against the digest. Prompts a request listed itself cannot be
recomputed, so a version that forgot them takes no further concept request (TargetError).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from forgetflow.families import TargetError
from forgetflow.llm.pii import subject_hash


@dataclass(frozen=True)
class PromptForget:
    """What one SFD run on a prompt model forgets and keeps: `forget` records
    {concept, override, forget_prompt, override_prompt} and the `retain` prompts."""

    forget: list[dict]
    retain: list[str] = field(default_factory=list)
    salt: str = ""  # the request id: what the card's hashes of these records are salted with

    def to_dict(self) -> dict:
        return {"forget": self.forget, "retain": self.retain, "salt": self.salt}

    @classmethod
    def from_dict(cls, data: dict) -> "PromptForget":
        return cls(forget=list(data["forget"]), retain=list(data["retain"]), salt=data.get("salt", ""))


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


def forget_records(vocabulary: dict, concept: str, override: str, prompts: list[str]) -> list[dict]:
    """Each forget prompt with its override prompt: the same sentence, the concept's words
    replaced by `override`."""
    words = concept_words(vocabulary, concept)
    return [{"concept": concept, "override": override, "forget_prompt": p,
             "override_prompt": replace_concept(p, words, override)} for p in prompts]


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
    records = forget_records(vocabulary, concept, override, forget_prompts)
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
            raise ValueError("an override prompt is itself a forget prompt")
    return list(merged.values())


def prompts_digest(prompts: list[str], salt: str) -> str:
    return subject_hash("\n".join(sorted(prompts)), salt)


def card_records(records: list[dict], salt: str) -> list[dict]:
    """What a model card keeps of a request's forget records: one entry per concept, no
    concept or prompt in clear (module docstring)."""
    if records and not salt:
        raise ValueError("a concept's card record needs its request's salt (PromptForget.salt)")
    by_concept: dict[str, list[dict]] = {}
    for r in records:
        by_concept.setdefault(r["concept"], []).append(r)
    return [{"concept": subject_hash(c, salt), "salt": salt, "override": rs[0]["override"],
             "prompts": prompts_digest([r["forget_prompt"] for r in rs], salt)} for c, rs in by_concept.items()]


def hashes_to(record: dict, text: str) -> bool:
    """True if the card record's concept is `text` (its salted hash matches)."""
    return subject_hash(text, record["salt"]) == record["concept"]


def lineage_records(recorded: list[dict], vocabulary: dict) -> list[dict]:
    """The clear forget records of every concept a card records, recomputed from the public
    vocabulary (kept in memory and in sealed specs only). TargetError where the vocabulary
    cannot give a concept or its prompts back."""
    out = []
    for i, record in enumerate(r for r in recorded if "concept" in r):
        concept = next((c for c in vocabulary.get("concepts", []) if hashes_to(record, c)), None)
        if concept is None:
            raise TargetError(f"forgotten concept {i + 1} of this lineage is not in the model's vocabulary: it is "
                              "kept only as a salted hash, so a later concept request cannot re-derive its prompts")
        prompts = template_prompts(vocabulary, concept)
        if prompts_digest(prompts, record["salt"]) != record["prompts"]:
            raise TargetError(f"forgotten concept {i + 1} of this lineage was forgotten on prompts its request "
                              "listed itself, kept only as a salted digest: a later concept request cannot re-derive them")
        out += forget_records(vocabulary, concept, record["override"], prompts)
    return out
