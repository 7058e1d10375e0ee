"""Real-size smoke of SFD's text-to-image path: a Stable-Diffusion-1.5-shaped pipeline (UNet
~860M parameters, CLIP ViT-L/14-shaped text encoder, the SD vae), randomly initialised from the
diffusers / transformers configs (no hub here), forgotten with the `stable-diffusion` preset
(bf16 autocast, gradient checkpointing, the paper's learning rates and batch) for a few
iterations. Prints and writes JSON: seconds per iteration and peak GPU memory.

    python bench/sd_smoke.py --iterations 6 --out bench/gpu/sd15_smoke.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def sd15_pipeline(directory: Path) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from forgetflow.config import TextToImageParams
    from forgetflow.diffusion import captions
    from forgetflow.diffusion.text_model import train_tokenizer

    tokenizer = train_tokenizer(captions.all_captions() + ["a photo of a cat", "a photo of a dog"],
                                TextToImageParams(vocab_size=256, max_length=77))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(directory)
    return directory


def main() -> None:
    from forgetflow.compute import resolve_device
    from forgetflow.config import load_params
    from forgetflow.diffusion.concepts import PromptForget
    from forgetflow.diffusion.sfd import train_sfd

    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench/gpu/sd15_smoke.json"))
    args = parser.parse_args()
    params = load_params(preset="stable-diffusion")
    sfd = params.diffusion.sfd.model_copy(update={"iterations": args.iterations, "checkpoint_every": 10**6})
    params = params.model_copy(update={"diffusion": params.diffusion.model_copy(update={"sfd": sfd})})
    device = resolve_device(params.compute)
    forget = PromptForget(forget=[{"concept": "cat", "override": "dog", "forget_prompt": "a photo of a cat",
                                   "override_prompt": "a photo of a dog"}],
                          retain=["a handwritten one", "a thick nine", "number four"])
    with tempfile.TemporaryDirectory() as tmp:
        base = sd15_pipeline(Path(tmp) / "sd15")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        out = train_sfd(base, Path(tmp) / "new", forget, params, device=device)
        wall = time.perf_counter() - began
        log = json.loads((out / "training_log.json").read_text())
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "precision": params.compute.mixed_precision if device.type == "cuda" else "fp32",
              "gradient_checkpointing": params.compute.gradient_checkpointing,
              "batch": {"retain": sfd.batch_remaining, "forget": sfd.batch_forget}, "iterations": args.iterations,
              "seconds_per_iteration": 1.0 / log["iterations_per_second"], "wall_s_with_loading": wall,
              "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
