"""What a diffusion network is told to draw: one abstraction for class labels and prompts.

Every network call of forgetflow's diffusion code (sampling, SFD, ESD, base training) takes
integer condition ids c [N] and a Conditioning that turns them into the UNet's inputs, so
classifier-free guidance eps_null + w (eps_c - eps_null), condition dropout (c -> null) and
SFD's keep / forget / override rows are written once for both settings:

- ClassConditioning (a class-conditional UNet2DModel): id = class label, null = the extra
  class `num_classes`; the UNet gets class_labels=c.
- PromptConditioning (a UNet2DConditionModel with a CLIP text encoder, Stable-Diffusion
  style): id = a row of a table of prompt embeddings that the frozen text encoder computed
  once, null = the row of the empty prompt "" (Stable Diffusion's unconditional input); the
  UNet gets encoder_hidden_states=table[c].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClassConditioning:
    null: int  # the null class (num_classes): the unconditional input

    def unet_inputs(self, ids: Tensor) -> dict:
        return {"class_labels": ids}

    def null_ids(self, like: Tensor) -> Tensor:
        return torch.full_like(like, self.null)


@dataclass(frozen=True)
class PromptConditioning:
    """`embeddings` [P + 1, L, D]: the text encoder's last hidden states of P prompts, then of ""."""

    embeddings: Tensor
    prompts: tuple[str, ...]

    @property
    def null(self) -> int:
        return len(self.prompts)

    def unet_inputs(self, ids: Tensor) -> dict:
        return {"encoder_hidden_states": self.embeddings.to(ids.device)[ids]}

    def null_ids(self, like: Tensor) -> Tensor:
        return torch.full_like(like, self.null)

    def ids(self, prompts: list[str]) -> Tensor:
        """The ids of `prompts` (each must be in the table)."""
        index = {p: i for i, p in enumerate(self.prompts)}
        return torch.tensor([index[p] for p in prompts], dtype=torch.long)

    def to(self, device: torch.device | str) -> "PromptConditioning":
        return PromptConditioning(self.embeddings.to(device), self.prompts)


Conditioning = ClassConditioning | PromptConditioning


@torch.inference_mode()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], batch_size: int = 256) -> PromptConditioning:
    """The prompt table of `prompts` (+ ""): input ids padded to the tokenizer's
    model_max_length, the encoder's last_hidden_state (what Stable Diffusion's UNet reads)."""
    device = next(text_encoder.parameters()).device
    rows = list(prompts) + [""]
    out = []
    for start in range(0, len(rows), batch_size):
        ids = tokenizer(rows[start:start + batch_size], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids).last_hidden_state.float())
    return PromptConditioning(torch.cat(out), tuple(prompts))
