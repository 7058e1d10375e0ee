"""Teacher-forced log-probabilities of answers given their prompts, with gradients: the forward
pass behind every training loss of the LLM family (fine-tuning, the unlearning objectives, the
KL retain term) and the Min-K% membership score.

The LM head (576 x 49k for SmolLM2, about a fifth of the model's compute per position) runs
only where an answer token is predicted, and rows that share a prompt share its forward pass
(generation.continuation_logits): ORPO scores two answers, chosen and rejected, after every
forget prompt (system + user turn + the answer's own prefix, several times longer than the
answer). transformers' `labels=` loss computes the head everywhere and runs every row in full,
hence this module. Measured on SmolLM2 (2 cores), batch 8 of unlearning rows: 5.3-5.4 -> 4.0-4.8 s
a step; a fine-tuning step (one pass, head over the answers only) 2.9 -> 2.5-2.7 s.

Rows with distinct prompts (fine-tuning) run in one left-padded pass instead, every answer
ending at the last column and the head over the last `longest answer + 1` positions: the
prompt-then-continuation split only pays when a prompt is shared (it made a fine-tuning step
slower: 3.3 -> 3.5-3.9 s). So do rows under activation checkpointing, where transformers drops
the KV cache in training.
"""
from __future__ import annotations

import torch

from forgetflow.llm.generation import continuation_logits, mask_positions, pad_rows


def _checkpointing(model) -> bool:
    return model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules())


def answer_token_logprobs(model, prompts: list[list[int]], answers: list[list[int]],
                          pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-probs [N, V] at the N positions that predict an answer token, those
    tokens [N] and the row each belongs to [N] (rows in order, tokens in order within a row)."""
    device = next(model.parameters()).device
    if len(set(map(tuple, prompts))) == len(prompts) or _checkpointing(model):
        ids, mask = pad_rows([p + a for p, a in zip(prompts, answers)], pad_id, device)
        longest = max(len(a) for a in answers)  # logits at the last longest+1 positions, the very last unscored
        logits = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask),
                       logits_to_keep=longest + 1).logits[:, :-1]
        targets, _ = pad_rows(answers, -100, device)  # left-padded like the rows
    else:
        logits = continuation_logits(model, prompts, answers, pad_id)
        targets, _ = pad_rows(answers, -100, device, side="right")  # right-padded like the continuations
    scored = targets != -100
    return torch.log_softmax(logits[scored].float(), -1), targets[scored], scored.nonzero()[:, 0]


def answer_logps(model, tokenizer, prompts: list[list[int]], answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum) over its tokens of each answer's log-prob given its prompt, [B] each."""
    logp, target, row = answer_token_logprobs(model, prompts, answers, tokenizer.pad_token_id)
    token = logp.gather(-1, target[:, None])[:, 0]
    total = torch.zeros(len(prompts), device=token.device, dtype=token.dtype).index_add(0, row, token)
    return total / torch.bincount(row, minlength=len(prompts)).clamp_min(1), total


def mean_logps(model, tokenizer, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """Mean token log-prob of each answer given its prompt, [B]."""
    return answer_logps(model, tokenizer, prompts, answers)[0]
