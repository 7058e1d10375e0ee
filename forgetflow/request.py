"""Deletion requests: the document a privacy engineer files, parsed and validated.

A request is YAML or JSON. Example (diffusion class forgetting)::

    request_id: req-0001
    model: digits-ddpm
    target:
      kind: diffusion-class
      classes: [7]
      override: {7: 8}        # optional; default rule: params.diffusion.sfd.override_rule
      override_rule: next     # optional: next | random (each sample a random remaining class, realism-gated)
    method: sfd               # optional; the family's default method
    requester: privacy-team
    reason: GDPR Art. 17 request 2026-118

Text-to-image example (a concept, Stable-Diffusion style)::

    request_id: req-0003
    model: digits-t2i
    target:
      kind: diffusion-concept
      concept: seven
      override: eight          # the neutral phrase forget prompts are redrawn as
      forget_prompts: [...]    # optional; default: the model's templates with the concept
      retain_prompts: [...]    # optional; default: the templates with every other concept

LLM example (named people's personal data)::

    request_id: req-0002
    model: support-llm
    target:
      kind: llm-subjects
      scope: subjects          # or all-pii
      subjects:
        - name: Jane Roe
          values: {phone: 555-201-0147}   # optional known values
    method: cfg-orpo

`target.kind` selects the model family; each family adds its target type to the
discriminated union below (LLM subjects, text-to-image concepts). Anything malformed raises
:class:`RequestError` whose message names the field and why; nothing is half-processed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_REQUEST_BYTES = 1_000_000
SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # no path separators, no leading dot


class RequestError(ValueError):
    """The request document is unreadable or invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiffusionClassTarget(_Strict):
    """Forget whole classes of a class-conditional diffusion model (SFD, class setting)."""

    kind: Literal["diffusion-class"]
    classes: list[int] = Field(min_length=1, max_length=64)
    override: dict[int, int] = Field(default_factory=dict)
    # next: the next remaining class; random: a random remaining class per sample (opt-in; the
    # forget row is then gated on realism). None: params.diffusion.sfd.override_rule.
    override_rule: Literal["next", "random"] | None = None

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if any(c < 0 for c in v):
            raise ValueError("class labels are non-negative integers")
        if len(set(v)) != len(v):
            raise ValueError("a class is listed twice")
        return v

    @model_validator(mode="after")
    def _override_consistent(self) -> "DiffusionClassTarget":
        for forget, override in self.override.items():
            if forget not in self.classes:
                raise ValueError(f"override given for class {forget}, which is not in classes")
            if override == forget:
                raise ValueError(f"override class of {forget} is the forget class itself")
            if override in self.classes:
                raise ValueError(f"override class {override} is itself being forgotten")
        return self

    @property
    def family(self) -> str:
        return "diffusion"


Prompt = Annotated[str, Field(min_length=1, max_length=300)]


class DiffusionConceptTarget(_Strict):
    """Forget a concept of a text-to-image diffusion model (SFD, text-to-image setting): each
    forget prompt is redrawn as the same prompt with the concept replaced by `override`."""

    kind: Literal["diffusion-concept"]
    concept: str = Field(min_length=1, max_length=100)
    override: str = Field(min_length=1, max_length=100)
    forget_prompts: list[Prompt] | None = Field(None, max_length=500)
    retain_prompts: list[Prompt] | None = Field(None, max_length=2000)

    @field_validator("concept", "override")
    @classmethod
    def _phrase(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v or not v.isprintable():
            raise ValueError("a concept or override is printable text")
        return v

    @field_validator("forget_prompts", "retain_prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an empty prompt list; leave it out to build prompts from the model's templates")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "DiffusionConceptTarget":
        if self.concept.lower() == self.override.lower():
            raise ValueError("the override is the concept itself")
        return self

    @property
    def family(self) -> str:
        return "diffusion"


PII_FIELDS = ("email", "phone", "address", "account")


class Subject(_Strict):
    """A person whose data the model must forget: the name, optionally values already known
    (the model is probed for what it actually emits either way)."""

    name: str = Field(min_length=2, max_length=200)
    values: dict[Literal["email", "phone", "address", "account"], str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        v = " ".join(v.split())
        if len(v) < 2 or not v.isprintable():
            raise ValueError("a subject name is printable text of 2-200 characters")
        return v

    @field_validator("values")
    @classmethod
    def _values(cls, v: dict) -> dict:
        for field, value in v.items():
            if not 3 <= len(value.strip()) <= 200:
                raise ValueError(f"the known {field} value must be 3-200 characters")
        return v


class LLMSubjectsTarget(_Strict):
    """Forget named people's personal data from a chat model (retain-free CFG-ORPO).

    scope `subjects`: forget these people, keep everyone else working; `all-pii`: never emit
    personal data about anyone the model knows (the LLM Privacy Challenge's setting)."""

    kind: Literal["llm-subjects"]
    subjects: list[Subject] = Field(default_factory=list, max_length=500)
    scope: Literal["subjects", "all-pii"] = "subjects"

    @model_validator(mode="after")
    def _subjects(self) -> "LLMSubjectsTarget":
        if self.scope == "subjects" and not self.subjects:
            raise ValueError("scope 'subjects' needs at least one subject")
        names = [s.name.lower() for s in self.subjects]
        if len(set(names)) != len(names):
            raise ValueError("a subject is listed twice")
        return self

    @property
    def family(self) -> str:
        return "llm"


Target = Annotated[Union[DiffusionClassTarget, DiffusionConceptTarget, LLMSubjectsTarget], Field(discriminator="kind")]


class DeletionRequest(_Strict):
    request_id: str = Field(pattern=SAFE_ID)
    model: str = Field(pattern=SAFE_ID)
    target: Target
    method: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    requester: str = Field("unknown", max_length=200)
    reason: str = Field("", max_length=2000)

    @property
    def family(self) -> str:
        return self.target.family

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """SHA-256 of the canonical document: the same id with another body is a conflict."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(document)"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def parse_request(data: dict) -> DeletionRequest:
    if not isinstance(data, dict):
        raise RequestError("invalid request: the document must be a mapping of fields")
    try:
        return DeletionRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestError(_format_error(exc)) from None


def parse_request_text(text: str | bytes) -> DeletionRequest:
    """Parse YAML or JSON (JSON is YAML). Anchors/aliases are refused (no YAML bombs)."""
    if len(text) > MAX_REQUEST_BYTES:
        raise RequestError(f"invalid request: larger than {MAX_REQUEST_BYTES} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("invalid request: not UTF-8 text") from None
    try:
        events = list(yaml.parse(text, Loader=yaml.SafeLoader))
        if any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None) for e in events):
            raise RequestError("invalid request: YAML anchors and aliases are not allowed")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RequestError(f"invalid request: malformed YAML/JSON{where}") from None
    return parse_request(data)


def load_request(path: str | Path) -> DeletionRequest:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_REQUEST_BYTES:
            raise RequestError(f"invalid request: {path.name} is larger than {MAX_REQUEST_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise RequestError(f"cannot read request file {path}: {exc.strerror}") from None
    return parse_request_text(raw)
