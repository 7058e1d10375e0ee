"""params.yaml validates, presets merge, and a bad value names its field."""
import pytest

from forgetflow.config import ParamsError, load_params


def test_project_params_and_tiny_preset():
    full, tiny = load_params(), load_params(preset="tiny")
    assert full.diffusion.sfd.lambda_f == 0.1 and full.diffusion.sfd.alpha == 1.2
    assert tiny.diffusion.sfd.iterations < full.diffusion.sfd.iterations
    assert tiny.diffusion.sfd.alpha == full.diffusion.sfd.alpha  # untouched keys are inherited


def test_bad_values_name_the_field(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("diffusion:\n  sfd:\n    alpha: lots\n")
    with pytest.raises(ParamsError, match="diffusion.sfd.alpha"):
        load_params(bad)
    bad.write_text("diffusion:\n  sfd:\n    sigma_init: 50\n")
    with pytest.raises(ParamsError, match="sigma_min < sigma_init < sigma_max"):
        load_params(bad)
    bad.write_text("diffusion:\n  sfd:\n    typo_field: 1\n")
    with pytest.raises(ParamsError, match="typo_field"):
        load_params(bad)
    with pytest.raises(ParamsError, match="unknown preset"):
        load_params(preset="huge")


def test_sfd_recipe_per_base_kind_and_conditioning():
    """Class models from a one-step base take from_one_step's lambda_f, prompt models their
    own (measured apart, params.yaml); a multi-step prompt base takes the prompt recipe."""
    sfd = load_params().diffusion.sfd
    assert sfd.for_base("ddpm").lambda_f == sfd.lambda_f
    assert sfd.for_base("one-step").lambda_f == sfd.from_one_step.lambda_f
    assert sfd.for_base("ddpm", "prompt").lambda_f == sfd.prompt.lambda_f
    one_step_prompt = sfd.for_base("one-step", "prompt")
    assert one_step_prompt.lambda_f == sfd.prompt.one_step_lambda_f != sfd.from_one_step.lambda_f
    assert one_step_prompt.iterations == sfd.from_one_step.iterations
    assert one_step_prompt.teacher_guidance_scale == sfd.prompt.teacher_guidance_scale
    # more targets (classes or concepts), a longer forgetting stage (measured in params.yaml)
    assert sfd.forget_iterations(1) == sfd.iterations < sfd.forget_iterations(5)
    one_step = sfd.for_base("one-step")
    assert one_step.forget_iterations(5) == sfd.from_one_step.iterations + 4 * sfd.from_one_step.iterations_per_extra_target
    assert one_step.forget_iterations(5) > one_step.forget_iterations(1) == sfd.from_one_step.iterations
    sd = load_params(preset="stable-diffusion").diffusion.sfd.for_base("one-step", "prompt")
    assert sd.lambda_f == 1.0 and sd.teacher_guidance_scale == 4.5  # the paper's
