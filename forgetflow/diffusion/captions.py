"""Captioned digits: the small text-to-image data set this CPU can train on from scratch.

Every digit image of the fixed split (data.py) comes in two stroke styles: "thin" (the image
itself) and "thick" (grey levels dilated by a 3x3 max filter, about 1.7x the ink). Captions
are drawn from templates that name the digit (its word, or its numeral as an alias) and,
in some templates, the style:

    request templates    "a handwritten {concept}", "a handwritten {concept}, {style} stroke",
                         "a {style} {concept}"                    (what a request's prompts use)
    paraphrases          "the digit {alias}", "number {concept}"  (held out of every request)

The base model trains on both, so it understands the paraphrases, which SFD never sees: they
measure whether forgetting generalises beyond the prompts it was trained on. The vocabulary
(concepts, aliases, styles, templates, paraphrases) goes into the model card, so requests
build their prompts from the model's own vocabulary (concepts.py).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from forgetflow.diffusion.data import load_digits_split

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STYLES = ["thin", "thick"]
TEMPLATES = ["a handwritten {concept}", "a handwritten {concept}, {style} stroke", "a {style} {concept}"]
PARAPHRASES = ["the digit {alias}", "number {concept}"]


def vocabulary() -> dict:
    """The card's vocabulary of the captioned-digits model."""
    return {"concepts": DIGIT_WORDS, "aliases": {w: [str(i)] for i, w in enumerate(DIGIT_WORDS)},
            "styles": STYLES, "templates": TEMPLATES, "paraphrases": PARAPHRASES}


def thicken(images: Tensor) -> Tensor:
    """The "thick" style: a 3x3 grey-level dilation of images in [-1, 1]."""
    return F.max_pool2d(images, kernel_size=3, stride=1, padding=1)


def fill(template: str, concept: str, style: str, alias: str) -> str:
    return template.format(concept=concept, style=style, alias=alias)


def load_captioned_split(split: Literal["train", "test"], image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Images [2N, 1, S, S] in [-1, 1] (every digit thin, then thick), digit labels [2N] and
    style ids [2N] (index into STYLES)."""
    images, labels = load_digits_split(split, image_size)
    n = len(labels)
    return (torch.cat([images, thicken(images)]), labels.repeat(2),
            torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]))


def caption(label: int, style: int, rng: torch.Generator) -> str:
    """One caption of a digit image, from every template (request templates and paraphrases)."""
    templates = TEMPLATES + PARAPHRASES
    template = templates[int(torch.randint(len(templates), (1,), generator=rng))]
    return fill(template, DIGIT_WORDS[label], STYLES[style], str(label))


def all_captions() -> list[str]:
    """Every caption the templates can make (the tokenizer's training text)."""
    return sorted({fill(t, w, s, str(i)) for t in TEMPLATES + PARAPHRASES
                   for i, w in enumerate(DIGIT_WORDS) for s in STYLES})


def ink_fraction(images: Tensor) -> Tensor:
    """Share of pixels brighter than mid-grey, per image: the stroke-style statistic."""
    return (images > 0.0).float().flatten(1).mean(dim=1)


def style_threshold(image_size: int) -> float:
    """The ink fraction halfway between real thin and real thick train digits (98.7% of real
    train digits fall on their style's side at 16x16)."""
    images, _, styles = load_captioned_split("train", image_size)
    ink = ink_fraction(images)
    return float((ink[styles == 0].mean() + ink[styles == 1].mean()) / 2)
