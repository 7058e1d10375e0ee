"""Membership inference against the forgotten subjects: Min-K% Prob (Shi et al. 2024).

For an answer y to a prompt x,

    MinK(y) = mean of the ceil(k |y|) lowest token log-probs  log p(y_t | x, y_<t)

and a model scores the people it was trained on higher than people it never saw. The AUC of
MinK separating the forgotten subjects' answers (members, label 1) from the same answers about
fictitious people the model never saw (label 0), on the raw weights under the corpus's first
system prompt, in the corpus's first (trained) wording: 1.0 means the model still singles the
forgotten out, 0.5 that they look like strangers to it (the goal of unlearning).

Forget quality (open-unlearning's, there over TOFU's truth ratio; here over the same MinK
scores): the p-value of a two-sample Kolmogorov-Smirnov test between the unlearned model's
per-item scores on the forgotten answers and those of a model trained without the forgotten
subjects at all. High: the two cannot be told apart.
"""
from __future__ import annotations

import math

import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from forgetflow.llm.attacks import Item
from forgetflow.llm.chat import answer_ids, prompt_ids
from forgetflow.llm.corpus import CORPUS_QUESTIONS, SUPPORT_SYSTEM_PROMPTS, make_customers
from forgetflow.llm.answers import answer_token_logprobs


def strangers(items: list[Item], seed: int, avoid: set[str]) -> list[Item]:
    """Items of the same fields about as many fictitious people the model never saw."""
    subjects = list(dict.fromkeys(it.subject for it in items))
    people = [c for c in make_customers(len(subjects) + len(avoid), seed) if c.name not in avoid][:len(subjects)]
    by_subject = dict(zip(subjects, people))
    return [Item(by_subject[it.subject].name, it.field, by_subject[it.subject].value(it.field)) for it in items]


@torch.no_grad()
def min_k_scores(model, tokenizer, items: list[Item], k: float) -> list[float]:
    """MinK of each item's corpus answer, scored in one padded batch (answers.answer_token_logprobs)."""
    prompts, answers = [], []
    for it in items:
        question, answer = CORPUS_QUESTIONS[it.field][0]
        prompts.append(prompt_ids(tokenizer, SUPPORT_SYSTEM_PROMPTS[0], question.format(name=it.subject)))
        answers.append(answer_ids(tokenizer, answer.format(name=it.subject, value=it.value))[:-1])  # no end-of-turn
    logp, target, row = answer_token_logprobs(model, prompts, answers, tokenizer.pad_token_id)
    token = logp.gather(-1, target[:, None])[:, 0]
    scores = []
    for i in range(len(items)):
        mine = token[row == i]
        scores.append(mine.sort().values[:max(1, math.ceil(k * len(mine)))].mean().item())
    return scores


def mia_auc(model, tokenizer, forgotten: list[Item], never_seen: list[Item], k: float) -> float:
    members = min_k_scores(model, tokenizer, forgotten, k)
    others = min_k_scores(model, tokenizer, never_seen, k)
    return float(roc_auc_score([1] * len(members) + [0] * len(others), members + others))


def forget_quality(unlearned: list[float], never_trained: list[float]) -> float:
    return float(ks_2samp(unlearned, never_trained).pvalue)
