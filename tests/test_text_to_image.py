"""Text-to-image concept forgetting: requests, prompt building, the pipeline layout, and SFD on a
Stable-Diffusion-shaped pipeline (vae latents, CLIP text encoder, gradient checkpointing) built
tiny and random here, with the classes a real one has."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgetflow.diffusion import captions
from forgetflow.diffusion.artifact import UNET_DIR, load_card, load_version
from forgetflow.diffusion.concepts import (PromptForget, build_prompt_forget, card_records, lineage_records, mentions,
                                           paraphrase_prompts, prompts_digest, replace_concept)
from forgetflow.diffusion.sampling import sample
from forgetflow.families import TargetError
from forgetflow.llm.pii import subject_hash
from forgetflow.request import RequestError, parse_request
from tests.diffusion_fixtures import tiny_params, with_overrides  # noqa: F401

VOCAB = captions.vocabulary()


def _concept_request(**target) -> dict:
    return {"request_id": "r1", "model": "digits-t2i",
            "target": {"kind": "diffusion-concept", "concept": "seven", "override": "eight", **target}}


def test_a_concept_request_parses_and_bad_ones_name_the_field():
    request = parse_request(_concept_request(forget_prompts=["a handwritten seven"]))
    assert request.family == "diffusion" and request.target.concept == "seven"
    with pytest.raises(RequestError, match="forget_prompts.*empty prompt list"):
        parse_request(_concept_request(forget_prompts=[]))
    with pytest.raises(RequestError, match="override is the concept itself"):
        parse_request(_concept_request(override="Seven"))
    with pytest.raises(RequestError, match="target.diffusion-concept.concept"):
        parse_request(_concept_request(concept=""))


def test_prompts_from_the_vocabulary_pair_each_forget_prompt_with_its_override_and_keep_the_rest():
    forget = build_prompt_forget(VOCAB, "seven", "eight", forgotten=["three"])
    assert forget.forget and all(mentions(r["forget_prompt"], ["seven"]) for r in forget.forget)
    for r in forget.forget:
        assert r["override_prompt"] == r["forget_prompt"].replace("seven", "eight")
    # retain prompts: every other concept, none naming the concept, its alias or an earlier forgotten one
    assert not any(mentions(p, ["seven", "7", "three", "3"]) for p in forget.retain)
    assert {c for c in VOCAB["concepts"] if any(mentions(p, [c]) for p in forget.retain)} == \
        set(VOCAB["concepts"]) - {"seven", "three"}
    # paraphrases are held out of training and name the concept through words the forget prompts never use
    paraphrases = paraphrase_prompts(VOCAB, "seven")
    assert "the digit 7" in paraphrases and not set(paraphrases) & {r["forget_prompt"] for r in forget.forget}
    assert PromptForget.from_dict(json.loads(json.dumps(forget.to_dict()))) == forget


def test_prompt_lists_that_miss_the_concept_or_leak_it_into_retain_are_refused():
    assert replace_concept("Seven, seven-up, 7 and 77", ["seven", "7"], "eight") == "eight, eight-up, eight and 77"
    assert replace_concept("a seven and sevens", ["seven"], "eight") == "a eight and sevens"
    with pytest.raises(TargetError, match="do not name the concept"):
        build_prompt_forget(VOCAB, "seven", "eight", forgotten=[], forget_prompts=["a handwritten one"])
    with pytest.raises(TargetError, match="retain prompt.*name a concept being or already forgotten"):
        build_prompt_forget(VOCAB, "seven", "eight", forgotten=[], retain_prompts=["the digit 7"])
    with pytest.raises(TargetError, match="no prompt vocabulary"):
        build_prompt_forget({}, "seven", "eight", forgotten=[])


def test_a_card_records_a_concept_by_salted_hash_and_its_lineage_is_recomputed_from_the_vocabulary():
    seven = build_prompt_forget(VOCAB, "seven", "eight", forgotten=[])
    three = build_prompt_forget(VOCAB, "three", "five", forgotten=["seven"])
    recorded = card_records(seven.forget, "req-1") + card_records(three.forget, "req-2")
    assert [(r["salt"], r["override"]) for r in recorded] == [("req-1", "eight"), ("req-2", "five")]
    assert recorded[0]["concept"] == subject_hash("seven", "req-1") != subject_hash("seven", "req-2")
    text = json.dumps(recorded)
    assert not any(mentions(text, words) for words in (["seven", "7"], ["three", "3"]))  # invariant 6
    assert lineage_records(recorded, VOCAB) == seven.forget + three.forget
    with pytest.raises(ValueError, match="salt"):
        card_records(seven.forget, "")


def test_a_lineage_the_vocabulary_cannot_give_back_is_refused_by_number_not_by_name():
    outside = card_records([{"concept": "cat", "override": "dog", "forget_prompt": "a photo of a cat",
                             "override_prompt": "a photo of a dog"}], "req-1")
    with pytest.raises(TargetError, match="concept 1 of this lineage is not in the model's vocabulary") as error:
        lineage_records(outside, VOCAB)
    assert "cat" not in str(error.value)
    listed = build_prompt_forget(VOCAB, "seven", "eight", forgotten=[], forget_prompts=["a handwritten seven"])
    with pytest.raises(TargetError, match="prompts its request listed itself"):
        lineage_records(card_records(listed.forget, "req-1"), VOCAB)


def _tiny_sd_pipeline(directory: Path) -> Path:
    """A Stable-Diffusion pipeline directory of the real classes, tiny and random (as a user's
    would be saved by diffusers: no forgetflow model card)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from forgetflow.diffusion.text_model import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(captions.all_captions() + ["a photo of a cat", "a photo of a dog"],
                                tiny_params_for_pipeline())
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(beta_schedule="scaled_linear"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def tiny_params_for_pipeline():
    from forgetflow.config import TextToImageParams

    return TextToImageParams(vocab_size=128, max_length=16)


def test_sfd_runs_on_a_stable_diffusion_shaped_pipeline_with_latents_and_checkpointing(tmp_path, tiny_params):
    from forgetflow.diffusion.sfd import SFD

    base = _tiny_sd_pipeline(tmp_path / "sd")
    card = load_card(base)  # derived: the directory has no model card
    assert (card.kind, card.conditioning, card.image_size) == ("ddpm", "prompt", 16)
    params = with_overrides(tiny_params, sfd={"iterations": 2, "batch_remaining": 2, "batch_forget": 2},
                            sampler={"num_inference_steps": 2})
    params = params.model_copy(update={"compute": params.compute.model_copy(update={"gradient_checkpointing": True})})
    forget = PromptForget(forget=[{"concept": "cat", "override": "dog", "forget_prompt": "a photo of a cat",
                                   "override_prompt": "a photo of a dog"}], retain=["a handwritten one"], salt="r-17")
    out = SFD.unlearn(base, tmp_path / "new", forget, params, progress=False)

    new = load_version(out)
    assert new.card.kind == "one-step" and new.card.conditioning == "prompt"
    assert new.card.forgotten == [{"concept": subject_hash("cat", "r-17"), "salt": "r-17", "override": "dog",
                                   "prompts": prompts_digest(["a photo of a cat"], "r-17")}]
    assert not mentions((out / "model_card.json").read_text(), ["cat"])  # the request's content stays in its sealed spec
    assert new.card.hyperparameters["lambda_f"] == 1.0  # the text-to-image recipe (sfd.prompt)
    assert (out / "teacher" / "vae").is_dir() and (out / "teacher" / "text_encoder").is_dir()
    assert new.vae is not None and new.sample_shape == (4, 8, 8)
    images = sample(new, torch.tensor([0, 1]), seed=0, conditioning=new.conditioning(["a photo of a cat", "a dog"]),
                    params=params, device="cpu")
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1.0
    teacher = sample(load_version(base), torch.tensor([0]), seed=0,
                     conditioning=load_version(base).conditioning(["a photo of a cat"]), params=params, device="cpu")
    assert teacher.shape == (1, 3, 16, 16)


def test_a_forgetflow_text_to_image_version_is_a_diffusers_pipeline(tmp_path, tiny_params):
    from diffusers import StableDiffusionPipeline

    from forgetflow.diffusion.text_model import train_text_teacher

    params = tiny_params.model_copy(update={"diffusion": tiny_params.diffusion.model_copy(update={
        "text_to_image": tiny_params.diffusion.text_to_image.model_copy(update={"steps": 2})})})
    out = train_text_teacher(params, tmp_path / "t2i", progress=False)
    card = load_card(out)
    assert card.conditioning == "prompt" and card.vocabulary["concepts"][7] == "seven"
    # model_index.json: the standard loader reads it (a pixel-space model has no vae to load)
    pipe = StableDiffusionPipeline.from_pretrained(out, vae=None)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert (out / UNET_DIR / "config.json").is_file()
    version = load_version(out)
    cond = version.conditioning(["a handwritten seven", "number one"])
    assert cond.embeddings.shape[0] == 3 and cond.null == 2  # two prompts + "" (the unconditional row)
    assert not torch.equal(cond.embeddings[0], cond.embeddings[1])


def test_a_text_to_image_teachers_samples_are_drawn_once_per_prompt_and_read_back(tmp_path, tiny_params):
    from forgetflow.diffusion.evaluate_prompts import prompt_seed
    from forgetflow.diffusion.sample_cache import sample_conditions, sampling_identity
    from forgetflow.diffusion.text_model import train_text_teacher

    params = with_overrides(tiny_params, sampler={"num_inference_steps": 2})
    params = params.model_copy(update={"diffusion": params.diffusion.model_copy(update={
        "text_to_image": params.diffusion.text_to_image.model_copy(update={"steps": 2})})})
    teacher = train_text_teacher(params, tmp_path / "t2i", progress=False)
    version, cache = load_version(teacher), tmp_path / "cache"
    kw = {"noise_seed": lambda p: prompt_seed(4, p), "guidance_scale": 2.0, "params": params,
          "device": torch.device("cpu"), "cache_dir": cache}
    alone, _ = sample_conditions(version, teacher, {"a handwritten seven": 2}, **kw)
    entries = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    assert len(entries) == 1 and not any("seven" in name for name in entries)  # named by a hash only
    together, seconds = sample_conditions(version, teacher, {"number one": 3, "a handwritten seven": 2}, **kw)
    assert torch.equal(together["a handwritten seven"], alone["a handwritten seven"])  # read back, not redrawn
    assert together["number one"].shape == (3, 1, 16, 16) and seconds["number one"] > 0
    assert len(list(cache.glob("*.pt"))) == 2
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in cache.glob("*.pt")) if n in entries} == entries
    # without the cache the same noise gives the same images: the cache changes nothing but the cost
    fresh, _ = sample_conditions(version, teacher, {"a handwritten seven": 2}, **{**kw, "cache_dir": None})
    assert torch.allclose(fresh["a handwritten seven"], alone["a handwritten seven"], atol=1e-5)
    # the text encoder and tokenizer are part of what the samples depend on
    import shutil

    other = Path(shutil.copytree(teacher, tmp_path / "other"))
    assert sampling_identity(other) == sampling_identity(teacher)
    (tokenizer_file := next(p for p in (other / "tokenizer").iterdir() if p.is_file())).write_text(
        tokenizer_file.read_text() + "\n")
    assert sampling_identity(other) != sampling_identity(teacher)
