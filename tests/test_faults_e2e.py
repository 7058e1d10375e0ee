"""Services that die in the middle of a request (DESIGN.md invariants 1, 4 and 5), on the real
services and the tiny preset, one request through three runs:

1. the object store is stopped while the model trains: the unlearn stage is retried with
   back-off, then the request fails cleanly (ledger `failed` naming the store, @champion where
   it was);
2. with the store back, the rerun resumes from the checkpoint, pauses for approval after
   evaluate, MLflow is stopped, the run is approved: promote is retried, then fails cleanly,
   and no version of the request was registered or serves;
3. with MLflow back, and even after a crash that left the version registered and @champion
   moved without the ledger knowing, the rerun promotes exactly once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgetflow import services as svc
from forgetflow.bootstrap import EVAL_KIT_TAG
from forgetflow.config import load_params
from forgetflow.ledger import Ledger
from forgetflow.registry import Registry
from forgetflow.storage import ObjectStore, S3CheckpointSink
from tests.cli import forgetflow
from tests.diffusion_fixtures import judge_dir, tiny_params, tiny_teacher  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.services]
MODEL = "digits-faults"
REQUEST = "forget-3-faults"
RETRY_DELAYS_S = [1, 3]
# MLflow's client retries a refused connection for minutes by default; the pipeline's own
# stage retries are what this test measures
MLFLOW_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@pytest.fixture(scope="module")
def setup(services, tmp_path_factory, tiny_teacher, judge_dir):
    """MODEL@champion v1, the request document, and params files with short stage retries
    (auto and manual promotion approval)."""
    workdir = tmp_path_factory.mktemp("faults")
    state_dir = Path(services.state_dir)
    out = forgetflow(workdir, state_dir, "register", MODEL, str(tiny_teacher), "--eval-kit", str(judge_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    (workdir / f"{REQUEST}.yaml").write_text(json.dumps(
        {"request_id": REQUEST, "model": MODEL, "target": {"kind": "diffusion-class", "classes": [3]}}))
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    data["orchestration"].update(stage_retry_delays_s=RETRY_DELAYS_S, model_slot_lease_s=60)
    (workdir / "auto.yaml").write_text(yaml.safe_dump(data))
    data["orchestration"].update(promotion_approval="manual", approval_poll_s=1)
    (workdir / "manual.yaml").write_text(yaml.safe_dump(data))
    return workdir, state_dir


def start_cli(workdir: Path, state_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "FORGETFLOW_STATE_DIR": str(state_dir), **MLFLOW_FAIL_FAST}
    return subprocess.Popen([sys.executable, "-m", "forgetflow.cli", "--preset", "tiny", *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout_s: float = 900) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stdout.read()[-3000:]}")
        assert time.time() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.5)


def finished(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=900)
    return proc.returncode, out


def task_run_counts(services, flow_run_id: str) -> dict[str, int]:
    """How often each stage of a flow run was attempted (Prefect's run_count), as the session's
    Prefect server recorded it."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: services.settings().prefect_api_url}), \
            get_client(sync_client=True) as client:  # limit and sort given: the sync client sends null otherwise
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
    return {run.name.rsplit("-", 1)[0]: run.run_count for run in runs}


def restart(services) -> None:
    """`up` brings back what was stopped, on the endpoints the clients already use."""
    info = svc.up(load_params(), services.state_dir)
    assert (info.s3_endpoint, info.mlflow_uri) == (services.s3_endpoint, services.mlflow_uri)


def versions_of_request(registry: Registry) -> list[str]:
    return [v.version for v in registry.versions(MODEL) if v.tags.get("forgetflow.request_id") == REQUEST]


def test_a_store_outage_then_an_mlflow_outage_fail_cleanly_and_the_rerun_promotes_once(setup, services):
    workdir, state_dir = setup
    registry = Registry(services.mlflow_uri)
    ledger = Ledger(state_dir)
    assert registry.alias_version(MODEL, "champion") == "1"
    sink = S3CheckpointSink(ObjectStore(services.settings()), MODEL, REQUEST)

    # 1. the object store stops once the first checkpoint is in it
    proc = start_cli(workdir, state_dir, "--params", "auto.yaml", "request", "submit", f"{REQUEST}.yaml", "--run")
    wait_for(sink.steps, proc, "a first checkpoint")
    checkpointed = sink.steps()[-1]
    assert svc.down(state_dir, only=("seaweedfs",)) == ["seaweedfs"]
    try:
        code, out = finished(proc)
        entry = ledger.get(REQUEST)
        assert code == 1 and entry.state == "failed", out[-3000:]
        assert "ServiceUnavailable" in entry.error and "object store" in entry.error
        assert f"request {REQUEST} failed" in out and "object store" in out
        # retried once per configured delay before giving up; the stages before ran once
        counts = task_run_counts(services, entry.flow_run_id)
        assert counts["unlearn"] == 1 + len(RETRY_DELAYS_S) and counts["intake"] == counts["synthesize"] == 1, counts
        assert registry.alias_version(MODEL, "champion") == "1"  # MLflow is up: the champion never moved
    finally:
        restart(services)

    # 2. resumed, evaluated, waiting for approval; MLflow stops before promote
    proc = start_cli(workdir, state_dir, "--params", "manual.yaml", "run", REQUEST)
    wait_for(lambda: ledger.get(REQUEST).state == "awaiting-approval", proc, "the approval pause")
    assert versions_of_request(registry) == [] and registry.alias_version(MODEL, "champion") == "1"
    assert svc.down(state_dir, only=("mlflow",)) == ["mlflow"]
    try:
        approved = forgetflow(workdir, state_dir, "--params", "manual.yaml", "approve", REQUEST)
        assert approved.returncode == 0 and "approved" in approved.stdout, approved.stderr[-2000:]
        code, out = finished(proc)
        entry = ledger.get(REQUEST)
        assert code == 1 and entry.state == "failed", out[-3000:]
        assert "MLflow" in entry.error or "API request to" in entry.error, entry.error
        assert task_run_counts(services, entry.flow_run_id)["promote"] == 1 + len(RETRY_DELAYS_S)
        report = json.loads(Path(entry.report_path).read_text())
        assert report["status"] == "failed" and report["error"] == entry.error
    finally:
        restart(services)
    assert versions_of_request(registry) == [], "a version was half-registered"
    assert registry.alias_version(MODEL, "champion") == "1"
    again = forgetflow(workdir, state_dir, "approve", REQUEST)  # nothing waits any more
    assert again.returncode == 1 and "is failed, not awaiting approval" in again.stderr

    # the worst moment to die: promote had registered the version and moved @champion, and
    # the ledger never heard of it (a crash right after promote_champion leaves this behind)
    final = ObjectStore(services.settings()).get_dir(f"{MODEL}/{REQUEST}/final", workdir / "final")
    crashed = registry.register(MODEL, final, tags={
        "forgetflow.request_id": REQUEST, "forgetflow.request_ids": REQUEST, "forgetflow.base_version": "1",
        EVAL_KIT_TAG: registry.get_version(MODEL, "1").tags[EVAL_KIT_TAG]})
    registry.set_alias(MODEL, "champion", crashed)

    # 3. the rerun finishes that promotion: still one version of the request
    out = forgetflow(workdir, state_dir, "--params", str(workdir / "auto.yaml"), "run", REQUEST)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    entry = ledger.get(REQUEST)
    assert entry.state == "promoted" and versions_of_request(registry) == [entry.new_version] == ["2"]
    assert registry.alias_version(MODEL, "champion") == "2"
    log = json.loads((registry.download(MODEL, "2", workdir / "v2") / "training_log.json").read_text())
    assert log["resumed_from"] >= checkpointed  # trained on from its checkpoints, not from zero
    assert [e["state"] for e in ledger.events(REQUEST)].count("awaiting-approval") == 1
