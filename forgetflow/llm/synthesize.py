"""Forget, replacement and retain rows, from the request and the model alone (no retain set,
no original training data).

1. Probe: ask the champion about every subject and field (a neutral system prompt; the
   corpus's train wordings plus, with `synth_wordings`, wordings in no corpus) and keep what it
   actually emits: the request's known values where they appear, and values the pattern
   recognizers find under at least `min_agreement` corpus wordings that are not another listed
   person's (a model asked about a stranger often answers with some other customer's data;
   forgetting that would erase the wrong person). A subject the model says nothing personal
   about is an error (nothing to forget; we do not train).
2. Forget rows, as in the paper: prompt = the probe question + the model's own answer up to the
   value (the assistant `prefix`), rejected = the leaking continuation from the value on,
   chosen = a continuation made without the data (a withholding phrase, or a consistent
   surrogate value), checked so that no forgotten value survives in it. Every probe wording
   whose answer leaked gives a pair. Scoring only what follows the prefix matters: penalising
   the whole leaking answer also penalises its wording ("The phone number of ... is"), which
   every other customer's answer shares; measured on the tiny model, that garbled kept
   customers' answers (recall 0.95 -> 0.59).
3. Conditions (cfg-llm.md): every pair under c_pos; under c_neg either also chosen =
   replacement (`negative_pairs: forget`, ours) or swapped (`swapped`, the paper's recipe,
   which builds an extraction switch, measured); with `train_conditions: all` also under the
   neutral and adversarial system prompts, so the raw weights forget, not only a refusal tied
   to an instruction. `conditions_per_row: k` trains each row under c_pos and k - 1 of the
   others in turn instead of all of them (every condition still seen, on fewer rows);
   `retain_conditions_per_row` does the same for retain rows.
4. Retain rows (what keeps the other customers working without their data): the model's own
   answers about other roster subjects, under the same wordings and conditions (the trainer
   holds the adapted model to the base on them, orpo.py).

Splits: only `train` wordings are trained on; calibration and evaluation use other wordings
and paraphrases, and evaluation uses other retained subjects than these.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from forgetflow.config import LLMParams
from forgetflow.families import TargetError
from forgetflow.llm.attacks import Item, Probe, direct_probes, synth_probes
from forgetflow.llm.chat import prompt_ids
from forgetflow.llm.corpus import FIELD_NOUNS, FIELDS
from forgetflow.llm.generation import generate
from forgetflow.llm.pii import leaked, normalise, recognise, scrub, subject_hash

SPEC_FILE = "forget_spec.json"
ROWS_FILE = "train_rows.jsonl"
REFUSAL = "I'm sorry, but I can't share the {noun} of {name}."  # when the value is not found verbatim
WITHHELD = " withheld for privacy reasons."  # the continuation after the answer's own prefix


class NothingToForget(TargetError):
    """The model emits no personal data about a subject (or none of the known values)."""


def split_roster(roster_names: list[str], forget: set[str], n_calibrate: int, n_evaluate: int,
                 seed: int) -> dict[str, list[str]]:
    """Disjoint retained subjects for training (retain rows), calibration and evaluation."""
    others = sorted(n for n in roster_names if n not in forget)
    random.Random(seed).shuffle(others)
    evaluate = others[:n_evaluate]
    calibrate = others[n_evaluate:n_evaluate + n_calibrate]
    train = others[n_evaluate + n_calibrate:]
    return {"train": train, "calibrate": calibrate, "evaluate": evaluate}


def _surrogate(field: str, rng: random.Random) -> str:
    from forgetflow.llm.corpus import make_customers

    return make_customers(1, rng.randint(10**6, 10**9))[0].value(field)


def forget_pair(p: LLMParams, answer: str, item: Item, rng: random.Random,
                scope: str = "subjects") -> tuple[str | None, str, str]:
    """(assistant prefix or None, chosen, rejected) for one leaking answer.

    With the value verbatim in the answer: prefix = the text before it, rejected = the value
    and the rest, chosen = a withholding phrase (refusal) or a surrogate value with the same
    rest. Otherwise the whole answer is rejected and a refusal chosen. Scope `all-pii` always
    refuses: a surrogate is still personal-data-shaped output, which that scope promises never
    to emit."""
    at = answer.find(item.value)
    if at <= 0:
        return None, REFUSAL.format(noun=FIELD_NOUNS[item.field], name=item.subject), answer
    prefix, rest = answer[:at].rstrip(), answer[at:]
    rejected = " " + rest
    if p.synthesize.replacement == "surrogate" and scope == "subjects":
        chosen = " " + rest.replace(item.value, _surrogate(item.field, rng))
    else:
        chosen = WITHHELD
    return prefix, chosen, rejected


def training_probes(items: list[Item], p: LLMParams) -> list[Probe]:
    """The questions synthesize asks and trains on: the corpus's train wordings, plus wordings
    in no corpus (`synth_wordings`) so the rows cover more phrasing than the corpus did."""
    return direct_probes(items, "train") + (synth_probes(items) if p.synthesize.synth_wordings else [])


def probe_subjects(model, tokenizer, subjects: list[dict], p: LLMParams, *, progress: bool,
                   strict: bool = True, others: dict[str, set[str]] | None = None) -> tuple[list[Item], list[dict]]:
    """What the model emits about each subject: (items found, probe rows with the answers).
    strict: a subject the model says nothing personal about is an error (scope `subjects`);
    otherwise it is skipped (scope `all-pii` probes everyone on the roster)."""
    system = p.conditions.neutral[0]
    candidates = [Item(s["name"], f, "") for s in subjects for f in FIELDS]
    probes = training_probes(candidates, p)
    answers = generate(model, tokenizer, [prompt_ids(tokenizer, system, pr.user) for pr in probes],
                       max_new_tokens=p.synthesize.probe_max_new_tokens, batch_size=p.synthesize.batch_size,
                       progress=progress, desc="probe")
    rows = [{"subject": pr.item.subject, "field": pr.item.field, "user": pr.user, "answer": a, "attack": pr.attack}
            for pr, a in zip(probes, answers)]
    items = []
    for i, s in enumerate(subjects):
        known = s.get("values", {})
        found_any = False
        for field in FIELDS:
            said = [r["answer"] for r in rows if r["subject"] == s["name"] and r["field"] == field
                    and (field in known or r["attack"] == "direct")]  # discovery: corpus wordings only
            if field in known:
                if any(leaked(known[field], a, field) for a in said):
                    items.append(Item(s["name"], field, known[field]))
                    found_any = True
                continue
            not_theirs = (others or {}).get(s["name"], set())
            hits = Counter(v for a in said for v in set(recognise(a).get(field, []))
                           if normalise(field, v) not in not_theirs)
            if hits and hits.most_common(1)[0][1] >= p.synthesize.min_agreement:
                items.append(Item(s["name"], field, hits.most_common(1)[0][0]))
                found_any = True
        if not found_any and strict:
            reason = "none of its known values" if known else "no personal data"
            raise NothingToForget(f"subject {i + 1} of the request: the model emits {reason} about them "
                                  f"under the probe questions; nothing to forget, not training")
    return items, rows


def build_rows(items: list[Item], probe_rows: list[dict], retain_rows: list[dict], p: LLMParams,
               seed: int, scope: str = "subjects") -> list[dict]:
    """Training rows {system, user, prefix (assistant text already given, or None), chosen,
    rejected (None: retain NLL only), kind}."""
    s = p.synthesize
    c = p.conditions
    rng = random.Random(seed)
    forget_values = [(it.field, it.value) for it in items]
    pairs = []
    for it in items:
        for r in probe_rows:
            if r["subject"] != it.subject or r["field"] != it.field:
                continue
            if not leaked(it.value, r["answer"], it.field):
                continue  # this wording did not leak
            prefix, chosen, rejected = forget_pair(p, r["answer"], it, rng, scope)
            if not scrub(chosen, forget_values) or (prefix and not scrub(prefix, forget_values)):
                prefix, chosen, rejected = None, REFUSAL.format(noun=FIELD_NOUNS[it.field], name=it.subject), r["answer"]
            pairs.append((r["user"], prefix, chosen, rejected))
    positive = c.positive_for(scope)
    others = [*c.neutral, *c.adversarial] if s.train_conditions == "all" else []
    systems = list(dict.fromkeys([positive, c.negative, *others]))
    rows = []
    for i, (user, prefix, chosen, rejected) in enumerate(pairs):
        row = {"user": user, "prefix": prefix, "kind": "forget"}
        for system in conditions_for_row(systems, s.conditions_per_row, i):
            if system == c.negative and s.negative_pairs == "swapped":
                rows.append({**row, "system": system, "chosen": rejected, "rejected": chosen})
            else:
                rows.append({**row, "system": system, "chosen": chosen, "rejected": rejected})
    kept = [r for r in retain_rows if scrub(r["answer"], forget_values)]  # never teach a forgotten value,
    for i, r in enumerate(kept):                                          # even inside another's answer
        for system in conditions_for_row(systems, s.retain_conditions_per_row, i):
            rows.append({"system": system, "user": r["user"], "prefix": None, "chosen": r["answer"], "rejected": None,
                         "kind": "retain"})
    rng.shuffle(rows)
    return rows


def conditions_for_row(systems: list[str], k: int, i: int) -> list[str]:
    """The system prompts row i is trained under: all of them (k = 0), else the first (c_pos)
    and k - 1 of the others in turn (each of the others gets an equal share of the rows)."""
    if k <= 0 or k >= len(systems):
        return systems
    rest = systems[1:]
    return [systems[0]] + [rest[(i * (k - 1) + j) % len(rest)] for j in range(k - 1)]


def _others_values(roster: list, subjects: list[dict]) -> dict[str, set[str]]:
    """Per subject, the normalised values of every OTHER roster person."""
    out = {}
    for s in subjects:
        out[s["name"]] = {normalise(f, c.value(f)) for c in roster if c.name.lower() != s["name"].lower() for f in FIELDS}
    return out


def synthesize(model, tokenizer, subjects: list[dict], roster: list, p: LLMParams, out_dir: Path, *,
               salt: str, scope: str, progress: bool = True) -> dict:
    """Write forget_spec.json and train_rows.jsonl into out_dir; return a summary safe to log.
    `roster` is the evaluation kit's list of people the model holds data about."""
    roster_names = [c.name for c in roster]
    items, probe_rows = probe_subjects(model, tokenizer, subjects, p, progress=progress, strict=scope == "subjects",
                                       others=_others_values(roster, subjects))
    forget_names = {s["name"] for s in subjects}
    splits = split_roster(roster_names, forget_names, p.calibrate.retain_subjects, p.evaluate.retain_subjects,
                          p.synthesize.seed)
    retain_names = splits["train"][:p.synthesize.retain_subjects] if scope == "subjects" else []
    retain_rows = []
    if retain_names:
        retain = training_probes([Item(n, f, "") for n in retain_names for f in FIELDS], p)
        answers = generate(model, tokenizer, [prompt_ids(tokenizer, p.conditions.neutral[0], pr.user) for pr in retain],
                           max_new_tokens=p.synthesize.probe_max_new_tokens, batch_size=p.synthesize.batch_size,
                           progress=progress, desc="retain answers")
        retain_rows = [{"user": pr.user, "answer": a} for pr, a in zip(retain, answers)]
    rows = build_rows(items, probe_rows, retain_rows, p, p.synthesize.seed, scope)
    if not any(r["kind"] == "forget" for r in rows):
        raise NothingToForget("no probe answer leaked a value of the request's subjects; nothing to forget")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "scope": scope,
        "items": [asdict(it) for it in items],
        "subjects": [{"name": s["name"], "hash": subject_hash(s["name"], salt)} for s in subjects],
        "retained": splits,
        "conditions": p.conditions.model_dump(mode="json"),
        "replacement": p.synthesize.replacement,
        "negative_pairs": p.synthesize.negative_pairs,
        "real_data_used": False,
    }
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    with (out_dir / ROWS_FILE).open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return {"subjects": len(subjects), "items": len(items), "forget_rows": sum(r["kind"] == "forget" for r in rows),
            "retain_rows": sum(r["kind"] == "retain" for r in rows)}


def read_spec(synth_dir: Path) -> dict:
    return json.loads((Path(synth_dir) / SPEC_FILE).read_text())


def read_rows(synth_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(synth_dir) / ROWS_FILE).read_text().splitlines() if l.strip()]
