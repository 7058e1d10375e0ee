"""SFD really forgets: a tiny digits teacher is taught to redraw 7 as 8, data-free, while the
other digits stay as they were. The pipeline of a request: base metrics -> SFD -> guidance
calibration -> held-out evaluation. About 4-5 minutes on 2 idle CPU cores (teacher ~2.5)."""
from __future__ import annotations

import json

import pytest

from forgetflow.diffusion.artifact import load_version
from forgetflow.diffusion.calibrate import calibrate_guidance, diffusion_gates
from forgetflow.diffusion.evaluate import evaluate_version, save_comparison_grid
from forgetflow.diffusion.sfd import RANDOM_OVERRIDE, train_sfd
from tests.diffusion_fixtures import judge_dir, tiny_params, tiny_teacher  # noqa: F401

PAIRS = [(7, 8)]


@pytest.fixture(scope="module")
def base_metrics(tiny_teacher, judge_dir, tiny_params):
    return evaluate_version(tiny_teacher, judge_dir, PAIRS, tiny_params, seed=tiny_params.diffusion.evaluate.seed)


@pytest.fixture(scope="module")
def forgotten(tiny_teacher, judge_dir, tiny_params, base_metrics, tmp_path_factory):
    """(version dir, chosen guidance, calibration curve, held-out metrics) after SFD 7 -> 8."""
    new_dir = train_sfd(tiny_teacher, tmp_path_factory.mktemp("sfd") / "new", PAIRS, tiny_params, progress=False)
    scale, curve = calibrate_guidance(new_dir, judge_dir, PAIRS, tiny_params, base_metrics)
    metrics = evaluate_version(new_dir, judge_dir, PAIRS, tiny_params, seed=tiny_params.diffusion.evaluate.seed,
                               guidance_scale=scale)
    print(json.dumps({"base": base_metrics, "new": metrics, "curve": curve}, indent=1))
    return new_dir, scale, curve, metrics


def test_base_draws_the_class_to_forget(base_metrics):
    assert base_metrics["per_class_accuracy"]["7"] > 0.8
    assert base_metrics["unlearning_accuracy"] < 0.2
    assert base_metrics["remaining_class_accuracy"] > 0.9


def test_sfd_redraws_7_as_8_and_keeps_the_rest(forgotten, base_metrics):
    _, scale, _, new = forgotten
    assert new["unlearning_accuracy"] >= 0.9
    assert new["override_fidelity"] >= 0.8
    assert base_metrics["remaining_class_accuracy"] - new["remaining_class_accuracy"] <= 0.05
    assert new["remaining_fd"] <= 1.5 * base_metrics["remaining_fd"]
    assert new["nfe"] == (1 if scale == 1.0 else 2)
    assert new["seconds_per_1000_samples"] * 10 < base_metrics["seconds_per_1000_samples"]


def test_forget_row_is_real_digits_not_grey_blobs(forgotten):
    """UA alone is fooled by mode collapse (sfd.md): the forget row must be confident digits."""
    assert forgotten[3]["forget_confidence"] > 0.7


def test_version_card_calibration_curve_and_figure(forgotten, tiny_teacher, tiny_params, tmp_path):
    new_dir, scale, curve, _ = forgotten
    card = load_version(new_dir).card
    assert card.kind == "one-step" and card.method == "sfd"
    assert card.forgotten == [{"forget_class": 7, "override_class": 8}]
    assert card.hyperparameters["lambda_f"] == tiny_params.diffusion.sfd.lambda_f
    assert [row["guidance_scale"] for row in curve] == sorted(tiny_params.diffusion.calibrate.guidance_scales)
    assert scale in [row["guidance_scale"] for row in curve]
    log = json.loads((new_dir / "training_log.json").read_text())
    assert log["history"][-1]["iteration"] == tiny_params.diffusion.sfd.iterations
    png = save_comparison_grid(tiny_teacher, new_dir, tmp_path / "grid.png", tiny_params, seed=0)
    assert png.stat().st_size > 10_000


def test_a_random_override_redraws_7_as_other_digits_and_is_gated_on_realism(tiny_teacher, judge_dir, tiny_params,
                                                                             base_metrics, tmp_path):
    """Opt-in random override: each forget sample becomes some remaining digit; fidelity counts
    any remaining class, and the version must also pass the realism gates (not blobs)."""
    pairs = [(7, RANDOM_OVERRIDE)]
    new_dir = train_sfd(tiny_teacher, tmp_path / "random", pairs, tiny_params, progress=False)
    new = evaluate_version(new_dir, judge_dir, pairs, tiny_params, seed=tiny_params.diffusion.evaluate.seed)
    print(json.dumps(new, indent=1))
    assert load_version(new_dir).card.forgotten == [{"forget_class": 7, "override_class": RANDOM_OVERRIDE}]
    assert new["random_override"] and new["unlearning_accuracy"] >= 0.9
    assert new["override_fidelity"] == pytest.approx(new["unlearning_accuracy"])  # one forgotten class
    gates = {g.name: g for g in diffusion_gates(base_metrics, new, tiny_params.diffusion.gates)}
    assert gates["forget_confidence"].value == new["forget_confidence"]
    assert gates["forget_fd_ratio"].value == pytest.approx(new["forget_fd"] / base_metrics["remaining_fd"])
    assert "forget_confidence" not in {g.name for g in diffusion_gates(base_metrics, base_metrics, tiny_params.diffusion.gates)}
