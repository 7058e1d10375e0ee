"""LLM unlearning methods selectable by name in a request (`method:`).

A method is its data recipe (which conditions the pairs are trained under, retain rows or
not), its forget objective (forgetflow/llm/objectives.py), the retain term's settings where it
follows its own paper, and whether guidance is calibrated; all train the same LoRA adapter
(forgetflow/llm/orpo.py), so `forgetflow bench` compares them on one adapter budget.

    cfg-orpo        ours: ORPO pairs under c_pos, c_neg, neutral and adversarial prompts (the
                    raw weights forget), retain rows from the model's own answers about other
                    subjects (KL), guidance calibrated at inference
    cfg-orpo-paper  the published recipe (arXiv 2412.06846): c_pos pairs + SWAPPED c_neg pairs,
                    no retain rows, guidance calibrated
    orpo            ORPO with our data recipe and no guidance (gamma fixed at 1)
    grad-ascent     gradient ascent on the leaking answers, no retain term
    grad-diff       gradient ascent + NLL on the retain rows (alpha 1, gamma 1)
    npo             NPO against the base (beta 0.1) + retain NLL (open-unlearning's NPO)
    simnpo          SimNPO (beta 4.5, delta 0, gamma 0.125) + retain NLL (open-unlearning's SimNPO)
    control-phrase  no training: the base served under the positive condition (a system prompt
                    asking it to keep the forgotten data private), the prompting-only baseline
"""
from __future__ import annotations

from dataclasses import dataclass, field

from forgetflow.config import LLMParams

PEER_RETAIN = {"retain_loss": "nll", "retain_weight": 1.0}  # open-unlearning's GradDiff / NPO / SimNPO


@dataclass(frozen=True)
class LLMMethod:
    name: str
    negative_pairs: str  # "forget" | "swapped"
    train_conditions: str  # "all" | "positive"
    retain_rows: bool
    guidance: bool
    objective: str = "orpo"  # objectives.OBJECTIVES
    unlearn: dict = field(default_factory=dict)  # overrides of params.llm.unlearn

    def params(self, p: LLMParams) -> LLMParams:
        """params.llm with this method's data recipe and settings applied."""
        synth = p.synthesize.model_copy(update={
            "negative_pairs": self.negative_pairs, "train_conditions": self.train_conditions,
            "retain_subjects": p.synthesize.retain_subjects if self.retain_rows else 0})
        calibrate = p.calibrate if self.guidance else p.calibrate.model_copy(update={"guidance_scales": (1.0,)})
        return p.model_copy(update={"synthesize": synth, "calibrate": calibrate,
                                    "unlearn": p.unlearn.model_copy(update=self.unlearn)})


LLM_METHODS: dict[str, LLMMethod] = {m.name: m for m in (
    LLMMethod("cfg-orpo", "forget", "all", retain_rows=True, guidance=True),
    LLMMethod("cfg-orpo-paper", "swapped", "positive", retain_rows=False, guidance=True),
    LLMMethod("orpo", "forget", "all", retain_rows=True, guidance=False),
    LLMMethod("grad-ascent", "forget", "all", retain_rows=False, guidance=False, objective="grad_ascent"),
    LLMMethod("grad-diff", "forget", "all", retain_rows=True, guidance=False, objective="grad_ascent",
              unlearn=PEER_RETAIN),
    LLMMethod("npo", "forget", "all", retain_rows=True, guidance=False, objective="npo", unlearn=PEER_RETAIN),
    LLMMethod("simnpo", "forget", "all", retain_rows=True, guidance=False, objective="simnpo",
              unlearn={**PEER_RETAIN, "forget_weight": 0.125}),
    LLMMethod("control-phrase", "forget", "all", retain_rows=False, guidance=False, unlearn={"epochs": 0}),
)}
