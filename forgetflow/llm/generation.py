"""Batched greedy (or seeded sampled) decoding and teacher-forced scoring, with classifier-free guidance.

Guidance mixes the next-token distributions of two conditions (cfg-llm.md):

    log-space (paper eq.):  log P~ = log P(.|c_neg) + gamma [log P(.|c_pos) - log P(.|c_neg)]
    prob-space (paper fix): P~ = P(.|c_neg) + gamma [P(.|c_pos) - P(.|c_neg)], clipped at 0

renormalised (log_softmax) so that scores are log-probabilities; gamma = 1 is no guidance.

Why our own loop and not `generate(guidance_scale=..., negative_prompt_ids=...)`: transformers'
CFG logits processor runs the negative branch one prompt at a time (measured ~10x slower per
item at batch 30 on this CPU), and it has no probability-space variant. Here the two conditions
of a batch are the two halves of ONE left-padded batch with one KV cache (positions come from
the attention mask, so the padding changes no score): one forward pass per token for both, which
on a GPU, where a small model's step costs its kernel launches, is about the price of one.
"""
from __future__ import annotations

from typing import Literal

import torch

Space = Literal["log", "prob"]


def guided_logprobs(logp_pos: torch.Tensor, logp_neg: torch.Tensor | None, gamma: float,
                    space: Space = "log") -> torch.Tensor:
    """Mix two log-probability tensors [..., V] by the CFG rule; returns log-probabilities."""
    if logp_neg is None or gamma == 1.0:
        return logp_pos
    if space == "log":
        return torch.log_softmax(logp_neg + gamma * (logp_pos - logp_neg), dim=-1)
    p = (logp_neg.exp() + gamma * (logp_pos.exp() - logp_neg.exp())).clamp_min(0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return p.clamp_min(1e-30).log()


def pad_rows(seqs: list[list[int]], pad_id: int, device, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token-id rows padded to the longest, on the left or the right."""
    width = max(len(s) for s in seqs)
    pads = [width - len(s) for s in seqs]
    if side == "left":
        rows, masks = [[pad_id] * n + s for s, n in zip(seqs, pads)], [[0] * n + [1] * len(s) for s, n in zip(seqs, pads)]
    else:
        rows, masks = [s + [pad_id] * n for s, n in zip(seqs, pads)], [[1] * len(s) + [0] * n for s, n in zip(seqs, pads)]
    return torch.tensor(rows, device=device), torch.tensor(masks, device=device)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


class _Decoding:
    """A left-padded batch of prompts (guided: both conditions' rows) and its KV cache during decoding."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, device: torch.device):
        self.model = model
        self.ids, self.mask = pad_rows(prompts, pad_id, device)
        self.past = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = mask_positions(self.mask)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                         cache=self.past, use_cache=True, logits_to_keep=1)  # no head over the prompt
        self.past = out.cache
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def start(self) -> torch.Tensor:
        return self._forward(self.ids)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self._forward(token[:, None])


def next_token(logp: torch.Tensor, temperature: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """The argmax of each row of log-probabilities [B, V], or with a temperature a draw from
    softmax(logp / temperature)."""
    if temperature is None:
        return logp.argmax(-1)
    return torch.multinomial(torch.softmax(logp / temperature, -1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             negative_prompts: list[list[int]] | None = None, guidance_scale: float = 1.0,
             space: Space = "log", progress: bool = False, desc: str = "generate",
             temperature: float | None = None, generator: torch.Generator | None = None) -> list[str]:
    """Greedy continuations of token-id prompts (decoded text, up to end-of-turn), in order.
    With `temperature`, sampled instead: each token from the (guided) next-token distribution
    at that temperature, drawn with `generator` (on the model's device; required, so that a
    run never depends on the global random state)."""
    from tqdm.auto import tqdm

    if temperature is not None and (temperature <= 0 or generator is None):
        raise ValueError("sampling needs a temperature > 0 and an explicit torch.Generator")
    device = next(model.parameters()).device
    guided = negative_prompts is not None and guidance_scale != 1.0
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        batch = _Decoding(model, chunk + (negative_prompts[start:start + batch_size] if guided else []), pad, device)
        lp = batch.start()
        done = torch.zeros(n, dtype=torch.bool, device=device)
        tokens = []
        for _ in range(max_new_tokens):
            token = next_token(guided_logprobs(lp[:n], lp[n:] if guided else None, guidance_scale, space),
                               temperature, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            tokens.append(token)
            done |= token == eos
            if bool(done.all()):
                break
            lp = batch.step(token.repeat(2) if guided else token)
        for row in torch.stack(tokens, 1).tolist() if tokens else [[] for _ in chunk]:
            row = row[:row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def continuation_logits(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits [B, T, V] (float) at each continuation position: row i's [:len(c_i)]
    predict c_i (T = the longest continuation; the rest is padding). With gradients when the
    caller has them on (the training losses of forgetflow/llm/answers.py).

    Rows that share a prompt share its forward pass: the distinct prompts run once (left-padded,
    positions from the attention mask so that padding changes no score) and their KV cache is
    repeated for each row; the continuations then run as one right-padded block after it, and
    the LM head only sees continuation positions. Scoring a question's four answer choices, a
    value against its nine surrogates, or ORPO's chosen and rejected answers thus costs the
    prompt once instead of once per row (on the general-knowledge quiz ~60 prompt tokens against
    ~6 per choice: ~3x fewer tokens). transformers has no shared-prefix scoring, hence our own."""
    device = next(model.parameters()).device
    index: dict[tuple, int] = {}
    owner = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompts], device=device)
    ids, mask = pad_rows([list(p) for p in index], pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask), use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1:].float()[owner]  # the prompt's last position predicts each row's first token
    longest = max(len(c) for c in continuations)
    if longest > 1:  # the last continuation token predicts nothing that is scored: leave it out
        cache = out.cache
        cache.reorder_cache(owner)  # one copy of its prompt's cache per row
        cont, cont_mask = pad_rows([c[:-1] for c in continuations], pad_id, device, side="right")
        positions = mask.sum(-1)[owner][:, None] + torch.arange(cont.shape[1], device=device)
        rest = model(input_ids=cont, attention_mask=torch.cat([mask[owner], cont_mask], 1), position_ids=positions,
                     cache=cache).logits.float()
        logits = torch.cat([logits, rest], 1)
    return logits


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: list[list[int]], continuations: list[list[int]], *,
                          batch_size: int, negative_prompts: list[list[int]] | None = None,
                          guidance_scale: float = 1.0, space: Space = "log",
                          progress: bool = False, desc: str = "score") -> list[torch.Tensor]:
    """Per-token (guided) log-probabilities of each continuation given its prompt."""
    from tqdm.auto import tqdm

    guided = negative_prompts is not None and guidance_scale != 1.0
    pad = tokenizer.pad_token_id
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        sl = slice(start, start + batch_size)
        conts = continuations[sl]
        if guided:  # both conditions in one forward pass, as in generate
            both = torch.log_softmax(continuation_logits(model, prompts[sl] + negative_prompts[sl], conts + conts, pad), -1)
            lp = guided_logprobs(both[:len(conts)], both[len(conts):], guidance_scale, space)
        else:
            lp = torch.log_softmax(continuation_logits(model, prompts[sl], conts, pad), -1)
        for i, c in enumerate(conts):
            target = torch.tensor(c, device=lp.device)
            out.append(lp[i, :len(c)].gather(-1, target[:, None])[:, 0].cpu())
    return out
