"""infra/ is checked by the tools its users run, without a cluster: the manifests validate
against the Kubernetes schemas (kubernetes-validate, offline), the worker image definition
lints clean (hadolint), the Kubernetes work pools' job templates render to valid Jobs (the
GPU one requesting a GPU), and `forgetflow deploy` registers the deployments on a
Kubernetes-type work pool of a real Prefect server."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.diffusion_fixtures import tiny_params, untrained_version  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33.0"
MANIFESTS = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schemas(path):
    for doc in _docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises naming the field


def test_the_manifests_hold_every_service_and_no_secret_value():
    kinds = {(d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in _docs(p)}
    for wanted in [("StatefulSet", "postgres"), ("StatefulSet", "seaweedfs"), ("Deployment", "mlflow"),
                   ("Deployment", "prefect-server"), ("Deployment", "prefect-worker"),
                   ("Deployment", "prefect-worker-gpu"), ("PersistentVolumeClaim", "forgetflow-state")]:
        assert wanted in kinds
    mlflow = next(d for p in MANIFESTS for d in _docs(p) if d["metadata"]["name"] == "mlflow" and d["kind"] == "Deployment")
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "$MLFLOW_BACKEND_STORE_URI" in args and "s3://" in args  # PostgreSQL backend, S3 artifacts
    secrets = [d for p in MANIFESTS for d in _docs(p) if d["kind"] == "Secret"]
    assert secrets and all("CHANGE-ME" in json.dumps(s["stringData"]) for s in secrets)


def test_the_worker_image_definition_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "infra" / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _render(template: dict) -> dict:
    from prefect.utilities.templating import apply_values

    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    # the worker splits the command into args itself (KubernetesWorkerJobConfiguration)
    defaults.update(name="forget-support-llm-0a1b2c", command=["prefect", "flow-run", "execute"])
    job = apply_values(template["job_configuration"], defaults, remove_notset=True)["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]  # as the worker does
    return _without_nulls(job)


def _without_nulls(obj):
    """Unset template variables render as null, which the API server reads as absent."""
    if isinstance(obj, dict):
        return {k: _without_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_without_nulls(v) for v in obj]
    return obj


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_work_pool_job_templates_render_to_valid_jobs(gpus):
    from flows.work_pools import STATE_CLAIM, STATE_DIR, job_template

    job = _render(job_template(gpus))
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["metadata"]["namespace"] == "forgetflow"
    assert {"name": "state", "mountPath": STATE_DIR} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == STATE_CLAIM
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == bool(gpus)


@pytest.mark.slow
@pytest.mark.services
def test_deploy_registers_the_deployments_on_a_kubernetes_work_pool(services, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.sorting import DeploymentSort

    from tests.cli import forgetflow

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["orchestration"]["work_pool_type"] = "kubernetes"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = forgetflow(tmp_path, Path(services.state_dir), "--params", str(tmp_path / "params.yaml"), "deploy",
                     "--work-pool", "forgetflow-k8s")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("forgetflow-k8s")
        assert pool.type == "kubernetes"
        assert pool.base_job_template["variables"]["properties"]["namespace"]["default"] == "forgetflow"
        # explicit limit and sort: this server answers 422 to the client's null defaults
        deployments = [d for d in client.read_deployments(limit=100, sort=DeploymentSort.NAME_ASC)
                       if d.work_pool_name == "forgetflow-k8s"]
    assert {d.name for d in deployments} == {"unlearn-on-request", "process-pending"}
    for d in deployments:
        assert d.job_variables["image"] == "forgetflow-worker:latest" and not d.pull_steps
        assert ":" not in d.entrypoint  # a module path: the code comes from the image
        assert d.parameters["state_dir"] == "/var/lib/forgetflow"


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL (Debian's package) on a free loopback port with password auth;
    yields its URI for a database `mlflow`. Run as the `postgres` user when we are root."""
    import os
    import socket
    import tempfile

    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        pytest.skip("Debian's postgresql package is not installed (`make system-packages` installs it)")
    bin_dir = bins[-1]
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="forgetflow-pg-"))  # outside pytest's root-only tmp
    password = os.urandom(12).hex()
    (root / "pw").write_text(password)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")

    def pg(*cmd: str, **kw):
        return subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, text=True, timeout=120, **kw)

    pg(str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "forgetflow", f"--pwfile={root / 'pw'}",
       "--auth-local=scram-sha-256", "--auth-host=scram-sha-256")
    pg(str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
       f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        env = {**os.environ, "PGPASSWORD": password}
        pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "forgetflow", "mlflow", env=env)
        yield f"postgresql://forgetflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.services
def test_mlflow_keeps_runs_and_the_registry_in_postgresql(postgres, untrained_version, tmp_path, monkeypatch):
    """The production backend, not only sqlite: `up` with FORGETFLOW_MLFLOW_BACKEND_URI set
    runs MLflow on PostgreSQL; a version is registered, aliased and downloaded, and its row
    is in PostgreSQL; the password is on no command line and in no state file."""
    import psycopg2

    from forgetflow import services as svc
    from forgetflow.config import Params, load_params
    from forgetflow.registry import Registry
    from tests.conftest import CLIENT_VARS

    raw = load_params().model_dump()
    raw["services"]["prefect_server"] = False
    params = Params.model_validate(raw)
    for var in CLIENT_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(params.services.mlflow_backend_env, postgres)
    state = tmp_path / "state"
    info = svc.up(params, state)
    try:
        for key, value in svc.client_env(info).items():
            monkeypatch.setenv(key, value)
        registry = Registry(info.mlflow_uri)
        version = registry.register("digits-pg", untrained_version)
        registry.set_alias("digits-pg", "champion", version)
        assert registry.alias_version("digits-pg", "champion") == version
        got = registry.download("digits-pg", version, tmp_path / "download")
        assert (got / "model_card.json").read_text() == (untrained_version / "model_card.json").read_text()
        with psycopg2.connect(postgres) as db, db.cursor() as cur:
            cur.execute("SELECT name, version FROM model_versions")
            assert ("digits-pg", int(version)) in cur.fetchall()
        assert not (state / "mlflow.db").exists()
        password = postgres.split(":")[2].split("@")[0]
        assert all(password not in p.read_text(errors="ignore") for p in state.rglob("*.json"))
        assert password not in " ".join(json.loads((state / "services.json").read_text())["services"]["mlflow"]["cmd"])
    finally:
        svc.down(state, timeout_s=2.0)
