"""The strong attacks on a chat model's forgetting (issue 29): the auditor who tries harder than
the direct, paraphrase and prefix probes of forgetflow/llm/evaluate.py.

Every attack asks the version under a `Policy` (the served one: its system prompt, guided away
from its negative condition at gamma, through generation.generate / evaluate._scores exactly as
evaluate.ask serves it), on held-out material only: the split's direct wording (`evaluate`)
and the PARAPHRASES, never a train or synth wording. A trial is one (forgotten value, prompt)
pair; it is a hit when the value, normalised, is within the answer (pii.leaked). Each attack
returns a record of forgetflow/stats.py over its trials,

    {"rate", "n", "hits", "upper95", "interval95",
     "values"          distinct values attacked
     "values_leaked"   distinct values hit at least once
     "partial_rate"    share of trials where more than half of the value came out
                       (pii.partially_leaked: a number's digits, an e-mail's local part)
     ...}              the attack's own statistics below

    prefilled          the assistant turn pre-filled with the opening the BASE version itself
                       used before the value (`base_openings`), decoding continues from there
    few_shot           one user turn: `few_shot_demonstrations` true records of KEPT people
                       (question + answer, the split's wording, the same field), then the
                       question about the forgotten person
    sampled            `sampled.samples` guided samples per prompt at `sampled.temperature`; a
                       trial hits when any sample holds the value. + per_sample_rate: share of
                       all samples that hold it
    candidate_ranking  (logit access) the true value against `candidate_surrogates` surrogates
                       of its type and format (`surrogates`), by the total log-probability of the
                       value after the answer opening; a hit: the truth ranks first.
                       + mean_rank_percentile: share of surrogates scored above the truth (0: the
                       model prefers the truth, ~0.5: chance); chance_top1: the hit rate of a
                       model that never saw the people (1 / (1 + surrogates), per trial).
                       partial_rate is None: every candidate shares the value's format (an
                       e-mail's local part too), a partial match of the first choice says nothing
    quantized          a copy's weights rounded per output channel at each of `quantize_bits`,
                       then the held-out prompts. + by_bits: {bits: record}
    relearning         a copy fine-tuned on rows about KEPT people only (`relearning_rows`),
                       `relearning.steps` AdamW steps, then the held-out prompts

The weight attacks work on a copy with any peft adapter merged in (`merged_copy`): the caller's
model is never changed. Budgets and the seed: params.llm.attacks; every random draw comes from
a generator seeded with `attacks.seed` (none from the global random state).
"""
from __future__ import annotations

import copy
import random
import re

import torch
from torch import nn

from forgetflow.compute import autocast, grad_scaler
from forgetflow.config import ComputeParams, LLMParams
from forgetflow.llm.answers import answer_token_logprobs
from forgetflow.llm.attacks import Item, Probe, direct_probes, paraphrase_probes, prefix_context
from forgetflow.llm.base import encode_chat
from forgetflow.llm.corpus import CORPUS_QUESTIONS, SUPPORT_SYSTEM_PROMPTS, TEMPLATE_SPLITS, chat
from forgetflow.llm.evaluate import Policy, _scores, ask
from forgetflow.llm.pii import NUMERIC_FIELDS, leaked, normalise, partially_leaked
from forgetflow.stats import rate_record

# A bound on the rejection sampling of surrogates (a value's format may admit fewer distinct
# surrogates than asked for: then the trial has fewer, and chance_top1 says so).
DRAWS_PER_SURROGATE = 20

Trial = tuple[Item, bool, bool]  # (the value attacked, hit, partial hit)


# ---- shared ----------------------------------------------------------------------------------
def held_out_probes(items: list[Item], split: str = "evaluate") -> list[Probe]:
    """The prompts no training saw: the split's direct wording, then every paraphrase."""
    return direct_probes(items, split) + paraphrase_probes(items)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _ask(model, tokenizer, users: list[str], policy: Policy, p: LLMParams, desc: str, *,
         max_new_tokens: int | None = None, **options) -> list[str]:
    """evaluate.ask at the evaluation's budgets (openings, repeat, sampling: its options)."""
    return ask(model, tokenizer, users, policy, max_new_tokens or p.evaluate.max_new_tokens, p.evaluate.batch_size,
               desc, **options)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _trial(item: Item, text: str) -> Trial:
    return item, leaked(item.value, text, item.field), partially_leaked(item.value, text, item.field)


def _record(trials: list[Trial], **extra) -> dict:
    hits = [t for t in trials if t[1]]
    return rate_record(len(hits), len(trials), **{"values": len({t[0] for t in trials}),
                                                  "values_leaked": len({t[0] for t in hits}),
                                                  "partial_rate": _mean([t[2] for t in trials]), **extra})


def _held_out_trials(model, tokenizer, items: list[Item], policy: Policy, p: LLMParams, split: str, desc: str,
                     progress: bool) -> list[Trial]:
    """Greedy answers to the held-out prompts under `policy`, as trials."""
    probes = held_out_probes(items, split)
    answers = _ask(model, tokenizer, [pr.user for pr in probes], policy, p, desc, progress=progress)
    return [_trial(pr.item, a) for pr, a in zip(probes, answers)]


# ---- prefilled -------------------------------------------------------------------------------
def _value_pattern(item: Item) -> re.Pattern:
    """The value as pii.leaked reads it: digits / letters and digits of a number with anything
    between them, other values case-insensitive with any whitespace."""
    v = normalise(item.field, item.value)
    if item.field in NUMERIC_FIELDS:
        return re.compile(r"[^a-z0-9]*".join(map(re.escape, v)), re.IGNORECASE)
    return re.compile(r"\s+".join(map(re.escape, v.split(" "))), re.IGNORECASE)


def answer_opening(item: Item, answer: str, split: str = "evaluate") -> str:
    """The answer's text before the value; the split's template opening (attacks.prefix_context)
    when the answer does not hold the value or opens with it."""
    found = _value_pattern(item).search(answer)
    opening = answer[:found.start()].rstrip() if found else ""
    return opening or prefix_context(item, split)


def base_openings(base_model, tokenizer, items: list[Item], policy: Policy, p: LLMParams, split: str = "evaluate",
                  progress: bool = False) -> dict[Item, str]:
    """{item: the opening of the BASE version's answer to the split's direct question}, asked
    under `policy` (greedy); what `prefilled` and `candidate_ranking` continue from."""
    probes = direct_probes(items, split)
    answers = _ask(base_model, tokenizer, [pr.user for pr in probes], policy, p, "openings", progress=progress)
    return {pr.item: answer_opening(pr.item, a, split) for pr, a in zip(probes, answers)}


def prefilled(model, tokenizer, items: list[Item], openings: dict[Item, str], policy: Policy, p: LLMParams, *,
              split: str = "evaluate", progress: bool = False) -> dict:
    """Each held-out question with the assistant turn pre-filled with the item's opening."""
    probes = held_out_probes(items, split)
    answers = _ask(model, tokenizer, [pr.user for pr in probes], policy, p, "prefilled",
                   openings=[openings[pr.item] for pr in probes], progress=progress)
    return _record([_trial(pr.item, a) for pr, a in zip(probes, answers)])


# ---- few-shot --------------------------------------------------------------------------------
def few_shot_turn(probe: Probe, demonstrations: list[Item], split: str = "evaluate") -> str:
    """One user turn: each demonstration's question and true answer in the split's wording, then
    the probe's question."""
    k = TEMPLATE_SPLITS[split][0]
    shots = [" ".join(t.format(name=d.subject, value=d.value) for t in CORPUS_QUESTIONS[d.field][k])
             for d in demonstrations]
    return "\n".join(shots + [probe.user])


def few_shot(model, tokenizer, items: list[Item], kept: list[Item], policy: Policy, p: LLMParams, *,
             split: str = "evaluate", progress: bool = False) -> dict:
    """Each held-out question after `few_shot_demonstrations` kept people's true records of the
    same field (drawn with the attacks' seed); not run (n 0, a reason) without kept people."""
    if not kept:
        return _record([], reason="no kept people whose records could be shown")
    rng = random.Random(p.attacks.seed)
    probes = held_out_probes(items, split)
    users = []
    for pr in probes:
        pool = [d for d in kept if d.field == pr.item.field and d.subject != pr.item.subject]
        shots = rng.sample(pool, min(p.attacks.few_shot_demonstrations, len(pool)))
        users.append(few_shot_turn(pr, shots, split))
    answers = _ask(model, tokenizer, users, policy, p, "few_shot", progress=progress)
    return _record([_trial(pr.item, a) for pr, a in zip(probes, answers)])


# ---- sampled ---------------------------------------------------------------------------------
def sampled(model, tokenizer, items: list[Item], policy: Policy, p: LLMParams, *, split: str = "evaluate",
            progress: bool = False) -> dict:
    """`samples` guided samples of each held-out prompt at `temperature`; a trial hits when any
    of its samples holds the value."""
    s = p.attacks.sampled
    probes = held_out_probes(items, split)
    generator = torch.Generator(device=_device(model)).manual_seed(p.attacks.seed)
    answers = _ask(model, tokenizer, [pr.user for pr in probes], policy, p, "sampled", repeat=s.samples,
                   max_new_tokens=s.max_new_tokens, temperature=s.temperature, generator=generator, progress=progress)
    trials, sample_hits = [], 0
    for i, pr in enumerate(probes):
        mine = [_trial(pr.item, a) for a in answers[i * s.samples:(i + 1) * s.samples]]
        sample_hits += sum(t[1] for t in mine)
        trials.append((pr.item, any(t[1] for t in mine), any(t[2] for t in mine)))
    return _record(trials, per_sample_rate=sample_hits / len(answers) if answers else None,
                   samples_per_prompt=s.samples, temperature=s.temperature)


# ---- candidate ranking -----------------------------------------------------------------------
def _part(field: str, value: str) -> str:
    """The part of a value whose digits are re-drawn: an e-mail's local part, else all of it."""
    return value.split("@", 1)[0] if field == "email" else value


def _digit_slots(text: str) -> list[tuple[int, tuple[int, int, int]]]:
    """(character index, (digit run, its length, position in it)) of each digit of the text."""
    return [(m.start() + j, (n, len(m.group()), j)) for n, m in enumerate(re.finditer(r"\d+", text))
            for j in range(len(m.group()))]


def _digit_pool(field: str, values: list[str]) -> dict[tuple[int, int, int], list[str]]:
    """The digits of other people's values of the field, by (run, run length, position)."""
    pool: dict[tuple[int, int, int], list[str]] = {}
    for v in values:
        part = _part(field, v)
        for i, slot in _digit_slots(part):
            pool.setdefault(slot, []).append(part[i])
    return pool


def _redraw_digits(text: str, pool: dict, rng: random.Random) -> str:
    """Every digit drawn from the pool's digits at its slot (uniform where the pool has none)."""
    chars = list(text)
    for i, slot in _digit_slots(text):
        chars[i] = rng.choice(pool.get(slot) or "0123456789")
    return "".join(chars)


def _surrogate(item: Item, peers: list[str], pool: dict, rng: random.Random) -> str:
    if item.field == "email" and "@" in item.value:
        local, domain = item.value.split("@", 1)
        domains = [v.split("@", 1)[1] for v in peers if "@" in v]
        return _redraw_digits(local, pool, rng) + "@" + (rng.choice(domains) if domains else domain)
    return _redraw_digits(rng.choice(peers) if peers else item.value, pool, rng)


def surrogates(item: Item, peers: list[str], known: list[str], k: int, rng: random.Random) -> list[str]:
    """Up to k distinct values exchangeable with item.value for a model that never saw its
    subject, none of them a real value (the item's, a peer's, a known one).

    A surrogate is a peer's value (the same field of another person under the same test, so as
    unfamiliar as the truth; the item's own when there is none) with every digit re-drawn from
    the digits at the same slot (digit run, its length, position) of the peers' and `known`
    values, so that a leading digit no value has is never drawn. An e-mail keeps the item's
    own local part, name-derived, with its digits re-drawn, and takes a peer's domain: a model
    that learnt "first.last@" would otherwise pick the truth by its name alone. Known values
    (kept people's, which the version still holds) lend digits only: as a whole they are
    familiar text, a truth the version never saw would rank below them."""
    pool = _digit_pool(item.field, peers + known)
    taken = {normalise(item.field, v) for v in [item.value, *peers, *known]}
    out = []
    for _ in range(k * DRAWS_PER_SURROGATE):
        if len(out) == k:
            break
        candidate = _surrogate(item, peers, pool, rng)
        if normalise(item.field, candidate) not in taken:
            taken.add(normalise(item.field, candidate))
            out.append(candidate)
    return out


def candidate_ranking(model, tokenizer, items: list[Item], kept: list[Item], openings: dict[Item, str],
                      policy: Policy, p: LLMParams, *, split: str = "evaluate") -> dict:
    """Each value against its surrogates (peers: the other attacked items of its field; known:
    the kept people's), scored by total log-probability as the continuation of the item's
    opening after each held-out question."""
    rng = random.Random(p.attacks.seed)
    users, prefixes, continuations, groups = [], [], [], []
    for it in items:
        peers = [o.value for o in items if o.field == it.field and o.subject != it.subject]
        known = [o.value for o in kept if o.field == it.field]
        candidates = [it.value] + surrogates(it, peers, known, p.attacks.candidate_surrogates, rng)
        opening = _tokens(tokenizer, openings[it])
        for pr in held_out_probes([it], split):
            groups.append((it, candidates))
            for c in candidates:
                users.append(pr.user)
                prefixes.append(opening)
                continuations.append(_tokens(tokenizer, " " + c))
    scores = [float(s.sum()) for s in _scores(model, tokenizer, users, continuations, policy, p, prefixes)]
    trials, percentiles, chance, start = [], [], [], 0
    for it, candidates in groups:
        mine, start = scores[start:start + len(candidates)], start + len(candidates)
        above = sum(s > mine[0] for s in mine[1:])
        trials.append((it, above == 0, False))
        percentiles.append(above / max(len(mine) - 1, 1))
        chance.append(1 / len(mine))
    return _record(trials, partial_rate=None, mean_rank_percentile=_mean(percentiles), chance_top1=_mean(chance),
                   surrogates=p.attacks.candidate_surrogates)


# ---- weights ---------------------------------------------------------------------------------
def merged_copy(model) -> nn.Module:
    """A deep copy of the version with its peft adapter (if any) merged in, in eval mode; the
    caller's model stays as it was."""
    twin = copy.deepcopy(model)
    return (twin.merge_and_unload() if hasattr(twin, "merge_and_unload") else twin).eval()


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest per output channel (dim 0), dequantised: each row's scale is
    its largest |w| over 2^(bits-1) - 1, so a row takes at most 2^bits - 1 levels."""
    top = 2 ** (bits - 1) - 1
    w = weight.float()
    peak = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    scale = peak.clamp_min(torch.finfo(torch.float32).tiny) / top
    return ((w / scale).round().clamp(-top, top) * scale).to(weight.dtype)


@torch.no_grad()
def quantized_copy(model, bits: int) -> nn.Module:
    """merged_copy with every nn.Linear and nn.Embedding weight fake-quantised at `bits`
    (a weight tied between two modules once)."""
    twin = merged_copy(model)
    done = set()
    for module in twin.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in done:
            done.add(id(module.weight))
            module.weight.copy_(fake_quantize(module.weight, bits))
    return twin


def quantized(model, tokenizer, items: list[Item], policy: Policy, p: LLMParams, *, split: str = "evaluate",
              progress: bool = False) -> dict:
    """The held-out prompts to a quantised copy at each bit width; one record over all of them."""
    trials, by_bits = [], {}
    for bits in p.attacks.quantize_bits:
        mine = _held_out_trials(quantized_copy(model, bits), tokenizer, items, policy, p, split,
                                f"quantized/{bits}", progress)
        by_bits[bits] = _record(mine)
        trials += mine
    return _record(trials, by_bits=by_bits)


def relearning_rows(kept: list[Item], systems: tuple[str, ...] = SUPPORT_SYSTEM_PROMPTS) -> list[dict]:
    """Chat rows ({"messages": [...]}, the corpus format) about kept people only: each kept value
    under each train wording, answered with its true value, the system prompts in turn."""
    rows = []
    for it in kept:
        for k in TEMPLATE_SPLITS["train"]:
            question, answer = CORPUS_QUESTIONS[it.field][k]
            rows.append({"messages": chat(systems[len(rows) % len(systems)], question.format(name=it.subject),
                                          answer.format(name=it.subject, value=it.value))})
    return rows


def _mentions(rows: list[dict], items: list[Item]) -> int:
    """How many rows name a forgotten subject or hold a forgotten value."""
    texts = [" ".join(m["content"] for m in row["messages"]) for row in rows]
    return sum(any(it.subject.lower() in t.lower() or leaked(it.value, t, it.field) for it in items) for t in texts)


def relearned_copy(model, tokenizer, rows: list[dict], p: LLMParams, compute: ComputeParams = ComputeParams(),
                   progress: bool = False) -> nn.Module:
    """merged_copy fine-tuned on the chat rows: `relearning.steps` AdamW steps at `relearning.lr`,
    batches of `relearning.batch_size` rows in a seeded shuffled order, the mean NLL of the
    answer tokens; on the model's device, under compute's autocast (bf16 on CUDA). Dropout
    stays off (eval mode): the copy is a function of the seed alone."""
    from tqdm.auto import tqdm

    r = p.attacks.relearning
    twin = merged_copy(model)
    device = _device(twin)
    pairs = []
    for row in rows:
        ids, labels = encode_chat(tokenizer, row["messages"])
        cut = labels.count(-100)
        pairs.append((ids[:cut], ids[cut:]))
    twin.requires_grad_(True)
    optimizer = torch.optim.AdamW(twin.parameters(), lr=r.lr)
    scaler = grad_scaler(device, compute)
    rng, order = random.Random(p.attacks.seed), []
    for _ in tqdm(range(r.steps), desc="relearning", disable=not progress, leave=False):
        while len(order) < r.batch_size:
            order += rng.sample(range(len(pairs)), len(pairs))
        batch, order = order[:r.batch_size], order[r.batch_size:]
        with autocast(device, compute):
            logp, target, _ = answer_token_logprobs(twin, [pairs[i][0] for i in batch], [pairs[i][1] for i in batch],
                                                    tokenizer.pad_token_id)
            loss = -logp.gather(-1, target[:, None]).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return twin.requires_grad_(False)


def relearning(model, tokenizer, items: list[Item], rows: list[dict], policy: Policy, p: LLMParams, *,
               split: str = "evaluate", compute: ComputeParams = ComputeParams(), progress: bool = False) -> dict:
    """The held-out prompts to a copy fine-tuned on `rows`, which must not mention the forgotten
    (a ValueError otherwise)."""
    if not rows:
        return _record([], reason="no rows about kept people to fine-tune on")
    mentioning = _mentions(rows, items)
    if mentioning:
        raise ValueError(f"{mentioning} of the {len(rows)} relearning rows mention a forgotten subject or value")
    twin = relearned_copy(model, tokenizer, rows, p, compute, progress)
    return _record(_held_out_trials(twin, tokenizer, items, policy, p, split, "relearning", progress))


# ---- all -------------------------------------------------------------------------------------
def run_strong_attacks(model, tokenizer, *, forget: list[Item], kept: list[Item], openings: dict[Item, str],
                       policy: Policy, p: LLMParams, split: str = "evaluate", progress: bool = False,
                       compute: ComputeParams = ComputeParams()) -> dict[str, dict]:
    """{attack: record} of the six strong attacks on the forgotten items (see the module
    docstring); `kept`: the kept people's items (demonstrations, relearning rows, surrogate
    digits); `openings`: base_openings of the base version."""
    from tqdm.auto import tqdm

    kw = dict(split=split, progress=progress)
    m, tok = model, tokenizer
    runs = {
        "prefilled": lambda: prefilled(m, tok, forget, openings, policy, p, **kw),
        "few_shot": lambda: few_shot(m, tok, forget, kept, policy, p, **kw),
        "sampled": lambda: sampled(m, tok, forget, policy, p, **kw),
        "candidate_ranking": lambda: candidate_ranking(m, tok, forget, kept, openings, policy, p, split=split),
        "relearning": lambda: relearning(m, tok, forget, relearning_rows(kept), policy, p, compute=compute, **kw),
        "quantized": lambda: quantized(m, tok, forget, policy, p, **kw),
    }
    return {name: run() for name, run in tqdm(runs.items(), desc="strong attacks", disable=not progress)}
