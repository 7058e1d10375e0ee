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
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.cli import forgetflow

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["orchestration"].update(work_pool_type="kubernetes", unlearn_work_pool="forgetflow-k8s-gpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = forgetflow(tmp_path, Path(services.state_dir), "--params", str(tmp_path / "params.yaml"), "deploy",
                     "--work-pool", "forgetflow-k8s")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # this process's client on the session's server (Prefect read its settings at import)
    with temporary_settings(updates={PREFECT_API_URL: services.settings().prefect_api_url}), \
            get_client(sync_client=True) as client:
        # explicit limit and sort: this server answers 422 to the client's null defaults
        deployments = [d for d in client.read_deployments(limit=100, sort=DeploymentSort.NAME_ASC)
                       if d.work_pool_name in ("forgetflow-k8s", "forgetflow-k8s-gpu")]
        pool, gpu_pool = client.read_work_pool("forgetflow-k8s"), client.read_work_pool("forgetflow-k8s-gpu")
        try:
            assert pool.type == gpu_pool.type == "kubernetes"
            assert pool.base_job_template["variables"]["properties"]["namespace"]["default"] == "forgetflow"
            # the unlearn stage alone on the GPU pool, whose jobs request a GPU
            assert {(d.name, d.work_pool_name) for d in deployments} == {
                ("unlearn-on-request", "forgetflow-k8s"), ("process-pending", "forgetflow-k8s"),
                ("unlearn-stage", "forgetflow-k8s-gpu")}
            assert "nvidia.com/gpu" in json.dumps(gpu_pool.base_job_template)
            assert "nvidia.com/gpu" not in json.dumps(pool.base_job_template)
            for d in deployments:
                assert d.job_variables["image"] == "forgetflow-worker:latest" and not d.pull_steps
                assert ":" not in d.entrypoint  # a module path: the code comes from the image
                assert d.name == "unlearn-stage" or d.parameters["state_dir"] == "/var/lib/forgetflow"
        finally:  # nothing of this test may react to the session's later request events
            for d in deployments:
                client.delete_resource_owned_automations(f"prefect.deployment.{d.id}")
                client.delete_deployment(d.id)
            client.delete_work_pool("forgetflow-k8s")
            client.delete_work_pool("forgetflow-k8s-gpu")
