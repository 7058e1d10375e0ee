"""End to end, as a user runs it: the CLI drives the Prefect flow against the real local
object store and MLflow server (tiny preset: same code path, smaller numbers). The first
request's process is SIGKILLed mid-training and rerun, as after a crash."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgetflow.config import load_params
from forgetflow.ledger import Ledger
from forgetflow.registry import Registry
from forgetflow.storage import ObjectStore, S3CheckpointSink
from tests.cli import forgetflow
from tests.diffusion_fixtures import judge_dir, tiny_params, tiny_teacher  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.services]
MODEL = "digits-e2e"


def write_request(workdir: Path, request_id: str, **target) -> Path:
    path = workdir / f"{request_id}.yaml"
    path.write_text(json.dumps({"request_id": request_id, "model": target.pop("model", MODEL),
                                "target": {"kind": "diffusion-class", **target}}))
    return path


@pytest.fixture(scope="module")
def registered(services, tmp_path_factory, tiny_teacher, judge_dir):
    """The tiny demo model and judge (the session's, built by the same code as `forgetflow
    train-base`, which tests/test_dvc.py runs through `dvc repro`), registered by the CLI as
    MODEL@champion."""
    workdir = tmp_path_factory.mktemp("e2e")
    state_dir = Path(services.state_dir)
    out = forgetflow(workdir, state_dir, "register", MODEL, str(tiny_teacher), "--eval-kit", str(judge_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, state_dir


def killed_at_first_checkpoint(workdir: Path, state_dir: Path, sink: S3CheckpointSink, *args: str) -> str:
    """Run the CLI in its own process group and SIGKILL the group (the trainer with it) as
    soon as the run's first checkpoint is complete in S3; the process's output."""
    env = {**os.environ, "FORGETFLOW_STATE_DIR": str(state_dir)}
    log = workdir / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "forgetflow.cli", "--preset", "tiny", *args], cwd=workdir,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while not sink.steps():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return log.read_text()


def test_request_flows_through_all_six_stages_and_is_promoted(registered, services):
    """Killed at its first checkpoint, rerun with `forgetflow run`: it resumes there (the steps
    before are not redone) and passes the same gates as an uninterrupted run."""
    workdir, state_dir = registered
    registry = Registry(services.mlflow_uri)
    assert registry.alias_version(MODEL, "champion") == "1"

    sink = S3CheckpointSink(ObjectStore(services.settings()), MODEL, "forget-7")
    params = workdir / "params.yaml"  # a killed run's model slot frees after the shortest lease
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    data["orchestration"]["model_slot_lease_s"] = 60
    params.write_text(yaml.safe_dump(data))
    killed = killed_at_first_checkpoint(workdir, state_dir, sink, "--params", str(params), "request", "submit",
                                        str(write_request(workdir, "forget-7", classes=[7])), "--run")
    checkpointed = sink.steps()
    assert Ledger(state_dir).get("forget-7").state == "running", killed[-2000:]
    out = forgetflow(workdir, state_dir, "--params", str(params), "run", "forget-7")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = json.loads((registry.download(MODEL, "2", workdir / "resumed") / "training_log.json").read_text())
    sfd = load_params(preset="tiny").diffusion.sfd
    assert log["resumed_from"] == checkpointed[-1] and log["iterations"] == sfd.iterations
    # one history, carried through the checkpoint: no step before it was trained twice
    assert [row["iteration"] for row in log["history"]] == list(range(sfd.log_every, sfd.iterations + 1, sfd.log_every))

    report = json.loads((workdir / "reports" / "forget-7" / "report.json").read_text())
    assert report["status"] == "promoted", report["gates"]
    assert report["family"] == "diffusion" and report["method"] == "sfd"
    assert (report["base_version"], report["new_version"]) == ("1", "2")
    assert set(report["durations_s"]) == {"intake", "synthesize", "unlearn", "calibrate", "evaluate", "promote", "total"}
    assert 0 < report["pipeline_overhead"] < 0.5 and report["durations_s"]["total"] > report["durations_s"]["unlearn"]
    base, new = report["metrics"]["base"], report["metrics"]["new"]
    for key in ("unlearning_accuracy", "override_fidelity", "remaining_class_accuracy", "remaining_fd",
                "seconds_per_1000_samples", "nfe"):
        assert key in base and key in new
    assert base["unlearning_accuracy"] < 0.5 < new["unlearning_accuracy"]
    assert new["nfe"] < base["nfe"]
    assert all(g["passed"] for g in report["gates"])
    assert (workdir / "reports" / "forget-7" / "report.html").read_text().count("<img") >= 2

    # registry: champion moved, version carries its lineage
    assert registry.alias_version(MODEL, "champion") == "2"
    assert registry.alias_version(MODEL, "challenger") == "2"
    tags = registry.get_version(MODEL, "2").tags
    assert tags["forgetflow.request_id"] == "forget-7" and tags["forgetflow.base_version"] == "1"
    assert tags["forgetflow.checkpoint_uri"].endswith(f"{MODEL}/forget-7/final")

    # ledger: final state, payload key shredded
    entry = Ledger(state_dir).get("forget-7")
    assert entry.state == "promoted" and entry.new_version == "2" and entry.key_shredded

    # the same request again is the same piece of work
    again = forgetflow(workdir, state_dir, "request", "submit", str(workdir / "forget-7.yaml"), "--run")
    assert again.returncode == 0 and "already known, promoted" in again.stdout
    assert [v.version for v in registry.versions(MODEL)] == ["2", "1"] or len(registry.versions(MODEL)) == 2

    # consumers sample the champion through its MLflow pyfunc
    out = forgetflow(workdir, state_dir, "generate", MODEL, "--label", "7", "--label", "1", "--n", "4",
                     "--out", str(workdir / "samples.png"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (workdir / "samples.png").stat().st_size > 1000


def test_the_promoted_request_has_a_certificate_that_verifies_offline_and_still_holds(registered, services):
    """The certificate beside the report is signed by the issuer's key, names the weights the
    registry serves, is logged to MLflow and tagged on the version; reverify re-measures the
    forgetting on the current champion."""
    import hashlib

    from mlflow import MlflowClient

    workdir, state_dir = registered
    report_dir = workdir / "reports" / "forget-7"
    cert_path = report_dir / "certificate.json"
    cert = json.loads(cert_path.read_text())
    assert cert["status"] == "promoted" and (cert["base"]["version"], cert["new"]["version"]) == ("1", "2")
    assert cert["forgotten"] == [{"forget_class": 7, "override_class": 8}]
    assert cert["key_shredding"]["requests"][0]["key_destroyed"] and cert["key_shredding"]["requests"][0]["at"]
    assert {g["name"] for g in cert["gates"]} == {g["name"] for g in json.loads((report_dir / "report.json").read_text())["gates"]}
    assert "Certificate of unlearning" in (report_dir / "report.html").read_text()
    # every diffusion attack on both versions with its trials and exact bound, signed and shown
    metrics = json.loads((report_dir / "report.json").read_text())["metrics"]
    for version in ("base", "new"):
        attacks = metrics[version]["attacks"]
        assert set(attacks) == {"forget", "relearning", "embedding_search"}, attacks
        assert all(r["n"] > 0 and r["upper95"] >= r["rate"] for r in attacks.values()), attacks
    assert metrics["new"]["attacks"]["forget"]["rate"] < metrics["base"]["attacks"]["forget"]["rate"]
    assert set(cert["evaluation"]["attacks"]) == {"forget", "relearning", "embedding_search"}
    assert "Attacks (held-out material" in (report_dir / "report.html").read_text()

    registry = Registry(services.mlflow_uri)
    tags = registry.get_version(MODEL, "2").tags
    assert tags["forgetflow.certificate_sha256"] == hashlib.sha256(cert_path.read_bytes()).hexdigest()
    run_id = json.loads((report_dir / "report.json").read_text())["uris"]["mlflow_run"]
    logged = [a.path for a in MlflowClient(services.mlflow_uri).list_artifacts(run_id, "report")]
    assert "report/certificate.json" in logged

    key = forgetflow(workdir, state_dir, "certificate", "public-key")
    assert key.returncode == 0 and key.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    (workdir / "issuer.pub").write_text(key.stdout)
    served = registry.download(MODEL, "2", workdir / "served-v2")
    ok = forgetflow(workdir, state_dir, "certificate", "verify", str(cert_path), "--public-key",
                    str(workdir / "issuer.pub"), "--model-dir", str(served))
    assert ok.returncode == 0 and "valid" in ok.stdout, ok.stderr[-2000:]
    base = registry.download(MODEL, "1", workdir / "served-v1")  # the wrong weights for this certificate
    wrong = forgetflow(workdir, state_dir, "certificate", "verify", str(cert_path), "--model-dir", str(base))
    assert wrong.returncode == 1 and "new.files" in wrong.stderr  # the first file that differs, is missing or extra

    again = forgetflow(workdir, state_dir, "certificate", "reverify", "forget-7")
    assert again.returncode == 0 and "honoured" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    result = json.loads(next(report_dir.glob("reverify-*.json")).read_text())
    assert result["honoured"] and {g["name"] for g in result["gates"]} == {"unlearning_accuracy", "override_fidelity"}
    assert set(result["attacks"]) == {"forget", "relearning", "embedding_search"}  # re-run on the champion
    assert "embedding_search" in again.stdout


@pytest.mark.parametrize("request_id, target, message", [
    ("unknown-model", {"model": "no-such-model", "classes": [1]}, "no-such-model"),
    ("class-out-of-range", {"classes": [12]}, "class 12 is not in model"),
])
def test_bad_targets_fail_cleanly_and_keep_the_champion(registered, services, request_id, target, message):
    workdir, state_dir = registered
    registry = Registry(services.mlflow_uri)
    champion = registry.alias_version(MODEL, "champion")
    out = forgetflow(workdir, state_dir, "request", "submit", str(write_request(workdir, request_id, **target)), "--run")
    assert out.returncode == 1
    assert message in out.stderr
    entry = Ledger(state_dir).get(request_id)
    assert entry.state == "failed" and message in entry.error
    assert registry.alias_version(MODEL, "champion") == champion


def test_malformed_request_is_refused_before_the_ledger(registered):
    workdir, state_dir = registered
    bad = workdir / "bad.yaml"
    bad.write_text("request_id: x\nmodel: [unclosed\n")
    out = forgetflow(workdir, state_dir, "request", "submit", str(bad))
    assert out.returncode == 1 and "malformed YAML/JSON" in out.stderr
    assert Ledger(state_dir).get("x", missing_ok=True) is None


def test_an_unreachable_object_store_is_one_line_and_the_request_waits(registered, services):
    workdir, state_dir = registered
    registry = Registry(services.mlflow_uri)
    champion = registry.alias_version(MODEL, "champion")
    request = write_request(workdir, "store-down", classes=[4])
    assert forgetflow(workdir, state_dir, "request", "submit", str(request)).returncode == 0
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    out = forgetflow(workdir, state_dir, "run", "store-down", env={"AWS_ENDPOINT_URL_S3": dead})
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and f"object store at {dead} is not reachable" in out.stderr
    assert Ledger(state_dir).get("store-down").state == "accepted"  # still there, still to do
    assert registry.alias_version(MODEL, "champion") == champion


def test_a_corrupt_checkpoint_is_refused_never_loaded(registered, services, tmp_path):
    workdir, state_dir = registered
    registry = Registry(services.mlflow_uri)
    champion = registry.alias_version(MODEL, "champion")
    request = write_request(workdir, "corrupt-checkpoint", classes=[5])
    assert forgetflow(workdir, state_dir, "request", "submit", str(request)).returncode == 0
    # a checkpoint of this request whose bytes changed after it was saved (hash manifest kept)
    sink = S3CheckpointSink(ObjectStore(services.settings()), MODEL, "corrupt-checkpoint")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"checkpoint bytes" * 64)
    sink.save(40, tmp_path / "ckpt")
    sink.store.put_bytes(b"flipped bits", f"{sink.step_prefix(40)}/state.pt")
    out = forgetflow(workdir, state_dir, "run", "corrupt-checkpoint")
    assert out.returncode == 1
    assert "step-00000040/state.pt: content does not match the manifest" in out.stderr
    entry = Ledger(state_dir).get("corrupt-checkpoint")
    assert entry.state == "failed" and "CorruptArtifact" in entry.error
    report = json.loads(Path(entry.report_path).read_text())
    assert report["status"] == "failed" and "state.pt" in report["error"]
    assert registry.alias_version(MODEL, "champion") == champion


def test_registering_a_ddpm_also_registers_its_one_step_serving_version(services, tiny_teacher, judge_dir, tmp_path):
    """With params diffusion.distill.on_register (the real preset's default), `register` also
    distils a one-step version, registers it as the next version with its gates and its base,
    and makes it @champion only when every gate passed (else the DDPM serves)."""
    name = "digits-serving"
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    data["presets"]["tiny"]["diffusion"]["distill"] = {"on_register": True, "iterations": 20}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    out = forgetflow(tmp_path, Path(services.state_dir), "--params", str(path), "register", name, str(tiny_teacher),
                     "--eval-kit", str(judge_dir))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"registered {name} v2: its one-step version for serving" in out.stdout
    registry = Registry(services.mlflow_uri)
    tags = registry.get_version(name, "2").tags
    assert tags["forgetflow.base_version"] == "1" and "forgetflow.gate.nfe_reduction" in tags
    assert "forgetflow.gate.unlearning_accuracy" not in tags  # nothing forgotten, nothing to gate
    card = json.loads((registry.download(name, "2", tmp_path / "v2") / "model_card.json").read_text())
    assert card["kind"] == "one-step" and card["forgotten"] == []
    passed = tags["forgetflow.gates_passed"] == "true"
    assert registry.alias_version(name, "champion") == ("2" if passed else "1")
