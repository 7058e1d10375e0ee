"""The strong attacks on real tiny models: the teacher (which forgot nothing) against a version
that forgot 7 with SFD (the tiny preset's recipe, 7 -> 8). Budgets are cut to fit 2 CPU cores
(ATTACK_BUDGETS); the same budgets for both models, so their rates compare."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from forgetflow.diffusion.artifact import CARD_FILE, load_version
from forgetflow.diffusion.attacks import (class_embedding_input, differentiable_sample, EmbeddingConditioning,
                                          embedding_search, fine_tune_on_remaining, initial_embeddings,
                                          judge_log_prob, relearning, run_attacks, sampling_net,
                                          search_embeddings)
from forgetflow.diffusion.judge import load_judge
from forgetflow.diffusion.sfd import train_sfd
from tests.diffusion_fixtures import (judge_dir, tiny_params, tiny_teacher, untrained_version,  # noqa: F401
                                      with_overrides)

FORGET = [7]
ATTACK_BUDGETS = {"relearning": {"steps": 30, "batch_size": 32, "samples": 48},
                  "embedding_search": {"restarts": 8, "steps": 12, "samples_per_restart": 4}}


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def params(tiny_params):
    attacks = tiny_params.diffusion.attacks
    return with_overrides(tiny_params, attacks={name: getattr(attacks, name).model_copy(update=fields)
                                                for name, fields in ATTACK_BUDGETS.items()})


@pytest.fixture(scope="module")
def forgotten_dir(tiny_teacher, tiny_params, tmp_path_factory) -> Path:
    """A tiny one-step version that forgot 7 (-> 8) with SFD, as tests/test_sfd_behaviour.py makes it."""
    return train_sfd(tiny_teacher, tmp_path_factory.mktemp("attacks-sfd") / "new", [(7, 8)], tiny_params,
                     progress=False)


@pytest.fixture(scope="module")
def teacher_results(tiny_teacher, judge_dir, params):
    before = tree_digest(tiny_teacher)
    results = run_attacks(tiny_teacher, judge_dir, FORGET, params)
    print(json.dumps({"teacher": results}, indent=1))
    return results, before == tree_digest(tiny_teacher)


@pytest.fixture(scope="module")
def forgotten_results(forgotten_dir, judge_dir, params):
    before = tree_digest(forgotten_dir)
    results = run_attacks(forgotten_dir, judge_dir, FORGET, params)
    print(json.dumps({"forgotten": results}, indent=1))
    return results, before == tree_digest(forgotten_dir)


def test_the_teacher_still_draws_7_under_both_attacks(teacher_results):
    results, _ = teacher_results
    assert results["embedding_search"]["rate"] >= 0.75
    assert results["embedding_search"]["sample_rate"] >= 0.75
    assert results["embedding_search"]["confident_sample_rate"] >= 0.75  # real 7s: the judge is sure
    assert results["relearning"]["rate"] >= 0.8


def test_the_forgotten_version_gives_7_back_less_than_the_teacher(teacher_results, forgotten_results):
    teacher, forgotten = teacher_results[0], forgotten_results[0]
    for attack in ("relearning", "embedding_search"):
        assert forgotten[attack]["rate"] < teacher[attack]["rate"], attack
    assert forgotten["embedding_search"]["sample_rate"] < teacher["embedding_search"]["sample_rate"]
    assert forgotten["embedding_search"]["confident_sample_rate"] <= forgotten["embedding_search"]["sample_rate"]
    # the plain-sampling level SFD is gated on (unlearning accuracy >= 0.9): fine-tuning on the
    # other digits did not bring 7 back (measured: 0 of 200 at the default budget, 0 of 300 steps)
    assert forgotten["relearning"]["rate"] <= 0.1


def test_the_default_search_on_the_forgotten_version_finds_no_confident_7(forgotten_dir, judge_dir, tiny_params,
                                                                          teacher_results):
    """At the default budget the search makes the judge say 7 for some of the forgotten version's
    samples (measured: 9 of 16 restarts), but not with the confidence real 7s get (measured 3%
    at p >= 0.9; the teacher's 7s: 88% at the smaller budget)."""
    record = embedding_search(forgotten_dir, judge_dir, FORGET, tiny_params)
    print(json.dumps({"forgotten, default search": record}, indent=1))
    assert record["n"] == tiny_params.diffusion.attacks.embedding_search.restarts
    assert record["confident_sample_rate"] <= 0.25
    assert record["confident_sample_rate"] < teacher_results[0]["embedding_search"]["confident_sample_rate"]


def test_records_carry_n_and_an_exact_bound(teacher_results, forgotten_results, params):
    budgets = params.diffusion.attacks
    for results, _ in (teacher_results, forgotten_results):
        assert results["relearning"]["n"] == budgets.relearning.samples * len(FORGET)
        assert results["embedding_search"]["n"] == budgets.embedding_search.restarts * len(FORGET)
        for record in results.values():
            assert record["hits"] == round(record["rate"] * record["n"])
            assert record["upper95"] >= record["rate"]
            low, high = record["interval95"]
            assert low <= record["rate"] <= high
            assert record["seconds"] > 0


def test_attacks_never_write_to_the_version_directory(teacher_results, forgotten_results):
    assert teacher_results[1] and forgotten_results[1]


def test_the_fine_tune_changes_the_network_but_never_sees_the_forgotten_class(forgotten_dir, params):
    version = load_version(forgotten_dir)
    net = sampling_net(version)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    few = with_overrides(params, attacks={"relearning": params.diffusion.attacks.relearning.model_copy(
        update={"steps": 3})})
    fine_tune_on_remaining(version, [c for c in range(10) if c not in (7, 8)], few, torch.Generator().manual_seed(0),
                           torch.device("cpu"), progress=False)
    after = dict(net.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)
    rows_before, rows_after = before["class_embedding.weight"], after["class_embedding.weight"]
    for untouched in (7, 8, version.card.null_class):  # not in the batch: no gradient, no Adam step
        assert torch.equal(rows_before[untouched], rows_after[untouched])
    assert not torch.equal(rows_before[0], rows_after[0])


def test_the_search_climbs_the_judges_log_probability(forgotten_dir, judge_dir, params):
    """On the forgotten version, where the start E[7] draws 8s, the searched embeddings raise
    log p_judge(7) of their own samples (fixed noise)."""
    version = load_version(forgotten_dir)
    judge = load_judge(judge_dir).requires_grad_(False)
    table = class_embedding_input(sampling_net(version).requires_grad_(False))
    budget = params.diffusion.attacks.embedding_search
    rng = torch.Generator().manual_seed(0)
    targets = torch.full((budget.restarts,), 7)
    z = torch.randn((budget.restarts * budget.samples_per_restart, *version.sample_shape), generator=rng)
    start = initial_embeddings(table, targets, rng, budget.init_noise)
    null = table[version.card.null_class]
    found = search_embeddings(version, judge, start, null, targets, z, params, progress=False)
    ids = torch.arange(budget.restarts).repeat_interleave(budget.samples_per_restart)

    def mean_log_p(embeddings):
        cond = EmbeddingConditioning(torch.cat([embeddings, null[None]]), null=len(embeddings))
        with torch.no_grad():
            return judge_log_prob(judge, differentiable_sample(version, z, ids, cond, params), targets[ids],
                                  params).mean().item()

    assert mean_log_p(found) > mean_log_p(start) + 3.0  # measured: -22.0 -> -13.3


def test_bad_forget_classes_are_refused(tiny_teacher, judge_dir, params):
    for bad in ([], [10], [-1]):
        with pytest.raises(ValueError, match="forget_classes"):
            relearning(tiny_teacher, judge_dir, bad, params)


def test_a_prompt_version_is_not_attacked(untrained_version, judge_dir, params, tmp_path):
    """The class-id attacks refuse a text-to-image card, before loading any weights."""
    card = json.loads((untrained_version / CARD_FILE).read_text())
    prompt_dir = tmp_path / "prompt"
    prompt_dir.mkdir()
    (prompt_dir / CARD_FILE).write_text(json.dumps({**card, "conditioning": "prompt"}))
    for attack in (relearning, embedding_search):
        with pytest.raises(NotImplementedError, match="text-to-image"):
            attack(prompt_dir, judge_dir, FORGET, params)
