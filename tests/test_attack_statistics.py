"""Exact rate statistics, attack gates that fail closed, attack budgets refused at load, and
evaluation seeds that no tuning step ever uses (issue 29)."""
import itertools

import pytest
from scipy.stats import binomtest

from forgetflow.config import ParamsError, load_params
from forgetflow.gates import Gate, all_passed, attack_gates
from forgetflow.llm.corpus import CORPUS_QUESTIONS, PARAPHRASES, SYNTH_QUESTIONS, TEMPLATE_SPLITS
from forgetflow.stats import clopper_pearson, min_trials, rate_record, upper_bound


def test_exact_bounds_against_known_values():
    assert upper_bound(0, 16) == pytest.approx(1 - 0.05 ** (1 / 16), abs=1e-9)  # 0.171, the number
    assert upper_bound(0, 16) == pytest.approx(0.1707, abs=1e-4)
    assert clopper_pearson(0, 16)[1] == pytest.approx(1 - 0.025 ** (1 / 16), abs=1e-9)
    assert clopper_pearson(16, 16) == (pytest.approx(0.025 ** (1 / 16), abs=1e-9), 1.0)
    for k, n in [(1, 10), (5, 10), (3, 200), (0, 1), (7, 7)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert clopper_pearson(k, n) == (pytest.approx(ci.low, abs=1e-9), pytest.approx(ci.high, abs=1e-9))
    assert clopper_pearson(5, 10) == (pytest.approx(0.1871, abs=1e-4), pytest.approx(0.8129, abs=1e-4))
    assert upper_bound(3, 200) > 3 / 200


def test_trials_needed_to_pass_a_threshold():
    assert min_trials(0.02) == 149  # 1 - 0.05^(1/149) = 0.0199 <= 0.02 < 0.0201 = 1 - 0.05^(1/148)
    assert upper_bound(0, 149) <= 0.02 < upper_bound(0, 148)
    with pytest.raises(ValueError):
        min_trials(0.0)


def test_a_record_carries_n_and_its_bounds():
    r = rate_record(2, 40, values=16)
    assert r["rate"] == 0.05 and r["n"] == 40 and r["hits"] == 2 and r["values"] == 16
    assert r["interval95"][0] < 0.05 < r["upper95"] < r["interval95"][1]
    empty = rate_record(0, 0, reason="the judge cannot name it")
    assert empty["rate"] is None and empty["upper95"] is None and empty["reason"] == "the judge cannot name it"
    with pytest.raises(ValueError):
        rate_record(5, 4)


def test_gates_fail_closed_on_a_metric_that_could_not_be_computed():
    gate = Gate("forget_rate", None, 0.02, "max", "the judge has no class for the concept")
    assert not gate.passed and gate.margin == float("-inf")
    assert gate.to_dict()["passed"] is False and gate.to_dict()["reason"]
    assert not all_passed([Gate("other", 0.0, 0.02, "max"), gate])


def test_attack_gates_compare_the_upper_bound_and_fail_closed():
    attacks = {"sampled": rate_record(0, 300), "few_shot": rate_record(0, 16), "quantized": rate_record(4, 300),
               "relearning": rate_record(0, 0, reason="no kept rows to fine-tune on")}
    gates = {g.name: g for g in attack_gates(attacks, {"sampled": 0.02, "few_shot": 0.02, "quantized": 0.02,
                                                       "relearning": 0.02, "prefilled": 0.02})}
    assert gates["attack:sampled"].passed and gates["attack:sampled"].value == pytest.approx(upper_bound(0, 300))
    assert not gates["attack:quantized"].passed  # rate 0.013 but its bound 0.030 is above 0.02
    undecidable = gates["attack:few_shot"]
    assert not undecidable.passed and "undecidable" in undecidable.reason and "149" in undecidable.reason
    assert not gates["attack:relearning"].passed and gates["attack:relearning"].reason == "no kept rows to fine-tune on"
    assert not gates["attack:prefilled"].passed and "not run" in gates["attack:prefilled"].reason


@pytest.mark.parametrize("yaml_text, field", [
    ("llm:\n  attacks:\n    sampled: {samples: 0}\n", "llm.attacks.sampled.samples"),
    ("llm:\n  attacks:\n    relearning: {lr: -1}\n", "llm.attacks.relearning.lr"),
    ("llm:\n  attacks:\n    quantize_bits: [8, 1]\n", "llm.attacks"),
    ("llm:\n  gates:\n    attacks: {sampled: 1.5}\n", "llm.gates"),
    ("llm:\n  gates:\n    attacks: {telepathy: 0.02}\n", "llm.gates"),
    ("diffusion:\n  attacks:\n    embedding_search: {restarts: 0}\n", "diffusion.attacks.embedding_search.restarts"),
    ("diffusion:\n  gates:\n    attacks: {relearning: 0}\n", "diffusion.gates"),
])
def test_attack_budgets_and_thresholds_out_of_range_are_refused_at_load(tmp_path, yaml_text, field):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(ParamsError, match=field.replace(".", r"\.")):
        load_params(bad)


@pytest.mark.parametrize("preset", [None, "tiny", "stable-diffusion"])
def test_evaluation_seeds_are_never_tuning_seeds(preset):
    """Calibration (where the guidance scale is tuned), evaluation, re-verification and the
    attacks draw their diffusion noise from disjoint seed ranges (class c of seed s: s*K + c)."""
    d = load_params(preset=preset).diffusion
    k = d.model.num_classes
    ranges = {"calibrate": d.calibrate.seed, "evaluate": d.evaluate.seed, "reverify": d.evaluate.seed + 1,
              "attacks": d.attacks.seed}
    noise = {name: {s * k + c for c in range(k)} for name, s in ranges.items()}
    for (a, x), (b, y) in itertools.combinations(noise.items(), 2):
        assert not x & y, f"{a} and {b} share noise seeds"
    assert d.sfd.seed not in {s for seeds in noise.values() for s in seeds}


def test_evaluation_wordings_are_never_tuning_or_training_wordings():
    """The LLM's held-out attacks ask in wordings no training row, probe or calibration used."""
    splits = {name: set(idx) for name, idx in TEMPLATE_SPLITS.items()}
    for a, b in itertools.combinations(splits, 2):
        assert not splits[a] & splits[b], f"{a} and {b} share corpus wordings"
    for field, wordings in PARAPHRASES.items():
        seen = {q for q, _ in CORPUS_QUESTIONS[field]} | set(SYNTH_QUESTIONS[field])
        assert not set(wordings) & seen, f"a {field} paraphrase is also a training or probe wording"
    p = load_params().llm
    assert p.attacks.seed not in {p.unlearn.seed, p.synthesize.seed, p.finetune.seed, p.corpus.seed}
