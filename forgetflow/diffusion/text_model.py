"""The captioned-digits text-to-image model: the classes of a Stable-Diffusion pipeline, tiny.

A CLIPTokenizer whose BPE vocabulary is learned from the captions (tokenizers library), a
CLIPTextModel and a UNet2DConditionModel (cross-attention in the lower blocks) built from
config, and the teacher's training loop. Unlike Stable Diffusion, whose CLIP text encoder is
pretrained and frozen, this from-scratch encoder has never seen text, so it trains jointly
with the UNet; after training it is frozen like SD's (unlearning only ever trains UNets).

Loss (eps-prediction): E_{x0,p,t,eps} || eps_phi(a_t x0 + b_t eps; E(p), t) - eps ||^2, where
E(p) is the text encoder's last hidden state of caption p, replaced by E("") with probability
prompt_dropout (classifier-free guidance's unconditional input). Saved weights are EMA weights
(UNet and text encoder).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import trange
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from forgetflow.compute import autocast, checkpointed, grad_scaler, resolve_device
from forgetflow.config import Params, TextToImageParams
from forgetflow.diffusion import captions
from forgetflow.diffusion.artifact import DiffusionVersion, ModelCard, new_scheduler, save_version
from forgetflow.diffusion.train_base import TRAINING_LOG, optimizer_step

START, END = "<|startoftext|>", "<|endoftext|>"


def train_tokenizer(texts: list[str], p: TextToImageParams) -> CLIPTokenizer:
    """A CLIPTokenizer (vocab.json + merges.txt, CLIP's "</w>" end-of-word BPE) learned from `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=END))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789,.'-")
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=p.vocab_size, special_tokens=[START, END],
                                                        end_of_word_suffix="</w>", initial_alphabet=alphabet))
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
        bpe.model.save(tmp)
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=p.max_length)


def new_text_encoder(tokenizer: CLIPTokenizer, p: TextToImageParams) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=p.text_hidden_size,
                            intermediate_size=4 * p.text_hidden_size, num_hidden_layers=p.text_layers,
                            num_attention_heads=p.text_heads, max_position_embeddings=p.max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def new_text_unet(p: TextToImageParams, image_size: int, in_channels: int = 1) -> UNet2DConditionModel:
    """Plain blocks at full resolution, cross-attention below it (as SD's UNet, shallower)."""
    n = len(p.block_out_channels)
    return UNet2DConditionModel(
        sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(p.block_out_channels), layers_per_block=p.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=p.text_hidden_size, attention_head_dim=p.attention_head_dim,
        norm_num_groups=min(32, p.block_out_channels[0]),
    )


def train_text_teacher(params: Params, out_dir: Path, *, device: torch.device | None = None,
                       progress: bool = True) -> Path:
    """Train tokenizer, text encoder and UNet on captioned digits; write a "ddpm" prompt version."""
    p, model = params.diffusion.text_to_image, params.diffusion.model
    device = device or resolve_device(params.compute)
    torch.manual_seed(p.seed)
    rng = torch.Generator().manual_seed(p.seed)  # captions are drawn on the CPU
    tokenizer = train_tokenizer(captions.all_captions(), p)
    text_encoder = new_text_encoder(tokenizer, p).to(device).train()
    unet = checkpointed(new_text_unet(p, model.image_size), params.compute).to(device).train()
    scheduler = new_scheduler(model)
    trained = [*unet.parameters(), *text_encoder.parameters()]
    ema_unet, ema_text = EMAModel(unet.parameters(), decay=p.ema_decay), EMAModel(text_encoder.parameters(),
                                                                                  decay=p.ema_decay)
    optimizer = torch.optim.AdamW(trained, lr=p.lr)
    scaler = grad_scaler(device, params.compute)

    images, labels, styles = captions.load_captioned_split("train", model.image_size)
    losses, start = [], time.perf_counter()
    for _ in trange(p.steps, disable=not progress, desc="text-to-image teacher"):
        idx = torch.randint(len(images), (p.batch_size,), generator=rng)
        dropped = torch.rand(p.batch_size, generator=rng) < p.prompt_dropout
        texts = ["" if d else captions.caption(int(labels[i]), int(styles[i]), rng) for i, d in zip(idx, dropped)]
        ids = tokenizer(texts, padding="max_length", truncation=True, max_length=p.max_length,
                        return_tensors="pt").input_ids.to(device)
        x0 = images[idx].to(device)
        t = torch.randint(model.num_train_timesteps, (p.batch_size,), generator=rng).to(device)
        eps = torch.randn(x0.shape, generator=rng).to(device)
        with autocast(device, params.compute):
            states = text_encoder(ids).last_hidden_state
            eps_hat = unet(scheduler.add_noise(x0, eps, t), t, encoder_hidden_states=states).sample
        loss = F.mse_loss(eps_hat.float(), eps)
        optimizer_step(loss, optimizer, scaler, trained)
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        losses.append(loss.item())
    seconds = time.perf_counter() - start

    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    card = ModelCard(kind="ddpm", num_classes=0, null_class=-1, image_size=model.image_size,
                     guidance_scale=p.guidance_scale, class_names=[], conditioning="prompt",
                     vocabulary=captions.vocabulary(),
                     hyperparameters={"model": model.model_dump(mode="json"), "text_to_image": p.model_dump(mode="json")})
    version = DiffusionVersion(unet.eval(), None, scheduler, card, text_encoder=text_encoder.eval(), tokenizer=tokenizer)
    out_dir = save_version(Path(out_dir), version)
    (out_dir / TRAINING_LOG).write_text(json.dumps(
        {"seconds": seconds, "steps": p.steps, "steps_per_second": p.steps / seconds,
         "mean_loss": sum(losses) / len(losses), "final_loss": losses[-1]}, indent=2))
    return out_dir
