"""Shared fixtures. Service fixtures start the REAL embedded services (SeaweedFS + MLflow
server) once per test session, on free loopback ports, in a temporary state directory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Prefect: an isolated home for the whole session, set before anything imports prefect
# (test modules are imported after this conftest). Analytics off silences a harmless
# "database is locked" trace in ephemeral mode.
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="forgetflow-test-prefect-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

# Variables through which a developer's own environment could point the tests at real
# infrastructure (AWS S3, a shared MLflow) or hand its keys to the local store.
CLIENT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI",
               "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "FORGETFLOW_BUCKET", "PREFECT_API_URL")


@pytest.fixture(scope="session", autouse=True)
def _isolated_prefect_home():
    os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    yield _PREFECT_HOME
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """The local object store, MLflow server and Prefect server (forgetflow.services.up) for the session; the
    client environment points at them while the session runs and is restored after. The
    processes are stopped at the end, also when start-up failed half-way. A fault test may
    stop and restart a service on the same endpoint: read the processes running now with
    `forgetflow.services.status(info.state_dir)`, not this object's pids."""
    from forgetflow import services as svc
    from forgetflow.config import load_params

    params = load_params()
    state = tmp_path_factory.mktemp("services")
    with pytest.MonkeyPatch.context() as mp:
        for var in CLIENT_VARS:
            mp.delenv(var, raising=False)
        try:
            info = svc.up(params, state)
            for key, value in svc.client_env(info).items():
                mp.setenv(key, value)
            yield info
        finally:
            svc.down(state, timeout_s=2.0)


@pytest.fixture(scope="session")
def service_settings(services):
    """forgetflow.services.Settings of the session's services."""
    return services.settings()


@pytest.fixture
def object_store(service_settings):
    from forgetflow.storage import ObjectStore

    return ObjectStore(service_settings)


@pytest.fixture
def registry(services):
    from forgetflow.registry import Registry

    return Registry(services.mlflow_uri)
