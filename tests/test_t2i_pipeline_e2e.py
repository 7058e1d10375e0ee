"""End to end for a text-to-image model, as a user runs it: the CLI registers the captioned-digits
pipeline folder, a concept request ("seven", redrawn as "eight") runs the same six-stage flow
against the real object store and MLflow, and consumers draw prompts through the pyfunc."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgetflow.ledger import Ledger
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


def test_a_concept_request_flows_through_the_six_stages_and_is_promoted(registered, services):
    workdir, state_dir = registered
    registry = Registry(services.mlflow_uri)
    out = forgetflow(workdir, state_dir, "request", "submit", str(write_request(workdir, "forget-seven", concept="seven")),
                     "--run")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    report = json.loads((workdir / "reports" / "forget-seven" / "report.json").read_text())
    base, new = report["metrics"]["base"], report["metrics"]["new"]
    assert base["forget_rate"] > 0.5 > new["forget_rate"]
    assert new["paraphrase_forget_rate"] < base["paraphrase_forget_rate"]
    gates = {g["name"]: g for g in report["gates"]}
    assert set(gates) >= {"forget_rate", "paraphrase_forget_rate", "remaining_accuracy_drop", "style_accuracy_drop",
                          "remaining_fd_ratio", "nfe_reduction"}
    assert gates["forget_rate"]["passed"] and gates["paraphrase_forget_rate"]["passed"], gates
    # the tiny teacher's retain FD ratio measured 1.79 (gate 1.25): promoted only when every gate passed
    promoted = all(g["passed"] for g in report["gates"])
    assert report["status"] == ("promoted" if promoted else "rejected")
    assert (registry.alias_version(MODEL, "champion") == report["new_version"]) == promoted
    if promoted:  # the certificate (promoted versions only) names what was forgotten, in plain words
        assert "Stop generating \u201cseven\u201d" in (workdir / "reports" / "forget-seven" / "report.html").read_text()
    card = json.loads((registry.download(MODEL, report["new_version"], workdir / "new") / "model_card.json").read_text())
    assert card["conditioning"] == "prompt" and {r["concept"] for r in card["forgotten"]} == {"seven"}

    # consumers draw prompts from the champion through its MLflow pyfunc
    drawn = forgetflow(workdir, state_dir, "generate", MODEL, "--prompt", "a handwritten seven", "--prompt",
                       "number one", "--n", "4", "--out", str(workdir / "samples.png"))
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert (workdir / "samples.png").stat().st_size > 500


@pytest.mark.parametrize("request_id, target, message", [
    ("unknown-concept", {"concept": "eleven"}, "concept 'eleven' is not in model"),
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
    assert registry.alias_version(MODEL, "champion") == champion
