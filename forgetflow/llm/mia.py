"""Membership inference against the forgotten subjects: Min-K% Prob (Shi et al. 2024).

For an answer y to a prompt x,

    MinK(y) = mean of the ceil(k |y|) lowest token log-probs  log p(y_t | x, y_<t)

and a model scores the people it was trained on higher than people it never saw. The AUC of
MinK separating the forgotten subjects' answers (members, label 1) from the same answers about
fictitious people the model never saw (label 0), in the evaluate split's corpus wording (never a
forget or retain row's), under a serving policy: the served one (guided) and the raw weights.
1.0 means the model still singles the forgotten out, 0.5 that they look like strangers to it
(the goal of unlearning).

Forget quality (open-unlearning's, there over TOFU's truth ratio; here over the same MinK
scores): the p-value of a two-sample Kolmogorov-Smirnov test between the unlearned model's
per-item scores on the forgotten answers and those of a model trained without the forgotten
subjects at all. High: the two cannot be told apart.
"""
from __future__ import annotations

import math

from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from forgetflow.config import LLMParams
from forgetflow.llm.attacks import Item
from forgetflow.llm.chat import answer_ids, prompt_ids
from forgetflow.llm.corpus import CORPUS_QUESTIONS, TEMPLATE_SPLITS, make_customers
from forgetflow.llm.evaluate import Policy
from forgetflow.llm.generation import continuation_logprobs


def strangers(items: list[Item], seed: int, avoid: set[str]) -> list[Item]:
    """Items of the same fields about as many fictitious people the model never saw."""
    subjects = list(dict.fromkeys(it.subject for it in items))
    people = [c for c in make_customers(len(subjects) + len(avoid), seed) if c.name not in avoid][:len(subjects)]
    by_subject = dict(zip(subjects, people))
    return [Item(by_subject[it.subject].name, it.field, by_subject[it.subject].value(it.field)) for it in items]


def min_k_scores(model, tokenizer, items: list[Item], k: float, policy: Policy, *, split: str = "evaluate",
                 batch_size: int = 32) -> list[float]:
    """MinK of each item's answer in the split's first corpus wording (the evaluate split's by
    default: no forget or retain row was ever written in it), scored under `policy` (guided
    when it is: the served version's own token distribution)."""
    wording = TEMPLATE_SPLITS[split][0]
    prompts, negatives, answers = [], [], []
    for it in items:
        question, answer = CORPUS_QUESTIONS[it.field][wording]
        prompts.append(prompt_ids(tokenizer, policy.system, question.format(name=it.subject)))
        negatives.append(prompt_ids(tokenizer, policy.negative, question.format(name=it.subject)))
        answers.append(answer_ids(tokenizer, answer.format(name=it.subject, value=it.value))[:-1])  # no end-of-turn
    token_logps = continuation_logprobs(model, tokenizer, prompts, answers, batch_size=batch_size,
                                        negative_prompts=negatives if policy.guided else None,
                                        guidance_scale=policy.gamma, space=policy.space)
    return [lp.sort().values[:max(1, math.ceil(k * len(lp)))].mean().item() for lp in token_logps]


def mia_auc(model, tokenizer, forgotten: list[Item], never_seen: list[Item], k: float, policy: Policy, *,
            split: str = "evaluate") -> float:
    members = min_k_scores(model, tokenizer, forgotten, k, policy, split=split)
    others = min_k_scores(model, tokenizer, never_seen, k, policy, split=split)
    return float(roc_auc_score([1] * len(members) + [0] * len(others), members + others))


def membership(model, tokenizer, forgotten: list[Item], never_seen: list[Item], policies: dict[str, Policy],
               p: LLMParams) -> dict[str, dict]:
    """{policy name: {"auc", "n_members", "n_strangers"}}: Min-K% AUC of the forgotten against
    never-seen people under each way of asking (the served policy, the raw weights)."""
    return {name: {"auc": mia_auc(model, tokenizer, forgotten, never_seen, p.evaluate.mia_min_k, policy),
                   "n_members": len(forgotten), "n_strangers": len(never_seen)}
            for name, policy in policies.items()}


def forget_quality(unlearned: list[float], never_trained: list[float]) -> float:
    return float(ks_2samp(unlearned, never_trained).pvalue)
