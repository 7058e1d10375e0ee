"""Token-level chat formatting: prompts through the tokenizer's own chat template.

A training example is `prompt_ids + answer_ids`, where prompt_ids end with the assistant
header (add_generation_prompt) and answer_ids are the answer text plus the end-of-turn token;
only answer tokens are scored. Tokenizing the answer separately from the prompt keeps the
scored tokens identical for every condition (system prompt) the same answer appears under.
"""
from __future__ import annotations

# ChatML, as SmolLM2 uses; given to the tiny tokenizer trained from scratch.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prompt_ids(tokenizer, system: str | None, user: str) -> list[int]:
    """Token ids of a chat up to the assistant header. system None: no system message (the
    tokenizer's template may add its own default)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in some versions
        ids = ids["input_ids"]
    return list(ids)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's tokens followed by the end-of-turn (eos) token."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def raw_prompt_ids(tokenizer, text: str) -> list[int]:
    """Plain text, no chat template (the prefix-continuation attack and perplexity)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
