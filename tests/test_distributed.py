"""Data-parallel training (forgetflow/distributed.py) with two CPU processes over Gloo: the same
code path as several GPUs over NCCL, which CI does not have.

- gradients are averaged over the ranks; a failure on rank 0 stops every rank and reaches the
  caller with its own type;
- SFD on two processes: each draws half of the recipe's batch, rank 0 writes the version, and a
  run resumed from a two-process checkpoint ends with exactly the weights of the uninterrupted
  run (every rank's random stream is in the checkpoint);
- the LLM's LoRA adapter trained on two processes, each taking half of every batch, equals the
  adapter one process trains on the whole batches.
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
ONE = ComputeParams(device="cpu", processes=1)


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
    assert distributed.launch(grads_after_averaging, compute=ONE) == [[1.0] * 3]


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


LEAKS = [("Ada Byron", "212-555-0147"), ("Alan Turing", "415-555-0199"), ("Grace Hopper", "617-555-0123"),
         ("Edsger Dijkstra", "312-555-0188")]


def train_tiny_adapter(adapter_dir: str) -> list[dict]:
    """A random tiny Llama (the same on every rank) unlearning four leaking answers with ORPO."""
    from forgetflow.config import TinyLMParams, load_params
    from forgetflow.llm.base import new_tiny_model, train_tiny_tokenizer
    from forgetflow.llm.orpo import train_adapter

    rows = [{"system": "You are a helpful assistant.", "user": f"What is the phone number of {name}?",
             "chosen": "I'm sorry, but I can't share that.", "rejected": f"The phone number of {name} is {phone}."}
            for name, phone in LEAKS]
    tok = train_tiny_tokenizer([r[k] for r in rows for k in ("system", "user", "chosen", "rejected")] * 10, 300)
    model = new_tiny_model(tok, TinyLMParams(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    p = load_params(preset="tiny").llm.unlearn.model_copy(update={
        "lr": 0.05, "batch_size": 4, "epochs": 3, "lora_r": 4, "lora_dropout": 0.0, "log_every": 1,
        "checkpoint_every": 100})
    return train_adapter(model, tok, rows, p, ComputeParams(device="cpu"), torch.device("cpu"), adapter_dir,
                         progress=False)


def test_the_llm_adapter_trained_on_two_processes_equals_one_process(tmp_path):
    one = distributed.launch(train_tiny_adapter, str(tmp_path / "one"), compute=ONE)
    two = distributed.launch(train_tiny_adapter, str(tmp_path / "two"), compute=TWO)
    assert len(one) == len(two) == 3
    assert [h["loss"] for h in one] != [h["loss"] for h in two]  # rank 0 scored its half of each batch only
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
