"""Forget objectives of the LLM methods: one small class with one loss each (open-unlearning's
shape), registered by name; forgetflow/llm/methods.py pairs each with its data recipe.

Over a batch of forget rows (prompt x, the leaking answer y_r, the replacement answer y_c),
with l(y) the mean token log-prob of y given x, S(y) its sum over tokens, and S_ref(y) the
same under the base (the peft model with its adapter off):

    orpo         NLL(y_c) - lambda log sigmoid(log odds(y_c) - log odds(y_r)),
                 odds(y) = e^l(y) / (1 - e^l(y))                  (Hong et al. 2024; ours, with CFG)
    grad_ascent  l(y_r): gradient ascent on the NLL of what leaks  (open-unlearning GradAscent)
    npo          -(2/beta) log sigmoid(-beta (S(y_r) - S_ref(y_r)))  (Zhang et al. 2024, NPO)
    simnpo       -(2/beta) log sigmoid(-beta l(y_r) - delta)         (Fan et al. 2024, SimNPO:
                 length-normalised, no reference model)

Every loss is the batch mean; the trainer (forgetflow/llm/orpo.py) adds the retain term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from forgetflow.config import LLMUnlearnParams


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class ForgetLogps:
    """Log-probs of a batch's forget rows, [B] each: mean and sum over the answer's tokens;
    `chosen_mean` only for objectives with uses_chosen, `rejected_sum_ref` only for uses_reference."""
    rejected_mean: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_mean: torch.Tensor | None = None
    rejected_sum_ref: torch.Tensor | None = None


class ORPO:
    name: ClassVar[str] = "orpo"
    uses_chosen, uses_reference = True, False

    def loss(self, lp: ForgetLogps, p: LLMUnlearnParams) -> tuple[torch.Tensor, dict]:
        log_odds = (lp.chosen_mean - log1m_exp(lp.chosen_mean)) - (lp.rejected_mean - log1m_exp(lp.rejected_mean))
        loss = (-lp.chosen_mean - p.orpo_lambda * F.logsigmoid(log_odds)).mean()
        return loss, {"orpo": loss.item(), "log_odds": log_odds.mean().item(), "chosen_logp": lp.chosen_mean.mean().item(),
                      "rejected_logp": lp.rejected_mean.mean().item()}


class GradAscent:
    name: ClassVar[str] = "grad_ascent"
    uses_chosen, uses_reference = False, False

    def loss(self, lp: ForgetLogps, p: LLMUnlearnParams) -> tuple[torch.Tensor, dict]:
        loss = lp.rejected_mean.mean()
        return loss, {"rejected_logp": loss.item()}


class NPO:
    name: ClassVar[str] = "npo"
    uses_chosen, uses_reference = False, True

    def loss(self, lp: ForgetLogps, p: LLMUnlearnParams) -> tuple[torch.Tensor, dict]:
        log_ratio = lp.rejected_sum - lp.rejected_sum_ref
        loss = (-(2.0 / p.npo_beta) * F.logsigmoid(-p.npo_beta * log_ratio)).mean()
        return loss, {"npo": loss.item(), "log_ratio": log_ratio.mean().item(), "rejected_logp": lp.rejected_mean.mean().item()}


class SimNPO:
    name: ClassVar[str] = "simnpo"
    uses_chosen, uses_reference = False, False

    def loss(self, lp: ForgetLogps, p: LLMUnlearnParams) -> tuple[torch.Tensor, dict]:
        loss = (-(2.0 / p.simnpo_beta) * F.logsigmoid(-p.simnpo_beta * lp.rejected_mean - p.simnpo_delta)).mean()
        return loss, {"simnpo": loss.item(), "rejected_logp": lp.rejected_mean.mean().item()}


OBJECTIVES = {cls.name: cls() for cls in (ORPO, GradAscent, NPO, SimNPO)}
