"""CFG-ORPO really forgets the named customers and only them: the tiny support model (trained
here from scratch on 60 fictitious customers) is asked to forget four; their values stop
coming out under every attack (served with guidance, raw weights, adversarial system
prompts; the tiny preset's gate admits one of the 14-16 values, see params.yaml), while
held-out kept customers' values still do. Then scope all-pii on a 20-customer roster. The stages of a
request at library level: synthesize -> unlearn -> calibrate -> evaluate. About 10 minutes
on 2 idle cores."""
from __future__ import annotations

import json

import pytest

from forgetflow.families.llm import LLMFamily
from forgetflow.llm.artifact import read_card
from forgetflow.llm.corpus import make_customers
from forgetflow.llm.evalkit import roster, without_subjects
from forgetflow.llm.synthesize import read_rows, read_spec
from forgetflow.request import parse_request
from tests.llm_fixtures import llm_params, support_llm  # noqa: F401

N_FORGET = 4
ALL_PII_ROSTER = 20  # customers the all-pii test's kit lists (of the 60 the model knows): CI size


@pytest.fixture(scope="module")
def run(support_llm, llm_params, tmp_path_factory):
    family = LLMFamily()
    c = llm_params.llm.corpus
    customers = make_customers(c.customers, c.seed)
    request = parse_request({"request_id": "behaviour", "model": "support-llm-tiny", "target": {
        "kind": "llm-subjects", "subjects": [{"name": x.name} for x in customers[:N_FORGET]]}})
    work = tmp_path_factory.mktemp("cfg-orpo")
    model, kit = support_llm / "model", support_llm / "eval_kit"
    family.check_target(request, model, llm_params)
    summary = family.synthesize(request, model, kit, work / "synth", llm_params)
    family.unlearn(model, work / "synth", work / "new", llm_params, method="cfg-orpo", base_version="1",
                   checkpoints=None, progress=False)
    gamma, curve = family.calibrate(model, work / "new", work / "synth", kit, llm_params, work / "eval")
    metrics = family.evaluate(model, work / "new", work / "synth", kit, llm_params, work / "eval")
    print(json.dumps({"summary": summary, "gamma": gamma, "curve": curve, "metrics": metrics}, indent=1))
    return work, customers, summary, metrics, family.gates(metrics, llm_params)


def test_the_base_leaks_the_customers_to_forget(run):
    _, _, _, metrics, _ = run
    assert metrics["base"]["leak_rate_by_attack"]["direct"] >= 0.8
    assert metrics["base"]["retained_recall"] >= 0.8


def test_forgotten_values_stop_leaking_under_every_attack(run, llm_params):
    work, _, _, metrics, _ = run
    new = metrics["new"]
    limit = llm_params.llm.gates.leak_rate_max  # tiny preset: one value of 14-16 (see params.yaml)
    assert all(rate <= limit for rate in new["leak_rate_by_attack"].values()), new["leak_rate_by_attack"]
    # what leaked, by salted hash and field, agrees with the rates
    spec = read_spec(work / "synth")
    items = len(spec["items"])
    assert round(new["leak_rate"] * items) == len(new["leaked_values"])
    for attack, rate in new["leak_rate_by_attack"].items():
        assert round(rate * items) == sum(attack in v["attacks"] for v in new["leaked_values"]), new["leaked_values"]
    assert {v["subject"] for v in new["leaked_values"]} <= {s["hash"] for s in spec["subjects"]}
    # graded: the true values became much less likely, not merely not greedy-decoded
    assert new["value_logprob"] < metrics["base"]["value_logprob"] - 1.0


def test_kept_customers_are_still_served(run, llm_params):
    _, _, _, metrics, _ = run
    drop = metrics["base"]["retained_recall"] - metrics["new"]["retained_recall"]
    assert drop <= llm_params.llm.gates.retained_recall_drop_max, metrics


def test_training_data_was_built_without_the_forgotten_values_in_any_chosen_answer(run):
    work, customers, summary, _, _ = run
    rows = read_rows(work / "synth")
    values = [v for x in customers[:N_FORGET] for v in (x.email, x.phone, x.address, x.account)]
    assert summary["forget_rows"] > 0 and summary["retain_rows"] > 0
    assert not any(v in r["chosen"] for r in rows for v in values)
    spec = read_spec(work / "synth")
    retained = set(spec["retained"]["evaluate"]) | set(spec["retained"]["calibrate"])
    trained_on = " ".join(r["user"] for r in rows)
    assert not any(name in trained_on for name in retained)  # held-out kept customers never trained on


def test_the_version_is_an_adapter_that_names_subjects_only_by_hash(run):
    work, customers, _, _, _ = run
    card = read_card(work / "new")
    assert card.kind == "adapter" and card.parent_version == "1"
    assert len(card.forgotten) == N_FORGET
    text = (work / "new" / "model_card.json").read_text()
    assert not any(x.name in text for x in customers[:N_FORGET])


def test_every_gate_passes(run):
    *_, gates = run
    assert all(g.passed for g in gates), [g.to_dict() for g in gates if not g.passed]


@pytest.fixture(scope="module")
def all_pii_run(support_llm, llm_params, tmp_path_factory):
    """Scope all-pii (the LLM Privacy Challenge's setting): no subject named, every customer on
    the roster is probed and forgotten, and the version is served under "do not provide any
    personal data". The kit here lists the first ALL_PII_ROSTER customers (a third of the
    model's, to keep CI short); the roster, not the model, defines who is probed."""
    family = LLMFamily()
    request = parse_request({"request_id": "behaviour-all-pii", "model": "support-llm-tiny",
                             "target": {"kind": "llm-subjects", "scope": "all-pii"}})
    work = tmp_path_factory.mktemp("cfg-orpo-all-pii")
    model, full_kit = support_llm / "model", support_llm / "eval_kit"
    unlisted = {c.name for c in roster(full_kit)[ALL_PII_ROSTER:]}
    kit = without_subjects(full_kit, unlisted, work / "eval_kit")
    summary = family.synthesize(request, model, kit, work / "synth", llm_params)
    family.unlearn(model, work / "synth", work / "new", llm_params, method="cfg-orpo", base_version="1",
                   checkpoints=None, progress=False)
    family.calibrate(model, work / "new", work / "synth", kit, llm_params, work / "eval")
    metrics = family.evaluate(model, work / "new", work / "synth", kit, llm_params, work / "eval")
    print(json.dumps({"summary": summary, "metrics": metrics}, indent=1))
    return work, summary, metrics, family.gates(metrics, llm_params)


def test_all_pii_scope_forgets_everyone_on_the_roster(all_pii_run, llm_params):
    work, summary, metrics, gates = all_pii_run
    assert summary["subjects"] >= 0.9 * ALL_PII_ROSTER and summary["retain_rows"] == 0
    assert read_card(work / "new").positive_condition == llm_params.llm.conditions.positive_all_pii
    assert metrics["base"]["leak_rate_by_attack"]["direct"] >= 0.8
    limit = llm_params.llm.gates.leak_rate_max
    assert all(rate <= limit for rate in metrics["new"]["leak_rate_by_attack"].values()), metrics["new"]
    assert metrics["new"]["retained_recall"] is None  # nobody is kept in this scope
    assert all(g.passed for g in gates), [g.to_dict() for g in gates if not g.passed]
