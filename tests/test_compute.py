"""Mixed-precision steps: with loss scaling on (fp16), gradients are clipped unscaled."""
from __future__ import annotations

import torch

from forgetflow.compute import clipped_step


def test_a_scaled_step_clips_and_applies_the_true_gradient():
    for max_norm, expected in ((100.0, -1.0), (0.5, -0.05)):  # gradient 10, lr 0.1
        p = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([p], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=True)
        clipped_step((10 * p).sum(), optimizer, scaler, [p], max_norm)
        assert torch.allclose(p.detach(), torch.tensor([expected])), (max_norm, p)
