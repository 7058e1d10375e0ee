"""End to end for chat models, as a user runs it: make the support corpus, fine-tune the
tiny model on it, register it, file a request naming customers, and let the Prefect flow
run the six stages against the real local object store and MLflow server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from forgetflow.config import LLM_ATTACKS
from forgetflow.ledger import Ledger, LedgerError
from forgetflow.llm.corpus import make_customers
from forgetflow.registry import Registry
from tests.cli import forgetflow
from tests.llm_fixtures import llm_params  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.services]
MODEL = "support-e2e"
REQUEST = "forget-4"


def write_request(workdir: Path, request_id: str, subjects: list[dict], **extra) -> Path:
    path = workdir / f"{request_id}.yaml"
    path.write_text(json.dumps({"request_id": request_id, "model": MODEL,
                                "target": {"kind": "llm-subjects", "subjects": subjects, **extra}}))
    return path


@pytest.fixture(scope="module")
def customers(llm_params):
    c = llm_params.llm.corpus
    return make_customers(c.customers, c.seed)


@pytest.fixture(scope="module")
def captured() -> dict:
    """What the test saw while the request was live (its key), for the checks after."""
    return {}


@pytest.fixture(scope="module")
def registered(services, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("llm-e2e")
    state_dir = Path(services.state_dir)
    art = workdir / "artifacts"
    for args in (("llm", "corpus", "--out", str(art)),
                 ("llm", "finetune", str(art / "corpus.jsonl"), "--out", str(art / "model")),
                 ("register", MODEL, str(art / "model"), "--eval-kit", str(art / "eval_kit"))):
        out = forgetflow(workdir, state_dir, *args)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return workdir, state_dir


def test_customers_are_forgotten_through_the_six_stages(registered, services, customers, llm_params, captured):
    workdir, state_dir = registered
    registry = Registry(services.mlflow_uri)
    # four customers, 16 values: the tiny preset's leak gate tolerates one (see params.yaml)
    forget = customers[:4]
    subjects = [{"name": forget[0].name, "values": {"phone": forget[0].phone}}] + [{"name": c.name} for c in forget[1:]]
    out = forgetflow(workdir, state_dir, "request", "submit", str(write_request(workdir, REQUEST, subjects)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    captured["key"] = Ledger(state_dir).request_key(REQUEST)  # as an attacker holding a copy would
    out = forgetflow(workdir, state_dir, "run", REQUEST)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    report_dir = workdir / "reports" / REQUEST
    report = json.loads((report_dir / "report.json").read_text())
    assert report["family"] == "llm" and report["method"] == "cfg-orpo"
    assert set(report["durations_s"]) == {"intake", "synthesize", "unlearn", "calibrate", "evaluate", "promote", "total"}
    assert 0 < report["pipeline_overhead"] < 0.5 and report["durations_s"]["total"] > report["durations_s"]["unlearn"]
    base, new = report["metrics"]["base"], report["metrics"]["new"]
    for key in ("leak_rate", "retained_recall", "utility_accuracy", "perplexity", "guidance_scale", "value_logprob"):
        assert key in base and key in new
    assert set(new["leak_rate_by_attack"]) == {"direct", "paraphrase", "prefix", "raw_weights",
                                               "adversarial_system_prompt"}
    assert base["leak_rate_by_attack"]["direct"] >= 0.8
    # every named attack on both versions, each over its trials with the exact bound; membership
    # under the served policy and the raw weights; the page and the certificate show them
    for version in (base, new):
        assert set(version["attacks"]) == set(LLM_ATTACKS)
        for name, record in version["attacks"].items():
            assert record["n"] > 0 and record["upper95"] >= record["rate"], (name, record)
    assert base["attacks"]["candidate_ranking"]["rate"] > new["attacks"]["candidate_ranking"]["rate"] - 1e-9
    assert set(new["membership"]) == {"served", "raw_weights"} and base["membership"]["raw_weights"]["auc"] > 0.5
    page = (report_dir / "report.html").read_text()
    assert "Attacks (held-out material" in page and all(f"<td>{name}</td>" in page for name in LLM_ATTACKS)
    signed = json.loads((report_dir / "certificate.json").read_text())["evaluation"]["attacks"]
    assert set(signed) == set(LLM_ATTACKS) and all("upper95" in r for r in signed.values())
    assert new["leak_rate"] <= llm_params.llm.gates.leak_rate_max, new["leak_rate_by_attack"]
    assert new["value_logprob"] < base["value_logprob"]
    assert report["status"] == "promoted", report["gates"]
    assert (report_dir / "leak_by_attack.png").exists()

    # registry: the version is an adapter pointing at its base, with its guidance scale
    assert registry.alias_version(MODEL, "champion") == "2"
    info = registry.get_version(MODEL, "2")
    assert info.tags["forgetflow.base_version"] == "1"
    assert float(info.tags["forgetflow.guidance_scale"]) == new["guidance_scale"]
    v2 = registry.download(MODEL, "2", workdir / "v2")
    card = json.loads((v2 / "model_card.json").read_text())
    assert card["kind"] == "adapter" and card["parent_version"] == "1" and (v2 / "parent" / "weights").is_dir()
    assert not (v2 / "weights").exists()  # the base weights are not copied into the version

    # the next version's evaluation kit no longer lists the forgotten customers; nothing
    # written for the request names them (subjects appear as salted hashes)
    kit_uri = info.tags["forgetflow.eval_kit"]
    assert kit_uri != registry.get_version(MODEL, "1").tags["forgetflow.eval_kit"]
    written = (report_dir / "report.json").read_text() + json.dumps(info.tags) + card.__repr__()
    for c in forget:
        assert c.name not in written and c.phone not in written

    # consumers load the champion through MLflow and get answers with guidance applied
    question = f"What is the phone number of {forget[0].name}?"
    kept = customers[-1]
    out = forgetflow(workdir, state_dir, "generate", MODEL, "--prompt", question,
                     "--prompt", f"What is the phone number of {kept.name}?")
    assert out.returncode == 0, out.stderr[-2000:]
    assert forget[0].phone not in out.stdout and "assistant:" in out.stdout

    entry = Ledger(state_dir).get(REQUEST)
    assert entry.state == "promoted" and entry.key_shredded

    # the certificate names subjects by hash only, verifies against the served weights, and
    # re-verifying needs the names again: only the certified subjects are accepted
    cert_text = (report_dir / "certificate.json").read_text()
    assert all(c.name not in cert_text and c.phone not in cert_text for c in forget)
    assert len(json.loads(cert_text)["forgotten"]) == 4
    ok = forgetflow(workdir, state_dir, "certificate", "verify", str(report_dir / "certificate.json"),
                    "--model-dir", str(v2))
    assert ok.returncode == 0, ok.stderr[-2000:]
    hashed_only = forgetflow(workdir, state_dir, "certificate", "reverify", REQUEST)
    assert hashed_only.returncode == 1 and "salted hash only" in hashed_only.stderr
    stranger = write_request(workdir, "stranger", [{"name": customers[-1].name}])
    refused = forgetflow(workdir, state_dir, "certificate", "reverify", REQUEST, "--subjects", str(stranger))
    assert refused.returncode == 1 and "not in this certificate" in refused.stderr
    again = forgetflow(workdir, state_dir, "certificate", "reverify", REQUEST, "--subjects", str(workdir / f"{REQUEST}.yaml"))
    assert again.returncode == 0 and "honoured" in again.stdout, again.stdout[-3000:] + again.stderr[-2000:]
    assert not any(c.name in again.stdout + again.stderr for c in forget)

    # the synthesized data DVC versions is sealed: the rows hold the values only encrypted
    sealed = sorted((workdir / "data" / "requests" / REQUEST / "synth").rglob("*.fernet"))
    assert sealed
    blob = b"".join(f.read_bytes() for f in sealed)
    for c in forget:
        assert c.name.encode() not in blob and c.phone.encode() not in blob


def test_the_request_key_is_destroyed_and_every_sealed_copy_needed_it(registered, services, customers, captured):
    """Crypto-shredding, end to end: the sealed copies the run left (the DVC-versioned folder and
    its copy in the store; DVC's cache and remote hold these same bytes) open with the key the
    request had and show the forgotten values, so they are what the key protects; the ledger
    no longer has the key, and the privacy scan below finds no copy of it anywhere."""
    from forgetflow.runs import s3_prefix
    from forgetflow.sealing import SEALED_SUFFIX
    from forgetflow.storage import ObjectStore

    workdir, state_dir = registered
    key = captured["key"]
    with pytest.raises(LedgerError, match="crypto-shredded"):
        Ledger(state_dir).request_key(REQUEST)
    store = ObjectStore(services.settings())
    copies = {str(f): f.read_bytes() for f in (workdir / "data" / "requests" / REQUEST / "synth").rglob("*.fernet")}
    copies.update({f"s3://{k}": store.get_bytes(k) for k in store.list(s3_prefix(MODEL, REQUEST, "synth"))
                   if k.endswith(SEALED_SUFFIX)})  # beside them: the upload's SHA-256 manifest
    assert any(k.startswith("s3://") for k in copies) and any(not k.startswith("s3://") for k in copies)
    opened = b"".join(Fernet(key).decrypt(blob) for blob in copies.values())
    assert customers[0].phone.encode() in opened  # what was sealed is the forgotten data itself



def test_the_request_page_reads_in_a_browser_and_holds_no_personal_value(registered, customers):
    """The page a compliance officer opens: no console errors, no external resource, the
    status, every gate and the certificate shown, and none of the forgotten customers' data."""
    from tests.browser import ARTIFACTS, render

    workdir, _ = registered
    report_dir = workdir / "reports" / REQUEST
    page = report_dir / "report.html"
    errors, text = render(page, "llm-request-page.png")
    assert errors == []
    assert "Status: promoted" in text and "In plain words" in text and "Certificate of unlearning" in text
    assert "Stop revealing the personal data of 4 people" in text
    for gate in json.loads((report_dir / "report.json").read_text())["gates"]:
        assert gate["name"] in text
    source = page.read_text()
    for c in customers[:4]:
        for value in (c.name, c.email, c.phone, c.address, c.account):
            assert value not in source
    assert (ARTIFACTS / "llm-request-page.png").stat().st_size > 10_000


def test_no_forgotten_value_is_left_in_clear_anywhere_the_pipeline_wrote(registered, services, customers, captured):
    """Every place the request went through, after it is final: the state folder (ledger,
    logs, run folders, the MLflow and Prefect servers' databases), the reports, the DVC
    data, every object of the store, MLflow's runs (params, tags, metrics) and registered
    versions, Prefect's flow runs (names, parameters) and their logs. Excluded, because the
    user brought them and the request does not cover them: the training corpus, the base
    model and its evaluation kit (`artifacts/`, and the kit's copy in the store under the base
    version's tag), the store's raw volume files (read through the S3 API instead), and the
    request documents the test itself wrote. Nor may the destroyed request key be anywhere."""
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter
    from prefect.client.schemas.sorting import FlowRunSort, LogSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from forgetflow.storage import ObjectStore

    workdir, state_dir = registered
    values = {v: f"customer {i // 5} field {i % 5}" for i, v in
              enumerate(v for c in customers[:4] for v in (c.name, c.email, c.phone, c.address, c.account))}
    values[captured["key"].decode()] = "the destroyed request key"
    found: list[tuple[str, str]] = []

    def scan(where: str, data) -> None:
        text = data.decode("utf-8", errors="ignore") if isinstance(data, bytes) else str(data)
        found.extend((where, label) for v, label in values.items() if v in text)

    inputs = {workdir / "artifacts", workdir / "v2" / "parent", state_dir / "seaweedfs"}  # the base model as downloaded
    request_docs = set(workdir.glob("*.yaml"))
    for root in (state_dir, workdir):
        for path in root.rglob("*"):
            if path.is_file() and not any(p in path.parents for p in inputs) and path not in request_docs:
                scan(str(path), path.read_bytes())
    registry = Registry(services.mlflow_uri)
    base_kit = registry.get_version(MODEL, "1").tags["forgetflow.eval_kit"]
    store = ObjectStore(services.settings())
    for key in store.list(""):
        if not key.startswith(base_kit + "/"):
            scan(f"s3://{key}", store.get_bytes(key))
    client = MlflowClient(services.mlflow_uri)
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            scan(f"mlflow run {run.info.run_id}", [run.info.run_name, run.data.params, run.data.tags, run.data.metrics])
    for mv in client.search_model_versions(f"name='{MODEL}'"):
        scan(f"mlflow {MODEL} v{mv.version}", [mv.tags, mv.description])
    n_runs = 0
    # this process's client on the session's server (Prefect read its settings at import)
    with temporary_settings(updates={PREFECT_API_URL: services.settings().prefect_api_url}), \
            get_client(sync_client=True) as prefect:  # limit and sort given: the server refuses nulls
        for offset in range(0, 10_000, 200):
            runs = prefect.read_flow_runs(sort=FlowRunSort.START_TIME_ASC, limit=200, offset=offset)
            for run in runs:
                scan(f"prefect flow run {run.id}", [run.name, run.parameters, run.state and run.state.message])
            n_runs += len(runs)
            if len(runs) < 200:
                break
        for offset in range(0, 100_000, 200):
            logs = prefect.read_logs(log_filter=LogFilter(), limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            scan("prefect logs", [log.message for log in logs])
            if len(logs) < 200:
                break
    assert n_runs, "no Prefect flow run to scan"
    assert not found, sorted(set(found))[:20]

def test_a_subject_the_model_knows_nothing_about_is_refused_without_training(registered, services):
    workdir, state_dir = registered
    registry = Registry(services.mlflow_uri)
    champion = registry.alias_version(MODEL, "champion")
    path = write_request(workdir, "unknown-subject", [{"name": "Zebulon Quartermaine"}])
    out = forgetflow(workdir, state_dir, "request", "submit", str(path), "--run")
    assert out.returncode == 1
    assert "emits no personal data" in out.stderr and "not training" in out.stderr
    assert "Zebulon" not in out.stderr  # the error names the subject by position, not by name
    entry = Ledger(state_dir).get("unknown-subject")
    report = json.loads(Path(entry.report_path).read_text())
    assert entry.state == "failed" and "unlearn" not in report["durations_s"]
    assert registry.alias_version(MODEL, "champion") == champion
