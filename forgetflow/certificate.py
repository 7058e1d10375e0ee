"""Certificates of unlearning: a signed, canonical JSON record of what one request did to a
model's weights, verifiable offline with the public key alone.

    body       the facts (request, hashed subjects / classes, model, base and new version with
               the SHA-256 of every weight file, method and parameters, guidance scale, gates,
               evaluation sets by content hash, code and data revisions, timestamps, the
               crypto-shredding event of the request key, final status)
    digests    {field: SHA-256(canonical(body[field]))}
    signature  Ed25519 over canonical(digests), with the public key and its id

Signing the per-field digests, not the body directly, is what lets `verify` name the field a
tamperer changed: the signature proves the digests, each digest proves one field. Canonical
serialisation is JSON with sorted keys, no insignificant whitespace, UTF-8 (RFC 8785's rules
for the values we write: strings, integers, finite floats, booleans, null).

The signing key is Ed25519 (python `cryptography`): PEM in the environment variable
`services.signing_key_env`, else the PEM file `services.signing_key_file`, created on first
use (mode 0600) with its public key beside it (`.pub`), which is what a verifier is handed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from forgetflow.ledger import SHREDDED_EVENT

FORMAT = "forgetflow-certificate/1"
CERTIFICATE_FILE = "certificate.json"
BODY_FIELDS = ("format", "request_id", "request_ids", "status", "model", "family", "forgotten", "base", "new",
               "method", "guidance_scale", "gates", "evaluation", "revisions", "timestamps", "key_shredding")


class CertificateError(ValueError):
    """A certificate that does not verify; the message names the field or file."""


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_hashes(version_dir: Path, skip: tuple[str, ...] = ("parent",)) -> dict[str, str]:
    """SHA-256 of every file of a version directory by relative path, without the
    materialised lineage (`parent/`, which is its own version with its own hashes)."""
    root = Path(version_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in skip)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def tree_hash(hashes: dict[str, str]) -> str:
    """One hash for a set of files (a weight folder, an evaluation set): SHA-256 of the
    canonical {path: sha256} map."""
    return hashlib.sha256(canonical(hashes)).hexdigest()


# ---- keys ------------------------------------------------------------------------------------
def load_signing_key(env_var: str, key_file: Path) -> Ed25519PrivateKey:
    """The private key from `env_var` (PEM), else `key_file` (created if absent)."""
    pem = os.environ.get(env_var)
    if pem:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise CertificateError(f"${env_var} does not hold an Ed25519 private key")
        return key
    key_file = Path(key_file)
    if key_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise CertificateError(f"{key_file} does not hold an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    public_key_path(key_file).write_bytes(public_pem(key.public_key()))
    return key


def public_key_path(key_file: Path) -> Path:
    return Path(str(key_file) + ".pub")


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateError(f"{path}: not an Ed25519 public key")
    return key


# ---- sign / verify ---------------------------------------------------------------------------
def sign(body: dict, key: Ed25519PrivateKey) -> dict:
    missing = [f for f in BODY_FIELDS if f not in body]
    if missing or set(body) - set(BODY_FIELDS):
        raise ValueError(f"certificate body fields: missing {missing}, unknown {sorted(set(body) - set(BODY_FIELDS))}")
    digests = {f: hashlib.sha256(canonical(body[f])).hexdigest() for f in BODY_FIELDS}
    public = key.public_key()
    return {**body, "digests": digests, "signature": {
        "algorithm": "Ed25519", "key_id": key_id(public),
        "public_key": base64.b64encode(_raw(public)).decode(),
        "value": base64.b64encode(key.sign(canonical(digests))).decode()}}


def verify(cert: dict, public_key: Ed25519PublicKey | None = None, model_dir: Path | None = None) -> list[str]:
    """Check a certificate; returns what was checked, raises CertificateError naming the
    first field (or weight file) that does not match. Without `public_key` the embedded key
    is used, which proves integrity only: pass the issuer's key to prove who signed it."""
    checked = []
    try:
        sig, digests = cert["signature"], cert["digests"]
        embedded = Ed25519PublicKey.from_public_bytes(base64.b64decode(sig["public_key"]))
        value = base64.b64decode(sig["value"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CertificateError(f"signature: missing or malformed ({exc})") from None
    if cert.get("format") != FORMAT:
        raise CertificateError(f"format: {cert.get('format')!r} is not {FORMAT!r}")
    key = public_key or embedded
    if public_key is not None and _raw(public_key) != _raw(embedded):
        raise CertificateError(f"signature.public_key: signed by key {key_id(embedded)}, not by the given key "
                               f"{key_id(public_key)}")
    try:
        key.verify(value, canonical(digests))
    except InvalidSignature:
        raise CertificateError("digests: the signature does not match them (the digests or the signature "
                               "were altered)") from None
    checked.append(f"signature: Ed25519, key {key_id(key)}" + ("" if public_key else " (embedded key only)"))
    for field in BODY_FIELDS:
        if field not in cert:
            raise CertificateError(f"{field}: missing")
        if hashlib.sha256(canonical(cert[field])).hexdigest() != digests.get(field):
            raise CertificateError(f"{field}: altered after signing (its digest does not match)")
    if extra := sorted(set(cert) - set(BODY_FIELDS) - {"digests", "signature"}):
        raise CertificateError(f"{extra[0]}: a field the signature does not cover")
    checked.append(f"fields: {len(BODY_FIELDS)} match their signed digests")
    if model_dir is not None:
        expected = (cert.get("new") or {}).get("files") or {}
        actual = weight_hashes(model_dir)
        for name in sorted(set(expected) | set(actual)):
            if name not in actual:
                raise CertificateError(f"new.files[{name}]: missing from {model_dir}")
            if name not in expected:
                raise CertificateError(f"new.files: {model_dir}/{name} is not in the certificate")
            if actual[name] != expected[name]:
                raise CertificateError(f"new.files[{name}]: SHA-256 of {model_dir}/{name} does not match the certificate")
        checked.append(f"weights: {len(actual)} files of {model_dir} match version {cert['new'].get('version')}")
    return checked


def write_certificate(cert: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / CERTIFICATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cert, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def read_certificate(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise CertificateError(f"{path}: not JSON ({exc})") from None


def utc(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def key_file_path(services, state_dir: Path) -> Path:
    """services.signing_key_file, relative to the state folder unless absolute."""
    key_file = Path(services.signing_key_file)
    return key_file if key_file.is_absolute() else Path(state_dir) / key_file


def signing_key(services, state_dir: Path) -> Ed25519PrivateKey:
    """The issuer's key from the services params (environment variable, else key file)."""
    return load_signing_key(services.signing_key_env, key_file_path(services, state_dir))


def _finite(obj):
    """JSON-safe metrics: non-finite floats become null (canonical JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def version_facts(version: str | None, version_dir: Path) -> dict:
    files = weight_hashes(version_dir)
    return {"version": version, "files": files, "sha256": tree_hash(files)}


def certificate_body(*, report: dict, ledger, base_dir: Path, new_dir: Path, eval_kit_dir: Path,
                     eval_kit_uri: str | None, synth_sha256: str | None, card: dict) -> dict:
    """The facts of a final request (promoted or rejected) from its report, its ledger
    entries (submission, shredding events) and the two versions' files."""
    entries = [ledger.get(r) for r in report["request_ids"]]
    shredding = []
    for e in entries:
        at = [ev["at"] for ev in ledger.events(e.request_id) if ev["state"] == SHREDDED_EVENT]
        shredding.append({"request_id": e.request_id, "key_destroyed": e.key_shredded, "at": utc(at[-1] if at else None)})
    new = report.get("metrics", {}).get("new", {})
    kit = weight_hashes(eval_kit_dir) if Path(eval_kit_dir).exists() else {}
    return {
        "format": FORMAT,
        "request_id": report["request_id"],
        "request_ids": report["request_ids"],
        "status": report["status"],
        "model": report["model"],
        "family": report["family"],
        # classes (not personal data) or subjects by salted hash, as the new version's card has them
        "forgotten": card.get("forgotten", []),
        "base": version_facts(report["base_version"], base_dir),
        "new": version_facts(report["new_version"], new_dir),
        "method": {"name": report["method"], "parameters": _finite(card.get("hyperparameters", {}))},
        "guidance_scale": _finite(report.get("guidance_scale")),
        "gates": _finite(report.get("gates") or []),
        "evaluation": {
            "eval_kit": {"uri": eval_kit_uri, "sha256": tree_hash(kit) if kit else None},
            "synthesized_data_sha256": synth_sha256,
            "attacks": _finite(new.get("attacks", {})),  # every attack: rate, n, exact upper95 and interval
            "metrics_new": _finite(new),
        },
        "revisions": report.get("revisions") or {},
        "timestamps": {"submitted": utc(min(e.created for e in entries)), "final": report.get("created"),
                       "certified": utc(time.time())},
        "key_shredding": {
            "scheme": "per-request Fernet key; every sealed copy of the request and its forget data "
                      "(object store, DVC cache and remote) is unreadable once the key is destroyed",
            "requests": shredding,
        },
    }
