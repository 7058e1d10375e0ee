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
