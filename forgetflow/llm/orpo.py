"""ORPO on a LoRA adapter: the unlearning trainer of the LLM family.

    L = NLL(chosen) - lambda * log sigmoid( log odds(chosen) - log odds(rejected) )
    odds(y) = P(y) / (1 - P(y)),  log P(y) = mean token log-prob of y given the prompt
    (Hong et al. 2024; cfg-llm.md, lambda = 0.1)

plus, for retain rows (no rejected side), retain_weight times either NLL(chosen)
(`retain_loss: nll`) or the token-level KL(base || adapted) over the retain answer
(`retain_loss: kl`): the base is the same network with the adapter switched off, so the KL
costs one extra forward pass and no second model. KL constrains the whole next-token
distribution on other subjects' answers, not only its argmax; measured on the tiny model it
keeps kept customers' recall where NLL on the same rows did not (see params.yaml). Written here rather than
taken from TRL: the loss is a few lines, and TRL's ORPOTrainer has moved between packages and
expects a dataset/Trainer stack we do not otherwise need.

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
import torch.nn.functional as F

from forgetflow.checkpoints import CheckpointSink
from forgetflow.compute import autocast, clipped_step, grad_scaler
from forgetflow.config import ComputeParams, LLMUnlearnParams
from forgetflow.llm.chat import answer_ids, prompt_ids


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_nll: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ORPO loss and log odds ratio, from mean token log-probs [B]."""
    log_odds = (chosen_logp - log1m_exp(chosen_logp)) - (rejected_logp - log1m_exp(rejected_logp))
    return chosen_nll - lam * F.logsigmoid(log_odds), log_odds


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


def _batch(model, tokenizer, prompts: list[list[int]], answers: list[list[int]]):
    device = next(model.parameters()).device
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, device=device)
    labels = torch.full((len(seqs), width), -100, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a, device=device)
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a, device=device)
        mask[i, :len(p) + len(a)] = 1
    return ids, labels, mask


def _answer_logprobs(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-probs [N, V] at the N positions that predict an answer token, those
    tokens [N] and the row each belongs to [N]. The softmax runs over answer positions only
    (a fraction of the sequence; the vocabulary is 49k wide for SmolLM2)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    scored = labels[:, 1:] != -100
    return torch.log_softmax(logits[scored].float(), -1), labels[:, 1:][scored], scored.nonzero()[:, 0]


def mean_logps(model, tokenizer, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """Mean token log-prob of each answer given its prompt (with gradients), [B]."""
    ids, labels, mask = _batch(model, tokenizer, prompts, answers)
    logp, target, row = _answer_logprobs(model, ids, mask, labels)
    token = logp.gather(-1, target[:, None])[:, 0]
    total = torch.zeros(len(prompts), device=token.device, dtype=token.dtype).index_add(0, row, token)
    return total / torch.bincount(row, minlength=len(prompts)).clamp_min(1)


def retain_kl(peft_model, tokenizer, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """Mean over answer tokens of KL(base || adapted) of the next-token distribution; the
    base is the peft model with its adapter disabled."""
    ids, labels, mask = _batch(peft_model, tokenizer, prompts, answers)
    with torch.no_grad(), peft_model.disable_adapter():
        base, _, _ = _answer_logprobs(peft_model, ids, mask, labels)
    new, _, _ = _answer_logprobs(peft_model, ids, mask, labels)
    return (base.exp() * (base - new)).sum(-1).mean()


def batch_loss(model, tokenizer, batch: list[dict], p: LLMUnlearnParams) -> tuple[torch.Tensor, dict]:
    """ORPO over the forget rows of a batch + retain_weight * NLL over its retain rows."""
    forget = [r for r in batch if "rejected" in r]
    retain = [r for r in batch if "rejected" not in r]
    nll_retain = retain if p.retain_loss == "nll" else []
    prompts = [r["prompt"] for r in forget] * 2 + [r["prompt"] for r in nll_retain]
    answers = [r["chosen"] for r in forget] + [r["rejected"] for r in forget] + [r["chosen"] for r in nll_retain]
    logps = mean_logps(model, tokenizer, prompts, answers) if prompts else torch.zeros(0)
    n = len(forget)
    chosen, rejected, kept = logps[:n], logps[n:2 * n], logps[2 * n:]
    terms, stats = [], {}
    if n:
        loss_f, log_odds = orpo_loss(chosen, rejected, -chosen, p.orpo_lambda)
        terms.append(loss_f.mean())
        stats.update(orpo=loss_f.mean().item(), log_odds=log_odds.mean().item(), chosen_logp=chosen.mean().item(),
                     rejected_logp=rejected.mean().item())
    if retain:
        if p.retain_loss == "nll":
            loss_r = -kept.mean()
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
                  device: torch.device, adapter_dir: Path, *, checkpoints: CheckpointSink | None = None,
                  progress: bool = True) -> list[dict]:
    """Train a LoRA adapter on `rows` (synthesize.build_rows) over `model`; save it to
    adapter_dir (peft format). Returns the loss history."""
    from tqdm.auto import tqdm

    model.requires_grad_(False)
    torch.manual_seed(p.seed)  # the adapter's initialisation and dropout: the same run in any process
    peft_model = _lora(model, p).to(device)
    encoded = [encode_row(tokenizer, r, p.max_length) for r in rows]
    steps_per_epoch = math.ceil(len(encoded) / p.batch_size)
    total = p.epochs * steps_per_epoch
    trainable = [q for q in peft_model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: p.lr_min_ratio + (1 - p.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
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
    bar = tqdm(total=total, initial=step, desc="unlearn (ORPO)", disable=not progress)
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        random.Random(p.seed + epoch).shuffle(order)  # the same order after a resume
        idx = order[offset * p.batch_size:(offset + 1) * p.batch_size]
        with autocast(device, compute):
            loss, stats = batch_loss(peft_model, tokenizer, [encoded[i] for i in idx], p)
        clipped_step(loss, optimizer, scaler, trainable, p.grad_clip)
        schedule.step()
        step += 1
        bar.update(1)
        if step % p.log_every == 0 or step == total:
            history.append({"step": step, **stats})
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if checkpoints is not None and (step % p.checkpoint_every == 0) and step < total:
            _save_checkpoint(peft_model, optimizer, schedule, scaler, history, step, checkpoints)
    bar.close()
    peft_model.eval()
    peft_model.save_pretrained(adapter_dir)
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
