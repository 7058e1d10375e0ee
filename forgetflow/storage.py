"""The object store (S3 API via boto3): files, directories with hash manifests, checkpoints.

Any S3-compatible store works (the embedded SeaweedFS, a SeaweedFS cluster, AWS S3): the
endpoint, bucket and keys come from `forgetflow.services.resolve_settings`.

A directory is uploaded with a `manifest.json` (relative path -> SHA-256 and size of every
file) written LAST, so a directory without a manifest is an incomplete upload; `get_dir`
verifies every file against it and raises `CorruptArtifact` naming the file otherwise.

Checkpoint layout (DESIGN.md "S3 layout"):
    s3://<bucket>/<model>/<request_id>/checkpoints/step-<00000040>/...   (8 digits: listing sorts)
    s3://<bucket>/<model>/<request_id>/final/...
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from forgetflow.services import ServiceUnavailable, Settings

MANIFEST = "manifest.json"
_MB = 1024 * 1024


class CorruptArtifact(ValueError):
    """A stored directory does not match its manifest (or has none); the message names the file."""


class AccessDenied(ServiceUnavailable):
    """The object store refused the credentials."""


def sha256_file(path: Path, chunk: int = 4 * _MB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class ObjectStore:
    """A bucket of the configured store. Keys may be given as `a/b/c` (in settings.bucket) or
    as full `s3://bucket/a/b/c` URIs.

    Connect timeouts are short and retries bounded, so a dead store fails in seconds with
    ServiceUnavailable naming the endpoint (not after minutes of retries)."""

    def __init__(self, settings: Settings, *, connect_timeout: float = 3.0, read_timeout: float = 60.0,
                 max_attempts: int = 3):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.settings = settings
        self._options = {"connect_timeout": connect_timeout, "read_timeout": read_timeout, "max_attempts": max_attempts}
        self.bucket = settings.bucket
        self.endpoint = settings.s3_endpoint
        config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                        retries={"max_attempts": max_attempts, "mode": "standard"}, signature_version="s3v4",
                        s3={"addressing_style": "path"} if settings.s3_endpoint else {})
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint, aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key, region_name=settings.region, config=config)
        self.transfer = TransferConfig(multipart_threshold=8 * _MB, multipart_chunksize=8 * _MB, max_concurrency=4)
        self.client.meta.events.register_first("needs-retry.s3", self._refused_is_final)

    def __reduce__(self):
        """Pickled as its settings (a training process on another rank opens its own client)."""
        return _store_from, (self.settings, self._options)

    def _refused_is_final(self, caught_exception=None, **_) -> None:
        """A refused connection means nothing listens there (a stopped store): fail at once
        instead of retrying with back-off (timeouts and 5xx are still retried)."""
        from botocore.exceptions import EndpointConnectionError

        if isinstance(caught_exception, EndpointConnectionError) and "refused" in repr(
                caught_exception.kwargs.get("error", caught_exception)).lower():
            raise ServiceUnavailable(f"object store at {self.where} is not reachable (connection refused); "
                                     f"run `forgetflow up` or check AWS_ENDPOINT_URL_S3") from caught_exception

    # ---- addressing ---------------------------------------------------------------------
    def _loc(self, key: str) -> tuple[str, str]:
        key = str(key)
        if key.startswith("s3://"):
            bucket, _, rest = key[5:].partition("/")
            return bucket, rest.strip("/")
        return self.bucket, key.strip("/")

    def uri(self, key: str) -> str:
        bucket, k = self._loc(key)
        return f"s3://{bucket}/{k}" if k else f"s3://{bucket}"

    @property
    def where(self) -> str:
        return self.endpoint or "AWS S3"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate boto errors: unreachable -> ServiceUnavailable, refused keys -> AccessDenied,
        missing object -> FileNotFoundError; each names the endpoint / object."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (ClientError, ConnectionError as BotoConnectionError, NoCredentialsError,
                                         ReadTimeoutError)

        try:
            yield
        except (BotoConnectionError, ReadTimeoutError) as exc:
            raise ServiceUnavailable(f"object store at {self.where} is not reachable ({type(exc).__name__}) "
                                     f"while accessing {what}; run `forgetflow up` or check AWS_ENDPOINT_URL_S3") from exc
        except NoCredentialsError as exc:
            raise AccessDenied(f"no credentials for the object store at {self.where}: set AWS_ACCESS_KEY_ID/"
                               f"AWS_SECRET_ACCESS_KEY or a profile, or run `forgetflow up`") from exc
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
                        "InvalidToken", "ExpiredToken"):
                raise AccessDenied(f"object store at {self.where} refused access to {what} ({code}) for access key "
                                   f"{self.settings.access_key or '(from profile)'}") from exc
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{what} does not exist in the object store at {self.where}") from exc
            if code == "NoSuchBucket":
                raise FileNotFoundError(f"bucket of {what} does not exist at {self.where} (run `forgetflow up`, "
                                        f"which creates it)") from exc
            raise
        except S3UploadFailedError as exc:
            text = str(exc)
            if any(c in text for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")):
                raise AccessDenied(f"object store at {self.where} refused the upload of {what}: {text}") from exc
            if "Could not connect" in text or "Connect timeout" in text:
                raise ServiceUnavailable(f"object store at {self.where} is not reachable while uploading {what}; "
                                         f"run `forgetflow up`") from exc
            raise

    # ---- objects ------------------------------------------------------------------------
    def put_file(self, local_path: str | Path, key: str) -> str:
        bucket, k = self._loc(key)
        with self._errors(self.uri(key)):
            self.client.upload_file(str(local_path), bucket, k, Config=self.transfer)
        return self.uri(key)

    def get_file(self, key: str, local_path: str | Path) -> Path:
        bucket, k = self._loc(key)
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.part")
        try:
            with self._errors(self.uri(key)):
                self.client.download_file(bucket, k, str(tmp), Config=self.transfer)
            os.replace(tmp, local_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return local_path

    def put_bytes(self, data: bytes, key: str) -> str:
        bucket, k = self._loc(key)
        with self._errors(self.uri(key)):
            self.client.put_object(Bucket=bucket, Key=k, Body=data)
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        bucket, k = self._loc(key)
        with self._errors(self.uri(key)):
            return self.client.get_object(Bucket=bucket, Key=k)["Body"].read()

    def exists(self, key: str) -> bool:
        bucket, k = self._loc(key)
        try:
            with self._errors(self.uri(key)):
                self.client.head_object(Bucket=bucket, Key=k)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (a folder: `a/b` lists `a/b/...`, not `a/bc`), sorted; keys are
        relative to the bucket (s3:// prefixes are listed in their own bucket)."""
        bucket, p = self._loc(prefix)
        p = f"{p}/" if p else ""
        keys: list[str] = []
        with self._errors(self.uri(prefix)):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=p):
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(keys)

    def list_dirs(self, prefix: str) -> list[str]:
        """The immediate sub-folder names under `prefix`, sorted."""
        bucket, p = self._loc(prefix)
        p = f"{p}/" if p else ""
        names: list[str] = []
        with self._errors(self.uri(prefix)):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=p, Delimiter="/"):
                names += [c["Prefix"][len(p):].strip("/") for c in page.get("CommonPrefixes", [])]
        return sorted(names)

    def delete(self, key: str) -> None:
        """Delete one object (no error if it is already gone)."""
        bucket, k = self._loc(key)
        with self._errors(self.uri(key)):
            self.client.delete_object(Bucket=bucket, Key=k)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix` (a folder); returns how many."""
        bucket, _ = self._loc(prefix)
        keys = self.list(prefix)
        with self._errors(self.uri(prefix)):
            for i in range(0, len(keys), 1000):
                batch = keys[i:i + 1000]
                resp = self.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                          "Quiet": True})
                for err in resp.get("Errors", []):  # fall back one by one
                    self.client.delete_object(Bucket=bucket, Key=err["Key"])
        return len(keys)

    # ---- directories --------------------------------------------------------------------
    def put_dir(self, local_dir: str | Path, prefix: str) -> dict:
        """Upload every file under local_dir to prefix/, then prefix/manifest.json listing each
        file's SHA-256 and size (written last: no manifest = incomplete upload). Returns the
        manifest. Uploading again replaces the manifest (stale extra objects are ignored by get_dir)."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir} is not a directory")
        files: dict[str, dict] = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if rel == MANIFEST:
                raise ValueError(f"{local_dir} contains a file named {MANIFEST}, which the store reserves")
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            self.put_file(path, self._child(prefix, rel))
        manifest = {"format": "forgetflow-manifest/1", "created": time.time(), "files": files}
        self.put_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode(), self._child(prefix, MANIFEST))
        return manifest

    def _child(self, prefix: str, rel: str) -> str:
        return f"{prefix.rstrip('/')}/{rel}" if prefix.startswith("s3://") else _join(prefix, rel)

    def manifest(self, prefix: str) -> dict:
        try:
            raw = self.get_bytes(self._child(prefix, MANIFEST))
        except FileNotFoundError as exc:
            raise CorruptArtifact(f"{self.uri(prefix)}: no {MANIFEST} (missing or incomplete upload)") from exc
        try:
            manifest = json.loads(raw)
            files = manifest["files"]
            assert isinstance(files, dict)
        except (ValueError, KeyError, AssertionError) as exc:
            raise CorruptArtifact(f"{self.uri(prefix)}/{MANIFEST} is not a valid manifest") from exc
        return manifest

    def get_dir(self, prefix: str, local_dir: str | Path) -> Path:
        """Download the directory at prefix into local_dir and verify every file's size and
        SHA-256 against the manifest; CorruptArtifact names the first file that differs or is
        missing. Files are downloaded into a temporary folder next to local_dir and moved into
        place only once all are verified."""
        local_dir = Path(local_dir)
        manifest = self.manifest(prefix)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", dir=local_dir.parent))
        try:
            for rel, meta in sorted(manifest["files"].items()):
                if rel.startswith("/") or ".." in Path(rel).parts:
                    raise CorruptArtifact(f"{self.uri(prefix)}: manifest names an unsafe path {rel!r}")
                target = staging / rel
                try:
                    self.get_file(self._child(prefix, rel), target)
                except FileNotFoundError as exc:
                    raise CorruptArtifact(f"{self.uri(self._child(prefix, rel))}: listed in the manifest but "
                                          f"missing from the store") from exc
                size, digest = target.stat().st_size, sha256_file(target)
                if size != meta.get("size") or digest != meta.get("sha256"):
                    raise CorruptArtifact(f"{self.uri(self._child(prefix, rel))}: content does not match the "
                                          f"manifest (sha256 {digest[:12]}..., size {size}; expected "
                                          f"{str(meta.get('sha256'))[:12]}..., size {meta.get('size')})")
            local_dir.mkdir(parents=True, exist_ok=True)
            move_into(staging, local_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return local_dir


def move_into(staging: Path, dst: Path) -> None:
    """Move every entry of `staging` into `dst`, replacing what is there under the same name
    (a download lands whole, after verification, never half-written)."""
    for item in staging.iterdir():
        target = dst / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(item, target)


def _store_from(settings: Settings, options: dict) -> "ObjectStore":
    return ObjectStore(settings, **options)


class S3CheckpointSink:
    """forgetflow.checkpoints.CheckpointSink on the object store:
    `<model>/<request_id>/checkpoints/step-<8 digits>/` each with its manifest (a checkpoint
    without one was interrupted mid-upload and is not a checkpoint)."""

    _STEP = re.compile(r"^step-(\d+)$")

    def __init__(self, store: ObjectStore, model: str, request_id: str, *, cache_dir: str | Path | None = None):
        self.store = store
        self.model = model
        self.request_id = request_id
        self.root = _join(model, request_id)
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tmp": None}  # a copy in another process keeps its own local copies

    def step_prefix(self, step: int) -> str:
        return _join(self.root, "checkpoints", f"step-{int(step):08d}")

    def save(self, step: int, local_dir: Path) -> None:
        self.store.put_dir(Path(local_dir), self.step_prefix(step))

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (manifest present), ascending."""
        names = self.store.list_dirs(_join(self.root, "checkpoints"))
        steps = sorted(int(m.group(1)) for n in names if (m := self._STEP.match(n)))
        return [s for s in steps if self.store.exists(_join(self.step_prefix(s), MANIFEST))]

    def latest(self) -> tuple[int, Path] | None:
        """(step, local copy) of the newest complete checkpoint, verified against its manifest;
        a corrupted newest checkpoint raises CorruptArtifact (never silently loaded or skipped).
        The copy lives in cache_dir, else in a temporary folder owned by this sink (removed
        when the sink is garbage-collected)."""
        steps = self.steps()
        if not steps:
            return None
        step = steps[-1]
        base = self._cache_dir
        if base is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix=f"forgetflow-ckpt-{self.request_id}-")
            base = Path(self._tmp.name)
        dest = base / f"step-{step:08d}"
        if dest.exists():
            shutil.rmtree(dest)
        self.store.get_dir(self.step_prefix(step), dest)
        return step, dest

    def save_final(self, local_dir: Path) -> str:
        """Upload the final model directory to `<model>/<request_id>/final/`; returns its s3:// URI."""
        prefix = _join(self.root, "final")
        self.store.put_dir(Path(local_dir), prefix)
        return self.store.uri(prefix)


__all__ = ["ObjectStore", "S3CheckpointSink", "CorruptArtifact", "AccessDenied", "MANIFEST", "sha256_file"]
