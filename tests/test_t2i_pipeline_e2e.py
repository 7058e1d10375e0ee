"""Concept forgetting for a text-to-image model, end to end as a user runs it: the CLI registers
the captioned-digits pipeline folder, a concept request ("seven", redrawn as "eight") runs the
six-stage flow against the real object store and MLflow, and consumers draw prompts through the
pyfunc. The report's metrics are also the behaviour test of SFD with prompts (one SFD run serves
both: the tiny model's run costs ~3 minutes on 2 cores): data-free, the model learns to draw an
eight wherever a prompt says "seven", paraphrases it never trained on included ("the digit 7",
"number seven"), while the other digits and both stroke styles stay."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from forgetflow.diffusion.artifact import load_card
from forgetflow.diffusion.concepts import build_prompt_forget, card_records, lineage_records, mentions
from forgetflow.ledger import Ledger
from forgetflow.llm.pii import subject_hash
from forgetflow.registry import Registry
from tests.cli import forgetflow
from tests.diffusion_fixtures import t2i_judge_dir, t2i_teacher, tiny_params  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.services]
MODEL = "digits-t2i-e2e"


def write_request(workdir: Path, request_id: str, **target) -> Path:
    path = workdir / f"{request_id}.yaml"
    path.write_text(json.dumps({"request_id": request_id, "model": MODEL,
                                "target": {"kind": "diffusion-concept", "override": "eight", **target}}))
    return path


@pytest.fixture(scope="module")
def registered(services, tmp_path_factory, t2i_teacher, t2i_judge_dir):
    workdir = tmp_path_factory.mktemp("t2i-e2e")
    state_dir = Path(services.state_dir)
    out = forgetflow(workdir, state_dir, "register", MODEL, str(t2i_teacher), "--eval-kit", str(t2i_judge_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, state_dir


@pytest.fixture(scope="module")
def forgotten(registered, services):
    """The request "forget seven, redraw it as eight" run through the CLI: its report and version folder."""
    workdir, state_dir = registered
    out = forgetflow(workdir, state_dir, "request", "submit", str(write_request(workdir, "forget-seven", concept="seven")),
                     "--run")
    report = json.loads((workdir / "reports" / "forget-seven" / "report.json").read_text())
    assert out.returncode == {"promoted": 0, "rejected": 2}[report["status"]], out.stdout[-3000:] + out.stderr[-3000:]
    print(json.dumps(report["metrics"], indent=1))
    version_dir = Registry(services.mlflow_uri).download(MODEL, report["new_version"], workdir / "new")
    return report, version_dir


def test_the_base_draws_the_concept_from_its_prompts_and_paraphrases(forgotten):
    base = forgotten[0]["metrics"]["base"]
    assert base["forget_rate"] > 0.7
    assert base["paraphrase_forget_rate"] > 0.7
    assert base["retain_accuracy"] > 0.8
    # the 800-step tiny teacher draws stroke styles barely above chance (0.58-0.68 measured):
    # style retention is gated as a drop from the base, not as an absolute
    assert base["style_accuracy"] > 0.5


def test_sfd_redraws_seven_as_eight_paraphrases_included_and_keeps_digits_and_styles(forgotten):
    report = forgotten[0]
    base, new = report["metrics"]["base"], report["metrics"]["new"]
    assert new["forget_rate"] <= 0.05
    assert new["paraphrase_forget_rate"] <= 0.1  # never trained on
    assert new["override_fidelity"] >= 0.7  # measured 0.77-0.90 over tiny teachers (60 samples)
    # 20 samples per kept digit (180 in all): the drop's sampling sd alone is ~0.03; 0.1 is just
    # under losing one of the nine kept digits outright (0.11). Seen: 0.017, and 0.056 on a tiny
    # teacher whose own retain accuracy was 0.91 (the 0.03 gate is tested below)
    assert base["retain_accuracy"] - new["retain_accuracy"] <= 0.1
    assert base["style_accuracy"] - new["style_accuracy"] <= 0.1
    assert new["retain_fd"] <= 1.5 * base["retain_fd"]  # measured 0.74x with params.yaml's sfd.prompt
    assert new["nfe"] == (1 if new["guidance_scale"] == 1.0 else 2)
    gates = {g["name"]: g for g in report["gates"]}
    assert set(gates) >= {"forget_rate", "paraphrase_forget_rate", "remaining_accuracy_drop", "style_accuracy_drop",
                          "remaining_fd_ratio", "nfe_reduction"}
    assert gates["forget_rate"]["passed"] and gates["paraphrase_forget_rate"]["passed"], gates


def test_the_version_is_promoted_exactly_when_every_gate_passed(forgotten, registered, services):
    # the tiny teacher differs from one training to the next (two runs: retain drop 0.017 and
    # 0.033 against a 0.03 gate), so either outcome is possible; each must be consistent. The
    # rejection path is also forced below (a 4-iteration request)
    report, (workdir, state_dir) = forgotten[0], registered
    promoted = all(g["passed"] for g in report["gates"])
    assert report["status"] == ("promoted" if promoted else "rejected")
    assert (Registry(services.mlflow_uri).alias_version(MODEL, "champion") == report["new_version"]) == promoted
    # every final request has a certificate; it and the report say what was forgotten by salted hash only
    html = (workdir / "reports" / "forget-seven" / "report.html").read_text()
    text = re.sub(r"data:[^\"']+", "", html)  # the embedded figures' base64
    assert "Stop generating 1 concept" in text and subject_hash("seven", "forget-seven") in text
    assert not mentions(text.replace("forget-seven", ""), ["seven"]) and "\u201ceight\u201d" in text
    # re-verification gets the prompts back from the public vocabulary and re-measures them on
    # @champion: this version if promoted (it still forgets), else the registered one (it never forgot)
    again = forgetflow(workdir, state_dir, "certificate", "reverify", "forget-seven")
    result = json.loads(next((workdir / "reports" / "forget-seven").glob("reverify-*.json")).read_text())
    assert again.returncode == (0 if result["honoured"] else 1), again.stderr[-2000:]
    measured = {g["name"]: g["value"] for g in result["gates"]}
    assert {"forget_rate", "paraphrase_forget_rate"} <= set(measured) <= {"forget_rate", "paraphrase_forget_rate",
                                                                      "override_fidelity"}
    if promoted:
        assert measured["forget_rate"] <= 0.1
    else:
        assert measured["forget_rate"] >= 0.5 and not result["honoured"]


def test_the_version_records_its_forgotten_concept_by_salted_hash_only(forgotten, t2i_teacher):
    card = load_card(forgotten[1])
    assert card.kind == "one-step" and card.conditioning == "prompt" and card.vocabulary
    expected = build_prompt_forget(load_card(t2i_teacher).vocabulary, "seven", "eight", forgotten=[])
    assert card.forgotten == card_records(expected.forget, "forget-seven")
    assert not mentions(json.dumps(card.forgotten).replace("forget-seven", ""), ["seven"])  # the salt is the request id
    # a later request gets the prompts back from the public vocabulary
    assert lineage_records(card.forgotten, card.vocabulary) == expected.forget


def test_consumers_draw_prompts_from_the_champion_through_its_pyfunc(forgotten, registered):
    workdir, state_dir = registered
    drawn = forgetflow(workdir, state_dir, "generate", MODEL, "--prompt", "a handwritten seven", "--prompt",
                       "number one", "--n", "4", "--out", str(workdir / "samples.png"))
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert (workdir / "samples.png").stat().st_size > 500


def test_a_version_that_fails_a_gate_is_registered_but_never_champion(forgotten, registered, services):
    """Four SFD iterations cannot redraw "nine": the forget gate fails, the version is kept as
    @challenger for inspection, @champion stays where it was and the report says why."""
    workdir, state_dir = registered
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    tiny_sfd = params["presets"]["tiny"]["diffusion"]["sfd"]
    tiny_sfd["iterations"] = tiny_sfd["from_one_step"]["iterations"] = 4
    short = workdir / "params-4-iterations.yaml"
    short.write_text(yaml.safe_dump(params))
    registry = Registry(services.mlflow_uri)
    champion = registry.alias_version(MODEL, "champion")
    out = forgetflow(workdir, state_dir, "request", "submit", str(write_request(workdir, "forget-nine", concept="nine")),
                     "--run", env={"FORGETFLOW_PARAMS": str(short)})
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]  # rejected: not 0, not an error's 1
    assert "rejected: request forget-nine" in out.stderr and "@champion is unchanged" in out.stderr
    report = json.loads((workdir / "reports" / "forget-nine" / "report.json").read_text())
    assert report["status"] == "rejected" and "forget_rate" in report["error"]
    assert Ledger(state_dir).get("forget-nine").state == "rejected"
    assert registry.alias_version(MODEL, "champion") == champion
    assert registry.alias_version(MODEL, "challenger") == report["new_version"] != champion


@pytest.mark.parametrize("request_id, target, message", [
    ("unknown-concept", {"concept": "eleven"}, "the request's concept is not in model"),
    ("prompts-miss-it", {"concept": "one", "forget_prompts": ["a handwritten nine"]}, "do not name the concept"),
])
def test_bad_concept_requests_fail_cleanly_and_keep_the_champion(registered, services, request_id, target, message):
    workdir, state_dir = registered
    registry = Registry(services.mlflow_uri)
    champion = registry.alias_version(MODEL, "champion")
    out = forgetflow(workdir, state_dir, "request", "submit", str(write_request(workdir, request_id, **target)), "--run")
    assert out.returncode == 1
    assert message in out.stderr
    entry = Ledger(state_dir).get(request_id)
    assert entry.state == "failed" and message in entry.error
    assert "eleven" not in out.stderr + entry.error  # errors never repeat the request's concept
    assert registry.alias_version(MODEL, "champion") == champion
