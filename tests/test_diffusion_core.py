"""Diffusion core: data, noise-level mapping, artifact format, judge, sampler, SFD loop mechanics
(checkpoint resume, variants, chaining). Real small models, CPU; about a minute."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from forgetflow.checkpoints import CheckpointSink, LocalCheckpointSink
from forgetflow.config import GateParams, SFDFromOneStepParams
from forgetflow.diffusion.artifact import (ArtifactError, copy_teacher, load_version, new_scheduler, save_version,
                                          teacher_dir)
from forgetflow.diffusion.calibrate import diffusion_gates
from forgetflow.diffusion.conditioning import ClassConditioning
from forgetflow.diffusion.data import load_digits_split
from forgetflow.diffusion.evaluate import evaluate_version, frechet_distance
from forgetflow.diffusion.judge import accuracy, load_judge
from forgetflow.diffusion.methods import DIFFUSION_METHODS, get_method
from forgetflow.diffusion.sample_cache import sample_classes
from forgetflow.diffusion.sampling import nfe, sample, t_for_sigma
from forgetflow.diffusion.sfd import RANDOM_OVERRIDE, SFD, ConditionPlan, _Batcher, train_sfd
from forgetflow.families.diffusion import resolve_overrides
from forgetflow.request import RequestError, parse_request
from tests.diffusion_fixtures import judge_dir, tiny_params, untrained_version, with_overrides  # noqa: F401

# SFD runs on an untrained teacher with tiny batches: the loop mechanics, not the quality.
# On the CPU, where kernels are deterministic, so that a resumed run can be compared bit for bit.
CPU = torch.device("cpu")
LOOP = {"batch_remaining": 4, "batch_forget": 2, "iterations": 6, "checkpoint_every": 2, "log_every": 2,
        "ema_warmup_iterations": 1, "sid_iterations": 2, "iterations_per_extra_target": 1,
        "from_one_step": SFDFromOneStepParams(iterations=4, lambda_f=0.1, batch_remaining=4,
                                              iterations_per_extra_target=3)}


@pytest.fixture(scope="module")
def loop_params(tiny_params):
    return with_overrides(tiny_params, sfd=LOOP)


@pytest.fixture(scope="module")
def one_step_version(untrained_version, loop_params, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-step")
    return train_sfd(untrained_version, out, [(7, 8)], loop_params, device=CPU, progress=False)


def test_digits_split_shapes_range_and_stratification():
    train_x, train_y = load_digits_split("train", 16)
    test_x, test_y = load_digits_split("test", 16)
    assert train_x.shape == (1437, 1, 16, 16) and test_x.shape == (360, 1, 16, 16)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert train_x.min() >= -1.0 and train_x.max() <= 1.0 and train_x.min() == -1.0
    assert torch.bincount(test_y, minlength=10).min() >= 35  # every class held out ~20%
    again_x, again_y = load_digits_split("test", 16)
    assert torch.equal(again_x, test_x) and torch.equal(again_y, test_y)
    assert load_digits_split("train", 8)[0].shape[-1] == 8
    with pytest.raises(ValueError):
        load_digits_split("validation", 16)


def test_t_for_sigma_maps_noise_levels_not_indices(tiny_params):
    linear = new_scheduler(tiny_params.diffusion.model)
    assert t_for_sigma(linear, 2.5) == 440
    assert (t_for_sigma(linear, 0.137), t_for_sigma(linear, 13.1)) == (38, 712)
    cosine = new_scheduler(tiny_params.diffusion.model.model_copy(update={"beta_schedule": "squaredcos_cap_v2"}))
    assert t_for_sigma(cosine, 2.5) not in range(430, 451)
    assert abs(t_for_sigma(cosine, 2.5) - 755) <= 15


def test_artifact_round_trip_and_clear_errors(untrained_version, one_step_version, tmp_path):
    version = load_version(untrained_version)
    copy_dir = save_version(tmp_path / "copy", version)
    again = load_version(copy_dir)
    assert again.card == version.card and again.generator is None
    for key, value in version.score.state_dict().items():
        assert torch.equal(value, again.score.state_dict()[key])

    one_step = load_version(one_step_version)
    assert one_step.card.kind == "one-step" and one_step.generator is not None
    assert one_step.card.forgotten == [{"forget_class": 7, "override_class": 8}]
    assert one_step.card.t_init == 440 and one_step.card.guidance_scale == 1.0

    with pytest.raises(ArtifactError, match="not found"):
        load_version(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(copy_dir, broken)
    (broken / "score" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="diffusion_pytorch_model.safetensors"):
        load_version(broken)
    (broken / "model_card.json").unlink()
    with pytest.raises(ArtifactError, match="model_card.json"):
        load_version(broken)
    no_generator = tmp_path / "no-generator"
    shutil.copytree(one_step_version, no_generator)
    shutil.rmtree(no_generator / "generator")
    with pytest.raises(ArtifactError, match="generator"):
        load_version(no_generator)


def test_judge_reaches_97_percent_on_the_test_split(judge_dir):
    card = json.loads((judge_dir / "judge_card.json").read_text())
    assert card["test_accuracy"] >= 0.97
    judge = load_judge(judge_dir)
    images, labels = load_digits_split("test", card["image_size"])
    assert accuracy(judge, images, labels) == pytest.approx(card["test_accuracy"])
    assert judge.features(images[:5]).shape == (5, card["feature_dim"])
    assert torch.allclose(judge.predict_proba(images[:5]).sum(dim=1), torch.ones(5))


def test_sampling_is_deterministic_in_the_seed(untrained_version, one_step_version, tiny_params):
    labels = torch.tensor([0, 3, 7, 9])
    for directory in (untrained_version, one_step_version):
        version = load_version(directory)
        first = sample(version, labels, seed=5, params=tiny_params, device="cpu")
        assert first.shape == (4, 1, 16, 16) and first.min() >= -1 and first.max() <= 1
        assert torch.equal(first, sample(version, labels, seed=5, params=tiny_params, device="cpu"))
        assert not torch.equal(first, sample(version, labels, seed=6, params=tiny_params, device="cpu"))


def test_a_classs_samples_do_not_depend_on_the_other_classes_asked_for(untrained_version, tiny_params):
    version = load_version(untrained_version)
    kw = {"seed": 3, "guidance_scale": 2.0, "params": with_overrides(tiny_params, sampler={"num_inference_steps": 2}),
          "device": CPU}
    alone, labels, _ = sample_classes(version, untrained_version, {7: 3}, **kw)
    together, labels_together, _ = sample_classes(version, untrained_version, {2: 4, 7: 3}, **kw)
    assert labels.tolist() == [7] * 3 and labels_together.tolist() == [2] * 4 + [7] * 3
    assert torch.allclose(alone, together[4:], atol=1e-5)


def test_a_teachers_evaluation_samples_are_drawn_once_and_read_back(untrained_version, judge_dir, tiny_params,
                                                                   tmp_path):
    params = with_overrides(tiny_params, sampler={"num_inference_steps": 2},
                            evaluate={"forget_samples": 6, "samples_per_remaining_class": 4})
    cache = tmp_path / "cache"
    first = evaluate_version(untrained_version, judge_dir, [(7, 8)], params, seed=1, cache_dir=cache, device=CPU)
    entries = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    assert len(entries) == 10  # one per class
    again = evaluate_version(untrained_version, judge_dir, [(7, 8)], params, seed=1, cache_dir=cache, device=CPU)
    assert again == first  # the images, and the seconds their drawing took, read back
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == entries  # nothing drawn again
    # the lineage's copy of the teacher inside a one-step version is the same teacher
    teacher_copy = copy_teacher(untrained_version, tmp_path / "one-step")
    assert evaluate_version(teacher_copy, judge_dir, [(7, 8)], params, seed=1, cache_dir=cache, device=CPU) == again
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == entries
    # another request's forget class: the classes asked for as often as before come from the cache
    other = evaluate_version(untrained_version, judge_dir, [(3, 4)], params, seed=1, cache_dir=cache, device=CPU)
    assert other["per_class_accuracy"]["5"] == first["per_class_accuracy"]["5"]
    assert len(list(cache.glob("*.pt"))) == 12  # 3 at 6 samples and 7 at 4 are new
    # a half-written entry (a killed run) is drawn again, not loaded
    victim = cache / next(iter(entries))
    victim.write_bytes(b"half a file")
    assert evaluate_version(untrained_version, judge_dir, [(7, 8)], params, seed=1, cache_dir=cache,
                            device=CPU)["per_class_accuracy"] == first["per_class_accuracy"]
    assert torch.load(victim, weights_only=True)["images"].shape[1:] == (1, 16, 16)
    # a different seed is a different set of samples
    assert evaluate_version(untrained_version, judge_dir, [(7, 8)], params, seed=2, cache_dir=cache,
                            device=CPU) != first


def test_nfe_of_one_step_and_ddim(untrained_version, one_step_version, tiny_params):
    one_step, ddpm = load_version(one_step_version), load_version(untrained_version)
    assert nfe(one_step, None, tiny_params) == 1
    assert nfe(one_step, 2.0, tiny_params) == 2
    assert nfe(ddpm, 1.0, tiny_params) == tiny_params.diffusion.sampler.num_inference_steps
    assert nfe(ddpm, None, tiny_params) == 2 * tiny_params.diffusion.sampler.num_inference_steps


class _Interrupted(RuntimeError):
    pass


class _CrashingSink(LocalCheckpointSink):
    """Saves like LocalCheckpointSink, then "loses the machine" right after step `crash_at`."""

    def __init__(self, root, crash_at: int):
        super().__init__(root)
        self.crash_at = crash_at

    def save(self, step, local_dir):
        super().save(step, local_dir)
        if step == self.crash_at:
            raise _Interrupted(step)


def test_checkpoint_resume_continues_the_run_exactly(untrained_version, loop_params, tmp_path):
    uninterrupted_dir = train_sfd(untrained_version, tmp_path / "a", [(7, 8)], loop_params, device=CPU, progress=False)
    uninterrupted = load_version(uninterrupted_dir)

    sink = _CrashingSink(tmp_path / "checkpoints", crash_at=4)
    assert isinstance(sink, CheckpointSink)
    with pytest.raises(_Interrupted):
        train_sfd(untrained_version, tmp_path / "b", [(7, 8)], loop_params, checkpoints=sink, device=CPU,
                  progress=False)
    assert sink.latest()[0] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

    resumed_dir = train_sfd(untrained_version, tmp_path / "b", [(7, 8)], loop_params,
                            checkpoints=LocalCheckpointSink(tmp_path / "checkpoints"), device=CPU, progress=False)
    log = json.loads((resumed_dir / "training_log.json").read_text())
    assert log["resumed_from"] == 4 and log["iterations"] == 6
    assert [row["iteration"] for row in log["history"]] == [2, 4, 6]
    resumed = load_version(resumed_dir)
    for name in ("generator", "score"):
        expected = getattr(uninterrupted, name).state_dict()
        for key, value in getattr(resumed, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key} differs after resume"
    reference = json.loads((uninterrupted_dir / "training_log.json").read_text())
    assert log["history"] == reference["history"]

    with pytest.raises(ValueError, match="belongs to run"):
        train_sfd(untrained_version, tmp_path / "c", [(3, 5)], loop_params,
                  checkpoints=LocalCheckpointSink(tmp_path / "checkpoints"), device=CPU, progress=False)


def test_chained_request_keeps_the_union_and_the_lineage_teacher(untrained_version, one_step_version, loop_params,
                                                                  tmp_path):
    chained = train_sfd(one_step_version, tmp_path / "chained", [(3, 5)], loop_params, device=CPU, progress=False)
    card = load_version(chained).card
    assert card.hyperparameters["iterations"] == 4  # from a one-step base: sfd.from_one_step's short stage
    assert sorted(card.forgotten_pairs) == [(3, 5), (7, 8)]
    # the lineage's class stays in the forget term, so it counts: two targets, 3 more iterations
    assert json.loads((chained / "training_log.json").read_text())["iterations"] == 4 + 3
    # every version of the lineage carries the pretrained DDPM, bit for bit, as its teacher
    assert teacher_dir(untrained_version) == untrained_version
    root = load_version(untrained_version)
    for version_dir in (one_step_version, chained):
        teacher = load_version(teacher_dir(version_dir))
        assert teacher.card == root.card and teacher.generator is None
        assert all(torch.equal(v, root.score.state_dict()[k]) for k, v in teacher.score.state_dict().items())
    orphan = tmp_path / "orphan"
    shutil.copytree(chained, orphan)
    shutil.rmtree(orphan / "teacher")
    with pytest.raises(ArtifactError, match="no teacher/"):
        train_sfd(orphan, tmp_path / "x", [(1, 2)], loop_params, device=CPU, progress=False)
    assert json.loads((chained / "training_log.json").read_text())["keep"] == [0, 1, 2, 4, 5, 6, 8, 9]
    with pytest.raises(ValueError, match="itself forgotten"):
        train_sfd(one_step_version, tmp_path / "bad", [(2, 7)], loop_params, device=CPU, progress=False)


def test_method_registry_and_two_stage_variant(untrained_version, loop_params, tmp_path):
    assert {"sfd", "sfd-two-stage"} <= set(DIFFUSION_METHODS)
    with pytest.raises(ValueError, match="sfd-two-stage"):
        get_method("nope")
    out = get_method("sfd-two-stage").unlearn(untrained_version, tmp_path / "two", [(7, 8), (3, 4)], loop_params,
                                              device=CPU, progress=False)
    log = json.loads((out / "training_log.json").read_text())  # two targets: one extra forgetting iteration
    assert log["iterations"] == LOOP["sid_iterations"] + LOOP["iterations"] + LOOP["iterations_per_extra_target"]
    assert {row["stage"] for row in log["history"]} == {0, 1}
    assert load_version(out).card.method == "sfd-two-stage"


def test_sid_only_and_esd_peers(untrained_version, one_step_version, loop_params, tmp_path):
    sid = get_method("sid").stages(loop_params.diffusion.sfd, 3)
    assert [(s.iterations, s.forget, s.objective.lambda_f) for s in sid] == [(LOOP["iterations"], False, 0.0)]
    distilled = load_version(get_method("sid").unlearn(untrained_version, tmp_path / "sid", [(7, 8)], loop_params,
                                                       device=CPU, progress=False))
    assert distilled.card.kind == "one-step" and distilled.card.forgotten_pairs == []  # distils, forgets nothing
    params = with_overrides(loop_params, esd={"iterations": 3, "batch_size": 4})
    out = get_method("esd").unlearn(untrained_version, tmp_path / "esd", [(7, 8)], params, device=CPU, progress=False)
    esd = load_version(out)
    assert esd.card.kind == "ddpm" and esd.card.method == "esd" and esd.generator is None
    assert esd.card.forgotten_pairs == [(7, RANDOM_OVERRIDE)]  # the class becomes whatever it is guided to
    teacher = load_version(untrained_version)
    moved = [not torch.equal(a, b) for a, b in zip(esd.score.parameters(), teacher.score.parameters())]
    assert any(moved)
    with pytest.raises(ArtifactError, match="one-step"):
        get_method("esd").unlearn(one_step_version, tmp_path / "no", [(3, 4)], params, device=CPU, progress=False)


def test_sfd_losses_follow_the_paper():
    sfd = SFD(alpha=1.2, lambda_f=0.5, omega_min=1e-5)
    g = torch.Generator().manual_seed(0)
    y_r, y_f, x_g = (torch.randn(4, 1, 16, 16, generator=g) for _ in range(3))
    omega = (y_r - x_g).abs().mean(dim=(1, 2, 3))
    expected = ((y_r - y_f) * ((y_r - x_g) - 1.2 * (y_r - y_f))).sum(dim=(1, 2, 3)) / omega
    assert torch.allclose(sfd.sid_loss(y_r, y_f, x_g), expected)
    mask = torch.tensor([False, False, True, True])
    assert torch.allclose(sfd.generator_loss(y_r, y_f, x_g, mask), expected[:2].mean() + 0.5 * expected[2:].mean())
    assert sfd.generator_loss(y_r, y_r, x_g, mask) == 0  # teacher == fake score: nothing to move
    eps = torch.randn(4, 1, 16, 16, generator=g)
    assert sfd.fake_score_loss(eps, eps, mask) == 0
    x_g.requires_grad_(True)
    sfd.sid_loss(y_r, y_f, x_g).sum().backward()  # omega is stop-gradient: only the numerator's x_g term
    assert torch.allclose(x_g.grad, -(y_r - y_f) / omega.view(-1, 1, 1, 1))


def test_frechet_distance_and_gates():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 8, rel=1e-6)
    base = {"remaining_class_accuracy": 0.99, "remaining_fd": 40.0, "nfe": 50}
    new = {"unlearning_accuracy": 1.0, "override_fidelity": 0.95, "remaining_class_accuracy": 0.97,
           "remaining_fd": 45.0, "nfe": 1}
    gates = {gate.name: gate for gate in diffusion_gates(base, new, GateParams())}
    assert all(gate.passed for gate in gates.values())
    assert gates["remaining_accuracy_drop"].value == pytest.approx(0.02)
    assert gates["nfe_reduction"].value == pytest.approx(50.0)
    worse = diffusion_gates(base, {**new, "remaining_fd": 60.0}, GateParams())
    assert [gate.name for gate in worse if not gate.passed] == ["remaining_fd_ratio"]


def test_random_override_is_opt_in_per_request_and_draws_remaining_classes(loop_params):
    request = parse_request({"request_id": "r", "model": "m",
                             "target": {"kind": "diffusion-class", "classes": [7, 3], "override": {3: 5},
                                        "override_rule": "random"}})
    card = {"num_classes": 10}
    assert resolve_overrides(request.target.classes, request.target.override, card,
                             request.target.override_rule) == [(7, RANDOM_OVERRIDE), (3, 5)]
    assert resolve_overrides([7], {}, card, "next") == [(7, 8)]
    with pytest.raises(RequestError, match="override_rule"):
        parse_request({"request_id": "r", "model": "m",
                       "target": {"kind": "diffusion-class", "classes": [7], "override_rule": "sometimes"}})
    sfd = loop_params.diffusion.sfd.model_copy(update={"batch_forget": 64})
    pairs = {7: RANDOM_OVERRIDE, 3: 5}
    plan = ConditionPlan(ClassConditioning(10), [c for c in range(10) if c not in pairs], pairs, list(range(10)), [], {})
    batcher = _Batcher(plan, sfd, (38, 712), (1, 16, 16), torch.Generator().manual_seed(0), CPU)
    c, c_teacher, forget = batcher.labels(forget=True)
    teacher_7 = c_teacher[forget & (c == 7)]
    assert len(set(teacher_7.tolist())) > 1 and not set(teacher_7.tolist()) & {7, 3}  # random, never forgotten
    assert set(c_teacher[forget & (c == 3)].tolist()) == {5}
