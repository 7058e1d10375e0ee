"""LLM unlearning methods selectable by name in a request (`method:`).

A method is its data recipe (which conditions the pairs are trained under, retain rows or
not) plus its loss; all share the ORPO-on-LoRA trainer (forgetflow/llm/orpo.py) today.

    cfg-orpo        ours: pairs under c_pos, c_neg, neutral and adversarial prompts (the raw
                    weights forget), retain rows from the model's own answers about other
                    subjects, guidance calibrated at inference
    cfg-orpo-paper  the published recipe (arXiv 2412.06846): c_pos pairs + SWAPPED c_neg pairs,
                    no retain rows, guidance calibrated
    orpo            ORPO with our data recipe and no guidance (gamma fixed at 1)
"""
from __future__ import annotations

from dataclasses import dataclass

from forgetflow.config import LLMParams


@dataclass(frozen=True)
class LLMMethod:
    name: str
    negative_pairs: str  # "forget" | "swapped"
    train_conditions: str  # "all" | "positive"
    retain_rows: bool
    guidance: bool

    def params(self, p: LLMParams) -> LLMParams:
        """params.llm with this method's data recipe applied."""
        synth = p.synthesize.model_copy(update={
            "negative_pairs": self.negative_pairs, "train_conditions": self.train_conditions,
            "retain_subjects": p.synthesize.retain_subjects if self.retain_rows else 0})
        calibrate = p.calibrate if self.guidance else p.calibrate.model_copy(update={"guidance_scales": (1.0,)})
        return p.model_copy(update={"synthesize": synth, "calibrate": calibrate})


LLM_METHODS: dict[str, LLMMethod] = {m.name: m for m in (
    LLMMethod("cfg-orpo", "forget", "all", retain_rows=True, guidance=True),
    LLMMethod("cfg-orpo-paper", "swapped", "positive", retain_rows=False, guidance=True),
    LLMMethod("orpo", "forget", "all", retain_rows=True, guidance=False),
)}
