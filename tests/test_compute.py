"""Mixed-precision steps: with loss scaling on (fp16), gradients are clipped unscaled.
Gradient checkpointing (compute.gradient_checkpointing) changes memory, not gradients."""
from __future__ import annotations

import torch

from forgetflow.compute import checkpointed, clipped_step
from forgetflow.config import ComputeParams, DiffusionModelParams


def test_a_scaled_step_clips_and_applies_the_true_gradient():
    for max_norm, expected in ((100.0, -1.0), (0.5, -0.05)):  # gradient 10, lr 0.1
        p = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([p], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=True)
        clipped_step((10 * p).sum(), optimizer, scaler, [p], max_norm)
        assert torch.allclose(p.detach(), torch.tensor([expected])), (max_norm, p)


def _grads(model: torch.nn.Module, loss_of) -> list[torch.Tensor]:
    model.zero_grad()
    loss_of(model).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_checkpointed_unet_and_llm_give_the_same_gradients():
    from diffusers import UNet2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetflow.diffusion.artifact import new_unet

    torch.manual_seed(0)
    x, t, c = torch.randn(4, 1, 16, 16), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 3, 7, 10])
    ids = torch.randint(0, 64, (2, 12))
    on = ComputeParams(gradient_checkpointing=True)
    cases = [
        (lambda: new_unet(DiffusionModelParams()), lambda m: m(x, t, class_labels=c).sample.square().mean()),
        (lambda: LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=4)),
         lambda m: m(input_ids=ids, labels=ids).loss),
    ]
    for build, loss_of in cases:
        torch.manual_seed(1)
        plain = build().train()
        torch.manual_seed(1)
        saved = checkpointed(build(), on).train()
        flag = "is_activation_checkpointing" if hasattr(saved, "is_activation_checkpointing") else "is_gradient_checkpointing"
        assert getattr(saved, flag) and not getattr(plain, flag)
        for a, b in zip(_grads(plain, loss_of), _grads(saved, loss_of), strict=True):
            assert torch.allclose(a, b, atol=1e-6), type(plain).__name__
    assert not checkpointed(new_unet(DiffusionModelParams()), ComputeParams()).is_gradient_checkpointing
