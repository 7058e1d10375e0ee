"""Requests drive the pipeline by themselves (issue 4), on the session's real Prefect server,
object store and MLflow: `forgetflow serve` runs the two deployments in a subprocess.

- chain: two requests for one model (CLI, CLI; the second submitted while the first trains)
  and one for another (HTTP intake), each triggered by its accepted event: the first model's
  champion lineage is v1 -> v2 -> v3, each version forgot its request and everything before
  (re-measured on the final champion), the two models trained side by side, one model's runs
  one after another;
  a duplicate submission starts nothing and a trigger firing twice makes no second version.
- burst (load): 50 documents dropped in the inbox at once, ten of them twice, and the cron
  firing yield one batched run and one version that forgot all their classes; none lost,
  none applied twice.
Tiny presets; 20 minutes on 2 cores run alone (the tiny teacher and judge included), 19 in
the whole suite before the chain lost its third request.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from flows.deployments import ON_REQUEST, PROCESS_PENDING
from flows.triggers import REQUEST_ACCEPTED, RESOURCE_PREFIX
from forgetflow.api import create_app
from forgetflow.config import load_params
from forgetflow.diffusion.evaluate import evaluate_version
from forgetflow.ledger import Ledger
from forgetflow.registry import Registry
from forgetflow.runs import request_hash
from forgetflow.storage import ObjectStore
from tests.cli import forgetflow
from tests.diffusion_fixtures import judge_dir, tiny_params, tiny_teacher  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.services]
PROJECT = Path(__file__).resolve().parent.parent
CHAIN, SIDE, BATCHED = "digits-chain", "digits-side", "digits-batched"
CHAIN_CLASSES = {"chain-7": 7, "chain-3": 3}  # submitted in this order
BURST, BURST_CLASSES = 50, (0, 2, 4, 6, 9)  # the load test: 50 requests, ten per class
NEVER = "0 0 1 1 *"  # the chain test's sweep: not while it runs (it would batch the chain)
WAIT_S = 1500
TOKEN = "orchestration-test-token"


def doc(request_id: str, model: str, cls: int) -> dict:
    return {"request_id": request_id, "model": model, "target": {"kind": "diffusion-class", "classes": [cls]}}


def params_file(directory: Path, cron: str, **orchestration) -> Path:
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    data["orchestration"].update(process_pending_cron=cron, **orchestration)
    path = directory / f"params-{abs(hash((cron, *orchestration.items())))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def prefect_client():
    from prefect import get_client

    return get_client(sync_client=True)


@contextmanager
def served(workdir: Path, state_dir: Path, params_path: Path):
    """`forgetflow serve` in a subprocess until the block ends; its deployments and their
    triggers are removed after, so that no later event of the session starts anything."""
    log, ids = workdir / f"serve-{int(time.time())}.log", []
    env = {**os.environ, "FORGETFLOW_STATE_DIR": str(state_dir)}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "forgetflow.cli", "--preset", "tiny", "--params", str(params_path),
                                 "serve"], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 120
        with prefect_client() as client:
            while time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-4000:]
                try:
                    ids = [client.read_deployment_by_name(f"{n}/{n}").id for n in (ON_REQUEST, PROCESS_PENDING)]
                    if client.read_automations_by_name("request accepted"):
                        break
                except Exception:  # not registered yet
                    pass
                time.sleep(1)
            else:
                raise AssertionError("serve did not register its deployments:\n" + log.read_text()[-4000:])
        time.sleep(3)  # the server's trigger service loads the new automation
        yield proc, log
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        with prefect_client() as client:
            for deployment_id in ids:
                client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
                client.delete_deployment(deployment_id)


def wait_final(state_dir: Path, ids: list[str], log: Path, timeout_s: float = WAIT_S) -> dict:
    ledger, deadline = Ledger(state_dir), time.time() + timeout_s
    while time.time() < deadline:
        entries = {i: ledger.get(i, missing_ok=True) for i in ids}
        if all(e is not None and e.state in ("promoted", "rejected", "failed") for e in entries.values()):
            return entries
        time.sleep(5)
    states = {i: (e.state if e else None) for i, e in entries.items()}
    raise AssertionError(f"not final after {timeout_s} s: {states}\n" + log.read_text()[-6000:])


def runs_named(prefix: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client() as client:  # limit and sort given: the sync client sends null for them otherwise
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=prefix)),
                                     sort=FlowRunSort.START_TIME_ASC, limit=200)


def final_runs(prefix: str, count: int, timeout_s: float = 120) -> list:
    """The runs named `prefix`*, once `count` of them are in a final state: a request is final in
    the ledger a moment before its flow run returns and the server records the run completed."""
    deadline = time.time() + timeout_s
    runs = runs_named(prefix)
    while sum(1 for r in runs if r.state and r.state.is_final()) < count and time.time() < deadline:
        time.sleep(2)
        runs = runs_named(prefix)
    return runs


def unlearn_intervals(flow_runs: list) -> dict[str, tuple[float, float]]:
    """Flow run name -> (start, end) of its `unlearn` task: when it trained."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    names = {r.id: r.name for r in flow_runs}
    with prefect_client() as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(names))),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="unlearn")),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return {names[t.flow_run_id]: (t.start_time.timestamp(), t.end_time.timestamp())
            for t in tasks if t.start_time and t.end_time and t.name.startswith("unlearn")}


@pytest.fixture(scope="module", autouse=True)
def prefect_api(services):
    """This process's Prefect client on the session's server (Prefect reads its settings when
    first imported, before the services fixture exported PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: services.settings().prefect_api_url}):
        yield


@pytest.fixture(scope="module")
def workspace(services, tmp_path_factory, tiny_teacher, judge_dir):
    workdir = tmp_path_factory.mktemp("orchestration")
    state_dir = Path(services.state_dir)
    for model in (CHAIN, SIDE, BATCHED):
        out = forgetflow(workdir, state_dir, "register", model, str(tiny_teacher), "--eval-kit", str(judge_dir))
        assert out.returncode == 0, out.stderr[-3000:]
    return workdir, state_dir


@pytest.fixture(scope="module")
def chain(workspace, monkeypatch_module):
    """Serve, submit the three requests as users do, wait until all are final."""
    workdir, state_dir = workspace
    monkeypatch_module.setenv("FORGETFLOW_API_TOKEN", TOKEN)
    with served(workdir, state_dir, params_file(workdir, NEVER)) as (_, log):
        files = {}
        for request_id, cls in CHAIN_CLASSES.items():
            files[request_id] = workdir / f"{request_id}.json"
            files[request_id].write_text(json.dumps(doc(request_id, CHAIN, cls)))
        first = forgetflow(workdir, state_dir, "request", "submit", str(files["chain-7"]))
        http = TestClient(create_app(load_params(preset="tiny"), str(state_dir)))
        side = http.post("/requests", content=json.dumps(doc("side-4", SIDE, 4)),
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        rest = [forgetflow(workdir, state_dir, "request", "submit", str(files[i])) for i in list(CHAIN_CLASSES)[1:]]
        duplicate = forgetflow(workdir, state_dir, "request", "submit", str(files["chain-7"]))
        started = time.time()
        entries = wait_final(state_dir, [*CHAIN_CLASSES, "side-4"], log)
        elapsed = time.time() - started
        on_request_runs = final_runs("on-request-", count=len(CHAIN_CLASSES) + 1)
        # a trigger firing twice: the accepted event of chain-7 again, after it is promoted
        from prefect.events import emit_event

        emit_event(REQUEST_ACCEPTED, resource={"prefect.resource.id": RESOURCE_PREFIX + request_hash("chain-7")},
                   payload={"request_id": "chain-7", "model": CHAIN})
        deadline = time.time() + 180
        while time.time() < deadline:
            refired = [r for r in runs_named("on-request-") if r.id not in {x.id for x in on_request_runs}]
            if refired and all(r.state and r.state.is_final() for r in refired):
                break
            time.sleep(3)
        status = forgetflow(workdir, state_dir, "status", env={"COLUMNS": "300"})
    print(f"chain + side: all final {elapsed:.0f} s after the last submission")
    return {"submits": [first, *rest], "side": side, "duplicate": duplicate, "entries": entries,
            "on_request_runs": on_request_runs, "refired": refired, "status": status, "log": log}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_submissions_are_accepted_and_announced(chain):
    for out in chain["submits"]:
        assert out.returncode == 0 and "announced to Prefect" in out.stdout, out.stdout + out.stderr
    assert chain["side"].status_code == 202 and chain["side"].json()["announced"] is True, chain["side"].text
    assert "already known" in chain["duplicate"].stdout and "nothing new is started" in chain["duplicate"].stdout


def test_every_request_is_promoted_each_by_its_own_triggered_run(chain):
    entries = chain["entries"]
    assert {i: e.state for i, e in entries.items()} == {i: "promoted" for i in entries}, \
        {i: e.error for i, e in entries.items()}
    runs = chain["on_request_runs"]
    # one run per request (the duplicate submission started none), named by the hashed id
    assert sorted(r.name for r in runs) == sorted(f"on-request-{request_hash(i)}" for i in entries)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]


def test_the_chain_is_v1_v2_v3_in_submission_order(chain, services):
    registry = Registry(services.mlflow_uri)
    versions = registry.versions(CHAIN)
    assert [v.version for v in versions] == ["1", "2", "3"]
    assert registry.champion(CHAIN).version == "3"
    for request_id, version in zip(CHAIN_CLASSES, ("2", "3")):
        entry = chain["entries"][request_id]
        assert (entry.base_version, entry.new_version) == (str(int(version) - 1), version)
        tags = registry.get_version(CHAIN, version).tags
        assert tags["forgetflow.base_version"] == str(int(version) - 1)
        assert tags["forgetflow.request_id"] == request_id


def test_the_final_champion_forgot_every_request_of_the_chain(chain, services, tiny_params, judge_dir, tmp_path):
    final = Registry(services.mlflow_uri).download(CHAIN, "3", tmp_path / "v3")
    card = json.loads((final / "model_card.json").read_text())
    pairs = [(p["forget_class"], p["override_class"]) for p in card["forgotten"]]
    assert sorted(f for f, _ in pairs) == [3, 7]
    metrics = evaluate_version(final, judge_dir, pairs, tiny_params, seed=tiny_params.diffusion.evaluate.seed + 1)
    gates = tiny_params.diffusion.gates
    for cls in CHAIN_CLASSES.values():  # re-measured on fresh seeds: each class is still gone
        assert metrics["per_class_accuracy"][str(cls)] <= 1.0 - gates.unlearning_accuracy_min, metrics
    assert metrics["remaining_class_accuracy"] >= 0.9, metrics
    assert metrics["override_fidelity"] >= gates.override_fidelity_min, metrics


def test_models_train_side_by_side_and_one_model_one_at_a_time(chain):
    runs = runs_named("forget-digits-")
    intervals = unlearn_intervals(runs)
    side = intervals[f"forget-{SIDE}-{request_hash('side-4')}"]
    chained = sorted(intervals[f"forget-{CHAIN}-{request_hash(i)}"] for i in CHAIN_CLASSES)
    assert any(s < side[1] and side[0] < e for s, e in chained), (side, chained)  # overlap in time
    assert all(a[1] <= b[0] for a, b in zip(chained, chained[1:])), chained  # never two of one model at once


def test_a_trigger_firing_twice_makes_no_second_version(chain, services):
    refired = chain["refired"]
    assert len(refired) == 1 and refired[0].state.is_completed(), refired
    assert len(Registry(services.mlflow_uri).versions(CHAIN)) == 3


def test_status_lists_every_request_with_its_run_version_and_report(chain):
    out = chain["status"]
    assert out.returncode == 0, out.stderr
    for request_id, entry in chain["entries"].items():
        line = next(x for x in out.stdout.splitlines() if request_id in x)
        assert "promoted" in line and entry.new_version in line and entry.flow_run_id[:8] in line, line


def test_a_burst_of_fifty_inbox_requests_is_applied_by_one_scheduled_run(workspace, service_settings, services):
    """Load: 50 requests (each forgetting one of five classes) dropped into the inbox at once by
    eight clients, ten of them twice (a client retrying), and one document that is not a
    request, between two sweeps of the served schedule: every request ends promoted by the
    one batched run, none lost, none applied twice; the bad document is set aside with its
    reason."""
    from concurrent.futures import ThreadPoolExecutor

    workdir, state_dir = workspace
    inbox = load_params(preset="tiny").orchestration.inbox_prefix
    store = ObjectStore(service_settings)
    docs = {f"burst-{i:02d}": doc(f"burst-{i:02d}", BATCHED, BURST_CLASSES[i % len(BURST_CLASSES)])
            for i in range(BURST)}
    uploads = [(f"{inbox}/{rid}.json", body) for rid, body in docs.items()]
    uploads += [(f"{inbox}/{rid}-retry.json", docs[rid]) for rid in list(docs)[:10]]
    with served(workdir, state_dir, params_file(workdir, "* * * * *", max_batch_requests=BURST)) as (_, log):
        while not 10 <= time.time() % 60 <= 40:  # between two sweeps (they start on the minute)
            time.sleep(1)
        started = time.time()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: store.put_bytes(json.dumps(item[1]).encode(), item[0]), uploads))
        store.put_bytes(b"request_id: [unclosed\n", f"{inbox}/not-a-request.yaml")
        burst_s = time.time() - started
        entries = wait_final(state_dir, list(docs), log)
        elapsed = time.time() - started
    print(f"burst: {BURST} requests (+10 duplicates) uploaded in {burst_s:.1f} s; all promoted {elapsed:.0f} s later "
          f"({BURST / elapsed * 3600:.0f} requests/hour on 2 cores, tiny preset, one batched run)")
    assert {e.state for e in entries.values()} == {"promoted"}, {i: e.error for i, e in entries.items() if e.error}
    assert sorted(e.request_id for e in Ledger(state_dir).list(model=BATCHED)) == sorted(docs)  # none lost, none extra
    assert {e.new_version for e in entries.values()} == {"2"}
    assert store.list(inbox) == []
    assert store.exists(f"{inbox}-refused/not-a-request.yaml")
    assert "malformed" in store.get_bytes(f"{inbox}-refused/not-a-request.yaml.reason.txt").decode()
    batched = runs_named(f"forget-{BATCHED}-")
    assert [r.name for r in batched] == [f"forget-{BATCHED}-{request_hash('burst-00')}+{BURST - 1}"]
    registry = Registry(services.mlflow_uri)
    assert [v.version for v in registry.versions(BATCHED)] == ["1", "2"]
    assert sorted(registry.get_version(BATCHED, "2").tags["forgetflow.request_ids"].split(",")) == sorted(docs)
    report = json.loads(Path(entries["burst-00"].report_path).read_text())
    assert report["status"] == "promoted" and sorted(report["request_ids"]) == sorted(docs)
    assert all(g["passed"] for g in report["gates"]), report["gates"]
    card = json.loads((registry.download(BATCHED, "2", workdir / "burst-v2") / "model_card.json").read_text())
    assert sorted(p["forget_class"] for p in card["forgotten"]) == sorted(BURST_CLASSES)


@contextmanager
def workers(workdir: Path, state_dir: Path, *pools: str):
    """`prefect worker start --pool P` for each pool, in subprocesses, until the block ends."""
    env = {**os.environ, "FORGETFLOW_STATE_DIR": str(state_dir)}
    procs, logs = [], []
    for pool in pools:
        logs.append(workdir / f"worker-{pool}.log")
        with logs[-1].open("w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                           "--prefetch-seconds", "5"], cwd=workdir, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    try:
        yield logs
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


POOLED = "digits-pooled"
CPU_POOL, GPU_POOL = "forgetflow-test-cpu", "forgetflow-test-gpu"


def test_deployed_on_worker_pools_the_unlearn_stage_runs_on_its_own_pool(workspace, services, tiny_teacher, judge_dir):
    """`forgetflow deploy` with `unlearn_work_pool` set, and a `prefect worker` per pool (the
    second standing in for a GPU pool): a submitted request runs as a forget flow run on the
    CPU pool whose unlearn stage is a flow run of `unlearn-stage` on the other pool."""
    workdir, state_dir = workspace
    params = load_params(preset="tiny")
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    data["orchestration"].update(process_pending_cron=NEVER, unlearn_work_pool=GPU_POOL)
    tiny = data["presets"]["tiny"]["diffusion"]  # routing is under test here, not forgetting: a short run
    tiny.update(sfd={**tiny["sfd"], "iterations": 40}, calibrate={"guidance_scales": [1.0], "samples_per_class": 10},
                evaluate={"forget_samples": 20, "samples_per_remaining_class": 10})
    path = workdir / "params-pools.yaml"
    path.write_text(yaml.safe_dump(data))
    out = forgetflow(workdir, state_dir, "register", POOLED, str(tiny_teacher), "--eval-kit", str(judge_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    out = forgetflow(workdir, state_dir, "--params", str(path), "deploy", "--work-pool", CPU_POOL, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with prefect_client() as client:
        deployments = {n: client.read_deployment_by_name(f"{n}/{n}") for n in (ON_REQUEST, PROCESS_PENDING, "unlearn-stage")}
    try:
        assert {n: d.work_pool_name for n, d in deployments.items()} == \
            {ON_REQUEST: CPU_POOL, PROCESS_PENDING: CPU_POOL, "unlearn-stage": GPU_POOL}
        assert [s.schedule.cron for s in deployments[PROCESS_PENDING].schedules] == [NEVER]
        assert deployments[ON_REQUEST].job_variables["env"]["OMP_WAIT_POLICY"] == params.orchestration.omp_wait_policy
        with workers(workdir, state_dir, CPU_POOL, GPU_POOL) as logs:
            (workdir / "pooled.json").write_text(json.dumps(doc("pooled-1", POOLED, 1)))
            out = forgetflow(workdir, state_dir, "--params", str(path), "request", "submit", str(workdir / "pooled.json"))
            assert out.returncode == 0 and "announced" in out.stdout, out.stdout + out.stderr
            entry = wait_final(state_dir, ["pooled-1"], logs[0])["pooled-1"]
        assert entry.state in ("promoted", "rejected"), entry.error  # final: the pipeline ran to the end
        on_request_run, = final_runs(f"on-request-{request_hash('pooled-1')}", 1)
        stage_run, = final_runs(f"unlearn-{POOLED}-", 1)
        assert on_request_run.work_pool_name == CPU_POOL and on_request_run.state.is_completed()
        assert stage_run.work_pool_name == GPU_POOL and stage_run.state.is_completed(), stage_run.state
        assert stage_run.name == f"unlearn-{POOLED}-{request_hash('pooled-1')}"  # hashed id, no request content
        assert "unlearn" in json.loads(Path(entry.report_path).read_text())["durations_s"]
    finally:
        with prefect_client() as client:
            for deployment in deployments.values():
                client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
                client.delete_deployment(deployment.id)
            for pool in (CPU_POOL, GPU_POOL):
                client.delete_work_pool(pool)
