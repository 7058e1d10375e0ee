"""The evaluation kit of an LLM: what forgetting and utility are measured against.

    eval_kit_card.json        {"family": "llm", ...counts}
    roster.json               the subjects the model holds data about, with their values
                              (the owner's own records; needed to measure retained recall)
    general_knowledge.jsonl   >= 200 multiple-choice items written for forgetflow
    prose.txt                 general English prose that ships with installed packages:
                              scikit-learn's data-set descriptions, then standard-library
                              module docstrings

The kit is versioned by content in the object store beside the model (eval-kits/<model>/<hash>).
After a request, the next version's kit is this one without the forgotten subjects
(`without_subjects`): a later version never carries data it was asked to forget.
"""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from forgetflow.llm.corpus import Customer, read_roster, write_roster

KIT_CARD = "eval_kit_card.json"
ROSTER = "roster.json"
QUESTIONS = "general_knowledge.jsonl"
PROSE = "prose.txt"
PACKAGED_QUESTIONS = Path(__file__).with_name("data") / QUESTIONS
PROSE_MODULES = ("argparse", "textwrap", "difflib", "heapq", "bisect", "fractions", "statistics", "shlex",
                 "calendar", "dataclasses", "enum", "functools", "pickle", "csv", "json", "random", "string",
                 "contextlib", "abc", "typing")


def _prose_paragraphs(doc: str) -> list[str]:
    out = []
    for para in doc.split("\n\n"):
        text = " ".join(line.strip() for line in para.splitlines()).strip()
        if len(text) > 80 and "--" not in text and not any(ch in text for ch in "{}>=[]|@:*`_") and text[0].isalpha():
            out.append(text)
    return out


def general_prose(max_chars: int) -> str:
    """English prose paragraphs (no code, tables, markup or e-mail addresses), in a fixed order."""
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    docs = [f.read_text(encoding="utf-8") for f in sorted(descr.glob("*.rst"))]
    docs += [importlib.import_module(name).__doc__ or "" for name in PROSE_MODULES]
    paragraphs = [para for doc in docs for para in _prose_paragraphs(doc)]
    return "\n\n".join(paragraphs)[:max_chars]


def build_eval_kit(customers: list[Customer], out: Path, prose_chars: int) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_roster(customers, out / ROSTER)
    shutil.copyfile(PACKAGED_QUESTIONS, out / QUESTIONS)
    (out / PROSE).write_text(general_prose(prose_chars))
    n_questions = sum(1 for l in (out / QUESTIONS).read_text(encoding="utf-8").splitlines() if l.strip())
    (out / KIT_CARD).write_text(json.dumps({"family": "llm", "subjects": len(customers), "questions": n_questions}))
    return out


def check_eval_kit(kit: Path) -> None:
    kit = Path(kit)
    for name in (KIT_CARD, ROSTER, QUESTIONS, PROSE):
        if not (kit / name).exists():
            raise FileNotFoundError(f"{kit} is not an LLM evaluation kit (no {name})")


def prose_split(kit: Path, split: str) -> str:
    """Alternate paragraphs of the kit's prose: even ones calibrate, odd ones evaluate."""
    paragraphs = (Path(kit) / PROSE).read_text().split("\n\n")
    return "\n\n".join(paragraphs[0 if split == "calibrate" else 1::2])


def roster(kit: Path) -> list[Customer]:
    return read_roster(Path(kit) / ROSTER)


def without_subjects(kit: Path, names: set[str], out: Path) -> Path:
    """A copy of the kit whose roster no longer lists `names`."""
    out = Path(out)
    shutil.copytree(kit, out, dirs_exist_ok=True)
    kept = [c for c in roster(kit) if c.name not in names]
    write_roster(kept, out / ROSTER)
    card = json.loads((out / KIT_CARD).read_text())
    card["subjects"] = len(kept)
    (out / KIT_CARD).write_text(json.dumps(card))
    return out
