"""Data-parallel training (forgetflow/distributed.py) with two CPU processes over Gloo: the same
code path as several GPUs over NCCL, which CI does not have.

- gradients are averaged over the ranks; a failure on rank 0 stops every rank and reaches the
  caller with its own type;
- SFD on two processes: each draws half of the recipe's batch, rank 0 writes the version, and a
  run resumed from a two-process checkpoint ends with exactly the weights of the uninterrupted
  run (every rank's random stream is in the checkpoint).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from forgetflow import distributed
from forgetflow.checkpoints import LocalCheckpointSink
from forgetflow.config import ComputeParams
from forgetflow.diffusion.sfd import SFD, STATE_FILE
from tests.diffusion_fixtures import tiny_params, untrained_version, with_overrides  # noqa: F401

TWO = ComputeParams(device="cpu", processes=2)


def grads_after_averaging() -> list[float]:
    """On each rank: a gradient equal to rank + 1, averaged; every rank's result."""
    weight = torch.nn.Parameter(torch.zeros(3))
    (weight.sum() * (distributed.rank() + 1)).backward()
    distributed.average_gradients([weight])
    return distributed.gather(weight.grad.tolist())


def fail_on_rank_zero() -> None:
    distributed.on_main(lambda: (_ for _ in ()).throw(FileNotFoundError("no such checkpoint")))


def test_gradients_are_averaged_over_the_ranks():
    assert distributed.launch(grads_after_averaging, compute=TWO) == [[1.5] * 3, [1.5] * 3]
    assert distributed.launch(grads_after_averaging, compute=ComputeParams(device="cpu", processes=1)) == [[1.0] * 3]


def test_a_failure_on_rank_zero_stops_every_rank_and_keeps_its_type():
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        distributed.launch(fail_on_rank_zero, compute=TWO)


def test_sfd_on_two_processes_resumes_exactly(untrained_version, tiny_params, tmp_path):
    params = with_overrides(tiny_params, sfd={"iterations": 4, "checkpoint_every": 2, "log_every": 2})
    params = params.model_copy(update={"compute": TWO})
    pairs = [(7, 8)]
    whole = SFD.unlearn(untrained_version, tmp_path / "whole", pairs, params,
                        checkpoints=LocalCheckpointSink(tmp_path / "ckpt-whole"), progress=False)
    log = json.loads((whole / "training_log.json").read_text())
    assert log["processes"] == 2 and log["iterations"] == 4 and log["resumed_from"] is None
    state = torch.load(tmp_path / "ckpt-whole" / "step-00000002" / STATE_FILE, weights_only=True)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0], state["rng_ranks"][1])

    # a run that stopped after its step-2 checkpoint, resumed on two processes again
    shutil.copytree(tmp_path / "ckpt-whole" / "step-00000002", tmp_path / "ckpt-resumed" / "step-00000002")
    resumed = SFD.unlearn(untrained_version, tmp_path / "resumed", pairs, params,
                          checkpoints=LocalCheckpointSink(tmp_path / "ckpt-resumed"), progress=False)
    assert json.loads((resumed / "training_log.json").read_text())["resumed_from"] == 2
    for name in ("generator", "score"):
        a = load_file(next((whole / name).glob("*.safetensors")))
        b = load_file(next((resumed / name).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
