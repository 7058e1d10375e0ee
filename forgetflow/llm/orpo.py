"""The unlearning trainer of the LLM family: a forget objective on a LoRA adapter.

    L = forget_weight * objective(forget rows) + retain_weight * retain(retain rows)

The objective is the method's (forgetflow/llm/objectives.py: ORPO for ours, GradAscent, NPO,
SimNPO for the peers). The retain term, over rows with no rejected side, is NLL(answer)
(`retain_loss: nll`) or the token-level KL(base || adapted) over the answer (`retain_loss:
kl`): the base is the same network with the adapter switched off, so the KL costs one extra
forward pass and no second model. KL constrains the whole next-token distribution on other
subjects' answers, not only its argmax; measured on the tiny model it keeps kept customers'
recall where NLL on the same rows did not (see params.yaml). Written here rather than taken
from TRL: the losses are a few lines each, and TRL's trainers have moved between packages and
expect a dataset/Trainer stack we do not otherwise need.

The adapter is peft LoRA over the parent version's (merged) weights. Checkpoints hold the
adapter, optimizer, schedule and RNG state; they go to a CheckpointSink every
`checkpoint_every` steps and a restarted run resumes from the newest one.
"""
from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path

import torch

from forgetflow.checkpoints import CheckpointSink
from forgetflow import distributed
from forgetflow.compute import autocast, checkpointed, clipped_step, grad_scaler
from forgetflow.config import ComputeParams, LLMUnlearnParams
from forgetflow.llm.answers import answer_logps, answer_token_logprobs
from forgetflow.llm.chat import answer_ids, prompt_ids
from forgetflow.llm.objectives import OBJECTIVES, ForgetLogps


def encode_row(tokenizer, row: dict, max_length: int) -> dict:
    """Token ids: prompt = chat prompt + the assistant prefix (if any); chosen / rejected =
    the continuations to score (with the end-of-turn token)."""
    prompt = prompt_ids(tokenizer, row["system"], row["user"])
    if row.get("prefix"):
        prompt = prompt + tokenizer(row["prefix"], add_special_tokens=False)["input_ids"]
    enc = {"prompt": prompt, "chosen": answer_ids(tokenizer, row["chosen"])}
    if row.get("rejected") is not None:
        enc["rejected"] = answer_ids(tokenizer, row["rejected"])
    for k in ("chosen", "rejected"):
        if k in enc:
            enc[k] = enc[k][:max(1, max_length - len(prompt))]
    return enc


def retain_kl(peft_model, tokenizer, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """Mean over answer tokens of KL(base || adapted) of the next-token distribution; the
    base is the peft model with its adapter disabled."""
    pad = tokenizer.pad_token_id
    with torch.no_grad(), peft_model.disable_adapter():
        base, _, _ = answer_token_logprobs(peft_model, prompts, answers, pad)
    new, _, _ = answer_token_logprobs(peft_model, prompts, answers, pad)
    return (base.exp() * (base - new)).sum(-1).mean()


def batch_loss(model, tokenizer, batch: list[dict], p: LLMUnlearnParams, objective: str = "orpo") -> tuple[torch.Tensor, dict]:
    """forget_weight * the objective over the batch's forget rows + retain_weight * the retain
    term over its retain rows; one forward pass for every scored answer, a forget row's chosen
    and rejected answers after one pass of their shared prompt (answers.py), plus the
    adapter-off pass of the KL or of a reference-based objective."""
    obj = OBJECTIVES[objective]
    forget = [r for r in batch if "rejected" in r]
    retain = [r for r in batch if "rejected" not in r]
    nll_retain = retain if p.retain_loss == "nll" else []
    chosen_rows = forget if obj.uses_chosen else []
    prompts = [r["prompt"] for r in chosen_rows + forget + nll_retain]
    answers = [r["chosen"] for r in chosen_rows] + [r["rejected"] for r in forget] + [r["chosen"] for r in nll_retain]
    means, sums = answer_logps(model, tokenizer, prompts, answers) if prompts else (torch.zeros(0), torch.zeros(0))
    n, k = len(forget), len(chosen_rows)
    terms, stats = [], {}
    if n:
        lp = ForgetLogps(rejected_mean=means[k:k + n], rejected_sum=sums[k:k + n], chosen_mean=means[:k] if k else None)
        if obj.uses_reference:
            with torch.no_grad(), model.disable_adapter():
                lp.rejected_sum_ref = answer_logps(model, tokenizer, [r["prompt"] for r in forget],
                                                   [r["rejected"] for r in forget])[1]
        loss_f, stats = obj.loss(lp, p)
        terms.append(p.forget_weight * loss_f)
    if retain:
        if p.retain_loss == "nll":
            loss_r = -means[n + k:].mean()
        else:
            loss_r = retain_kl(model, tokenizer, [r["prompt"] for r in retain], [r["chosen"] for r in retain])
        terms.append(p.retain_weight * loss_r)
        stats[f"retain_{p.retain_loss}"] = loss_r.item()
    loss = torch.stack(terms).sum()
    stats["loss"] = loss.item()
    return loss, stats


def _lora(model, p: LLMUnlearnParams):
    from peft import LoraConfig, get_peft_model

    targets = p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules)
    config = LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_adapter(model, tokenizer, rows: list[dict], p: LLMUnlearnParams, compute: ComputeParams,
                  device: torch.device, adapter_dir: Path, *, objective: str = "orpo",
                  checkpoints: CheckpointSink | None = None, progress: bool = True) -> list[dict]:
    """Train a LoRA adapter on `rows` (synthesize.build_rows) over `model` with `objective`
    (objectives.OBJECTIVES); save it to adapter_dir (peft format). Returns the loss history.
    With p.epochs 0 the adapter is saved as initialised: LoRA's B is zero, so it changes nothing.
    Under forgetflow.distributed each rank takes every world-th row of each batch (the first
    row when the batch has fewer rows than ranks), gradients are averaged, rank 0 saves."""
    from tqdm.auto import tqdm

    model.requires_grad_(False)
    torch.manual_seed(p.seed)  # the adapter's initialisation and dropout: the same run in any process
    peft_model = _lora(checkpointed(model, compute), p).to(device)
    encoded = [encode_row(tokenizer, r, p.max_length) for r in rows]
    steps_per_epoch = math.ceil(len(encoded) / p.batch_size)
    total = p.epochs * steps_per_epoch
    trainable = [q for q in peft_model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: p.lr_min_ratio + (1 - p.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(s / max(total, 1), 1.0))))
    scaler = grad_scaler(device, compute)
    step, history = 0, []
    latest = checkpoints.latest() if checkpoints else None
    if latest is not None:
        step, state_dir = latest
        state = torch.load(Path(state_dir) / "trainer.pt", weights_only=False)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_model, load_file(Path(state_dir) / "adapter.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state.get("scaler", {}))
        history = state["history"]
    order = list(range(len(encoded)))
    peft_model.train()
    bar = tqdm(total=total, initial=step, desc=f"unlearn ({objective})", disable=not (progress and distributed.is_main()))
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        random.Random(p.seed + epoch).shuffle(order)  # the same order after a resume
        batch = order[offset * p.batch_size:(offset + 1) * p.batch_size]
        idx = batch[distributed.rank()::distributed.world_size()] or batch[:1]
        with autocast(device, compute):
            loss, stats = batch_loss(peft_model, tokenizer, [encoded[i] for i in idx], p, objective)
        clipped_step(loss, optimizer, scaler, trainable, p.grad_clip)
        schedule.step()
        step += 1
        bar.update(1)
        if step % p.log_every == 0 or step == total:
            history.append({"step": step, **stats})
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if checkpoints is not None and (step % p.checkpoint_every == 0) and step < total:
            distributed.on_main(_save_checkpoint, peft_model, optimizer, schedule, scaler, history, step, checkpoints)
    bar.close()
    peft_model.eval()
    distributed.on_main(peft_model.save_pretrained, adapter_dir)
    return history


def _save_checkpoint(peft_model, optimizer, schedule, scaler, history, step: int, sink: CheckpointSink) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="forgetflow-llm-ckpt-") as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
        save_file(state, Path(tmp) / "adapter.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                    "history": history, "step": step}, Path(tmp) / "trainer.pt")
        (Path(tmp) / "step.json").write_text(json.dumps({"step": step}))
        sink.save(step, Path(tmp))
