"""Base job templates of forgetflow's Kubernetes work pools (infra/k8s/), derived from
prefect-kubernetes's own default template so they follow it across versions.

    forgetflow-k8s       CPU pods: intake, synthesize, calibrate, evaluate, promote
    forgetflow-k8s-gpu   the same pod plus `nvidia.com/gpu` and a GPU toleration: unlearn

Every job pod runs the worker image (infra/docker/Dockerfile), reads credentials from the
namespace's secrets (infra/k8s/01-secrets.example.yaml), finds the services by their
Kubernetes names, and mounts the shared state volume (ledger, request keys, run folders) at
FORGETFLOW_STATE_DIR, so stages that run in different pods see one state.
"""
from __future__ import annotations

import copy

NAMESPACE = "forgetflow"
IMAGE = "forgetflow-worker:latest"
STATE_DIR = "/var/lib/forgetflow"
STATE_CLAIM = "forgetflow-state"
SERVICE_ENV = {  # the in-cluster addresses of infra/k8s/{20-seaweedfs,30-mlflow,40-prefect-server}.yaml
    "AWS_ENDPOINT_URL_S3": "http://seaweedfs:8333",
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "PREFECT_API_URL": "http://prefect-server:4200/api",
    "FORGETFLOW_STATE_DIR": STATE_DIR,
}
SECRETS = ("forgetflow-s3", "forgetflow-app")


def job_template(gpus: int = 0) -> dict:
    """The pool's base job template; `gpus` > 0 requests that many NVIDIA GPUs per job."""
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    props = template["variables"]["properties"]
    props["namespace"]["default"] = NAMESPACE
    props["image"]["default"] = IMAGE
    props["service_account_name"]["default"] = "default"
    props["env"]["default"] = dict(SERVICE_ENV)
    job = template["job_configuration"]["job_manifest"]["spec"]
    pod = job["template"]["spec"]
    # prefect-kubernetes's default puts these Job fields in the pod spec, where the API server
    # drops them with a warning (and a strict schema check fails): they belong to the Job
    for key in ("completions", "parallelism"):
        if key in pod:
            job[key] = pod.pop(key)
    container = pod["containers"][0]
    container["envFrom"] = [{"secretRef": {"name": name}} for name in SECRETS]
    container["volumeMounts"] = [{"name": "state", "mountPath": STATE_DIR}]
    pod["volumes"] = [{"name": "state", "persistentVolumeClaim": {"claimName": STATE_CLAIM}}]
    if gpus:
        props["gpu_count"] = {"title": "GPUs", "description": "NVIDIA GPUs per job (nvidia.com/gpu).",
                              "type": "integer", "default": gpus}
        container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return template
