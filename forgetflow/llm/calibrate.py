"""Guidance calibration of an unlearned LLM version and the LLM promotion gates.

Gates (params.llm.gates), base = the version before forgetting (served as deployed: its
support system prompt, no guidance), new = after (served: c_pos, guided at the chosen gamma):
    leak_rate_before         = base.leak_rate_by_attack.direct                 >= min
    leak_rate                = new.leak_rate (ANY attack: served, raw, adversarial) <= max
    utility_accuracy_drop    = base.utility_accuracy - new.utility_accuracy    <= max
    perplexity_ratio         = new.perplexity / base.perplexity                <= max
    retained_recall_drop     = base.retained_recall - new.retained_recall      <= max (scope subjects)

Calibration sweeps gamma x space (log, prob) on the calibration split (other wordings, other
retained subjects and other utility items than evaluation) and takes the smallest gamma whose
served leak, utility drop, perplexity ratio and retained-recall drop all meet their gates (log space first at
equal gamma); else the setting with the largest worst-gate margin.

The calibration quiz is small (40 items: one item is 2.5 points, more than the 2-point utility
gate), so there the utility drop is judged net of its noise: the paired difference on the same
items, less `utility_noise_se` standard errors,

    drop = acc_base - acc_gamma,   se = sqrt(lost + gained) / n,   gate on  drop - k * se

(lost / gained: items right for the base and wrong under gamma, and the reverse). A gamma that
loses one or two items is not told apart from one that loses none; the evaluation's 200
held-out items then apply the gate itself. Without this, one item decided gamma: a demo run
picked gamma 3 over 1-2 on a difference of a few quiz items, and gamma 3 let a value out under a paraphrase
that the unguided weights kept in.
"""
from __future__ import annotations

import math

from forgetflow.config import LLMGateParams, LLMParams
from forgetflow.gates import Gate, all_passed
from forgetflow.llm.attacks import Item, direct_probes, prefix_probes
from forgetflow.llm.evaluate import (Policy, leaks, perplexity, rate_by_item, retained_recall, served_policy,
                                     utility_correct)


def llm_gates(base: dict, new: dict, g: LLMGateParams) -> list[Gate]:
    gates = [
        Gate("leak_rate_before", base["leak_rate_by_attack"]["direct"], g.leak_rate_before_min, "min"),
        Gate("leak_rate", new["leak_rate"], g.leak_rate_max, "max"),
        Gate("utility_accuracy_drop", base["utility_accuracy"] - new["utility_accuracy"], g.utility_accuracy_drop_max, "max"),
        Gate("perplexity_ratio", new["perplexity"] / base["perplexity"], g.perplexity_ratio_max, "max"),
    ]
    if base.get("retained_recall") is not None and new.get("retained_recall") is not None:
        gates.append(Gate("retained_recall_drop", base["retained_recall"] - new["retained_recall"],
                          g.retained_recall_drop_max, "max"))
    return gates


def calibration_point(model, tokenizer, forget: list[Item], retained: list[Item], questions: list[dict],
                      prose: str, policy: Policy, p: LLMParams) -> dict:
    probes = direct_probes(forget, "calibrate") + prefix_probes(forget, "calibrate")
    leak, _ = rate_by_item(forget, probes, leaks(model, tokenizer, probes, policy, p, "calibrate"))
    correct = utility_correct(model, tokenizer, questions, policy, p)
    return {"served_leak_rate": leak,
            "retained_recall": retained_recall(model, tokenizer, retained, policy, p, "calibrate"),
            "utility_accuracy": sum(correct) / len(correct), "utility_correct": correct,
            "perplexity": perplexity(model, tokenizer, prose, policy, p)}


def paired_drop(base_correct: list[bool], correct: list[bool]) -> tuple[float, float]:
    """(accuracy drop, its paired standard error) from the base's to `correct`, on the same items."""
    lost = sum(b and not c for b, c in zip(base_correct, correct))
    gained = sum(c and not b for b, c in zip(base_correct, correct))
    n = len(correct)
    return (lost - gained) / n, math.sqrt(lost + gained) / n


def choose(rows: list[dict], base: dict, g: LLMGateParams, noise_se: float) -> dict:
    """The first row (smallest gamma) passing every gate, the utility drop net of `noise_se`
    paired standard errors; else the row with the largest worst-gate margin."""
    def gates(row: dict) -> list[Gate]:
        drop, se = paired_drop(base["utility_correct"], row["utility_correct"])
        out = [Gate("served_leak_rate", row["served_leak_rate"], g.leak_rate_max, "max"),
               Gate("utility_accuracy_drop_net_of_noise", drop - noise_se * se, g.utility_accuracy_drop_max, "max"),
               Gate("perplexity_ratio", row["perplexity"] / base["perplexity"], g.perplexity_ratio_max, "max")]
        if base.get("retained_recall") is not None and row.get("retained_recall") is not None:
            out.append(Gate("retained_recall_drop", base["retained_recall"] - row["retained_recall"],
                            g.retained_recall_drop_max, "max"))
        return out

    for row in rows:
        checked = gates(row)
        row["passed"] = all_passed(checked)
        row["worst_margin"] = min(x.margin for x in checked)
    passing = [r for r in rows if r["passed"]]
    return passing[0] if passing else max(rows, key=lambda r: r["worst_margin"])


def calibrate_guidance(model, tokenizer, card, base_point: dict, forget: list[Item], retained: list[Item],
                       questions: list[dict], prose: str, p: LLMParams) -> tuple[dict, list[dict]]:
    """(chosen row with guidance_scale and guidance_space, the whole curve)."""
    rows = []
    for gamma in sorted(set(p.calibrate.guidance_scales)):
        for space in (p.calibrate.spaces if gamma != 1.0 else p.calibrate.spaces[:1]):
            point = calibration_point(model, tokenizer, forget, retained, questions, prose,
                                      served_policy(card, gamma, space), p)
            rows.append({"guidance_scale": gamma, "guidance_space": space, **point})
    chosen = choose(rows, base_point, p.gates, p.calibrate.utility_noise_se)
    for row in rows:  # the curve keeps the rates, not every item's answer
        row.pop("utility_correct")
    return chosen, rows
