"""The embedded services, started for real (no mocks): idempotent up, exact down, refused
keys, fast failure on a dead endpoint, two instances side by side."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from forgetflow import services as svc
from forgetflow.config import load_params
from forgetflow.services import ServiceUnavailable, Settings
from forgetflow.storage import AccessDenied, ObjectStore

pytestmark = pytest.mark.services
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_ports(info: svc.ServiceInfo) -> set[int]:
    ports = set()
    for rec in info.records.values():
        for key, port in rec.ports.items():
            ports.add(port)
            if key not in ("mlflow", "prefect"):
                ports.add(port + 10000)
    return ports


def test_up_is_idempotent(services):
    before = svc.status(services.state_dir)  # a fault test may have restarted a service on its endpoint
    again = svc.up(load_params(), services.state_dir)
    assert again.started == ()
    assert again.pids == before.pids
    assert (again.s3_endpoint, again.mlflow_uri) == (services.s3_endpoint, services.mlflow_uri)
    assert svc.status(services.state_dir).pids == before.pids


def test_every_port_is_loopback_and_distinct(services):
    running = svc.status(services.state_dir)  # the processes now (a fault test restarts two of them)
    ports = _all_ports(running)
    assert len(ports) == 10  # master, volume, filer, s3 (+ their gRPC ports), mlflow and prefect
    for pid in running.pids.values():
        proc = psutil.Process(pid)
        listening = [c for p in [proc, *proc.children(recursive=True)] for c in p.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
        assert listening
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
        assert {c.laddr.port for c in listening} <= ports


def test_credentials_are_private_and_not_recorded(services):
    state = Path(services.state_dir)
    creds = state / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "s3-identities.json").stat().st_mode) == 0o600
    assert services.secret_key and services.secret_key not in (state / "services.json").read_text()
    assert json.loads(creds.read_text())["access_key"] == services.access_key
    assert services.secret_key not in repr(services) and services.secret_key not in repr(services.settings())
    # the client environment points at the local services
    assert os.environ["AWS_ENDPOINT_URL_S3"] == services.s3_endpoint
    assert os.environ["MLFLOW_TRACKING_URI"] == services.mlflow_uri
    assert os.environ["PREFECT_API_URL"] == services.prefect_api_url


def test_wrong_keys_are_refused(services, service_settings):
    good = ObjectStore(service_settings)
    good.put_bytes(b"secret data", "refusal/probe.txt")
    wrong_secret = Settings(services.s3_endpoint, services.bucket, services.access_key, "not-the-secret",
                            services.mlflow_uri)
    unknown_key = Settings(services.s3_endpoint, services.bucket, "AKIAUNKNOWN0000", "whatever", services.mlflow_uri)
    for settings in (wrong_secret, unknown_key):
        store = ObjectStore(settings)
        with pytest.raises(AccessDenied, match="refused"):
            store.get_bytes("refusal/probe.txt")
        with pytest.raises(AccessDenied):
            store.put_bytes(b"overwrite", "refusal/probe.txt")
        with pytest.raises(AccessDenied):
            store.list("refusal")
    # and anonymous HTTP gets nothing either
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{services.s3_endpoint}/{services.bucket}/refusal/probe.txt", timeout=5)
    assert err.value.code == 403
    assert good.get_bytes("refusal/probe.txt") == b"secret data"


def test_dead_endpoints_fail_fast_with_a_clear_message(tmp_path):
    from forgetflow.registry import Registry

    dead = f"http://127.0.0.1:{_free_port()}"
    store = ObjectStore(Settings(dead, "forgetflow", "key", "secret", dead))
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=f"object store at {dead} is not reachable"):
        store.get_bytes("any/key")
    with pytest.raises(ServiceUnavailable, match=f"object store at {dead} is not reachable"):
        store.list("any")
    with pytest.raises(ServiceUnavailable, match=f"MLflow at {dead} is not reachable"):
        Registry(dead)
    assert time.monotonic() - start < 5

    # a state dir whose recorded services are gone: resolve_settings says so and what to do
    port = int(dead.rsplit(":", 1)[1])
    (tmp_path / "services.json").write_text(json.dumps({"services": {
        "seaweedfs": {"pid": 1, "create_time": 0.0, "ports": {"s3": port}, "endpoint": dead, "log": "x", "cmd": []},
        "mlflow": {"pid": 1, "create_time": 0.0, "ports": {"mlflow": port}, "endpoint": dead, "log": "x", "cmd": []}},
        "credentials_source": "file"}))
    (tmp_path / "credentials.json").write_text(json.dumps({"access_key": "k", "secret_key": "s"}))
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        with pytest.raises(ServiceUnavailable, match=rf"object store at {dead} is not reachable; run `forgetflow up`"):
            svc.resolve_settings(load_params(), tmp_path)
    assert svc.status(tmp_path) is None
    assert svc.down(tmp_path) == []  # pid 1 is not ours: never signalled


def test_environment_wins_over_local_services(services, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", services.s3_endpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_uri)
    monkeypatch.setenv("FORGETFLOW_BUCKET", "elsewhere")
    settings = svc.resolve_settings(load_params(), Path("/nonexistent/state"))
    assert settings.bucket == "elsewhere" and settings.mlflow_uri == services.mlflow_uri
    assert settings.access_key == services.access_key  # from AWS_ACCESS_KEY_ID


def test_second_instance_in_parallel_outlives_its_starter_and_down_stops_exactly_it(services, tmp_path):
    """`forgetflow up` in a process that exits: its servers keep running next to the
    session's; `down` stops exactly them."""
    state = tmp_path / "second"
    session = svc.status(services.state_dir)
    script = textwrap.dedent(f"""
        import json
        from forgetflow import services
        from forgetflow.config import load_params
        info = services.up(load_params(), {str(state)!r})
        print(json.dumps({{"pids": info.pids, "s3": info.s3_endpoint}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_API"))}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    started = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        second = svc.status(state)
        assert second is not None, "the servers died with the process that started them"
        assert second.pids == started["pids"]
        assert not _all_ports(second) & _all_ports(session)
        assert second.access_key != services.access_key
        store = ObjectStore(second.settings())
        store.put_bytes(b"second", "x/y")
        assert store.get_bytes("x/y") == b"second"
        assert not ObjectStore(services.settings()).exists("x/y")
    finally:
        stopped = svc.down(state)
    assert sorted(stopped) == ["mlflow", "prefect", "seaweedfs"]
    for pid in started["pids"].values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert svc.status(state) is None
    assert svc.down(state) == []
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        with pytest.raises(ServiceUnavailable, match=rf"{started['s3']} is not reachable.*run `forgetflow up`"):
            svc.resolve_settings(load_params(), state)
    # the session's services were not touched
    assert all(psutil.pid_exists(pid) for pid in session.pids.values())
    assert svc.status(services.state_dir).pids == session.pids


def test_only_unreachable_services_count_as_transient():
    """What the stages retry (tasks/common.py retry_if_transient): a service that did not
    answer, however deep in the chain of causes; never a bad request or a corrupt artifact."""
    from mlflow.exceptions import MlflowException

    from forgetflow.families import TargetError
    from forgetflow.services import is_transient
    from forgetflow.storage import CorruptArtifact

    def raised_from(cause: BaseException) -> RuntimeError:
        try:
            raise RuntimeError("stage failed") from cause
        except RuntimeError as exc:
            return exc

    assert is_transient(ServiceUnavailable("object store at http://127.0.0.1:9 is not reachable"))
    assert is_transient(raised_from(ConnectionRefusedError(111, "Connection refused")))
    assert is_transient(MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/get failed with "
                                        "exception HTTPConnectionPool(...): Max retries exceeded"))
    assert not is_transient(TargetError("class 12 is not in model digits"))
    assert not is_transient(raised_from(CorruptArtifact("step-00000040/state.pt: content does not match")))
    assert not is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: run abc not found"))
    assert not is_transient(None)
