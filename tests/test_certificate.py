"""Certificates of unlearning verify offline with the public key alone, and every kind of
tampering fails with a message naming the field or the weight file."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forgetflow.certificate import (BODY_FIELDS, CertificateError, load_signing_key, public_key_path, read_certificate,
                                    read_public_key, sign, verify, version_facts, write_certificate)


@pytest.fixture
def version_dir(tmp_path):
    d = tmp_path / "new"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (d / "model_card.json").write_text(json.dumps({"kind": "adapter"}))
    (d / "parent").mkdir()  # the materialised lineage is its own version, not hashed here
    (d / "parent" / "weights.bin").write_bytes(b"parent")
    return d


def _body(version_dir):
    return {
        "format": "forgetflow-certificate/1", "request_id": "forget-3", "request_ids": ["forget-3"],
        "status": "promoted", "model": "support-llm", "family": "llm",
        "forgotten": [{"subject": "a1b2c3d4e5f6", "fields": ["email", "phone"]}],
        "base": {"version": "1", "files": {"w": "00" * 32}, "sha256": "11" * 32},
        "new": version_facts("2", version_dir),
        "method": {"name": "cfg-orpo", "parameters": {"lr": 0.001, "lora_r": 4}},
        "guidance_scale": 1.5,
        "gates": [{"name": "leak_rate", "value": 0.0, "threshold": 0.02, "kind": "max", "passed": True}],
        "evaluation": {"eval_kit": {"uri": "eval-kits/x", "sha256": "22" * 32}, "attacks": ["direct", "prefix"]},
        "revisions": {"git": "abc", "git_dirty": False, "dvc_lock": None},
        "timestamps": {"submitted": "2026-12-03T10:00:00Z", "final": "2026-12-03T10:20:00Z"},
        "key_shredding": {"scheme": "per-request key", "requests": [
            {"request_id": "forget-3", "key_destroyed": True, "at": "2026-12-03T10:20:01Z"}]},
    }


@pytest.fixture
def issuer(tmp_path):
    key_file = tmp_path / "state" / "certificate_key.pem"
    return load_signing_key("FORGETFLOW_TEST_NO_SUCH_VAR", key_file), key_file


def test_a_signed_certificate_verifies_with_the_issuers_key_and_the_weights(issuer, version_dir, tmp_path):
    key, key_file = issuer
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    cert = sign(_body(version_dir), key)
    path = write_certificate(cert, tmp_path / "report")
    checked = verify(read_certificate(path), read_public_key(public_key_path(key_file)), version_dir)
    assert any("Ed25519" in c for c in checked) and any("2 files" in c and "match version 2" in c for c in checked)
    # the same key is loaded again, not replaced
    again = load_signing_key("FORGETFLOW_TEST_NO_SUCH_VAR", key_file)
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


@pytest.mark.parametrize("field,change", [
    ("status", lambda c: c.update(status="rejected")),
    ("new", lambda c: c["new"].update(version="3")),
    ("gates", lambda c: c["gates"][0].update(value=0.5)),
    ("key_shredding", lambda c: c["key_shredding"]["requests"][0].update(key_destroyed=False)),
    ("guidance_scale", lambda c: c.update(guidance_scale=1.0)),
])
def test_a_tampered_field_is_named(issuer, version_dir, field, change):
    cert = sign(_body(version_dir), issuer[0])
    change(cert)
    with pytest.raises(CertificateError, match=f"^{field}: altered after signing"):
        verify(cert)


def test_tampering_with_the_digests_too_breaks_the_signature(issuer, version_dir):
    import hashlib

    from forgetflow.certificate import canonical

    cert = sign(_body(version_dir), issuer[0])
    cert["status"] = "rejected"
    cert["digests"]["status"] = hashlib.sha256(canonical("rejected")).hexdigest()
    with pytest.raises(CertificateError, match="^digests: the signature does not match"):
        verify(cert)
    cert = sign(_body(version_dir), issuer[0])
    cert["extra"] = "smuggled"
    with pytest.raises(CertificateError, match="^extra: a field the signature does not cover"):
        verify(cert)


def test_another_key_is_refused_even_when_the_certificate_is_self_consistent(issuer, version_dir):
    forger = Ed25519PrivateKey.generate()
    cert = sign(_body(version_dir), forger)
    verify(cert)  # integrity alone holds...
    with pytest.raises(CertificateError, match="^signature.public_key: signed by key .* not by the given key"):
        verify(cert, issuer[0].public_key())  # ...but it was not the issuer who signed


def test_swapped_added_or_missing_weight_files_are_named(issuer, version_dir, tmp_path):
    cert = sign(_body(version_dir), issuer[0])
    swapped = tmp_path / "swapped"
    shutil.copytree(version_dir, swapped)
    (swapped / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CertificateError, match=r"^new.files\[adapter/adapter_model.safetensors\]: SHA-256"):
        verify(cert, model_dir=swapped)
    added = tmp_path / "added"
    shutil.copytree(version_dir, added)
    (added / "backdoor.bin").write_bytes(b"x")
    with pytest.raises(CertificateError, match="backdoor.bin is not in the certificate"):
        verify(cert, model_dir=added)
    (added / "backdoor.bin").unlink()
    (added / "model_card.json").unlink()
    with pytest.raises(CertificateError, match=r"new.files\[model_card.json\]: missing"):
        verify(cert, model_dir=added)


def test_the_key_can_come_from_the_environment(version_dir, tmp_path, monkeypatch):
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    monkeypatch.setenv("FORGETFLOW_TEST_KEY", pem.decode())
    loaded = load_signing_key("FORGETFLOW_TEST_KEY", tmp_path / "never-made.pem")
    assert loaded.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()
    assert not (tmp_path / "never-made.pem").exists()
    assert set(sign(_body(version_dir), loaded)) == set(BODY_FIELDS) | {"digests", "signature"}


def test_verify_on_another_machine_needs_only_the_file_the_key_and_the_weights(issuer, version_dir, tmp_path):
    """`forgetflow certificate verify` in a fresh folder: no state, no services, no network."""
    key, key_file = issuer
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cert_path = write_certificate(sign(_body(version_dir), key), elsewhere)
    shutil.copy(public_key_path(key_file), elsewhere / "issuer.pub")
    shutil.copytree(version_dir, elsewhere / "model")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "FORGETFLOW_"))}
    cmd = [sys.executable, "-m", "forgetflow.cli", "--state-dir", str(elsewhere / "no-state"), "certificate", "verify",
           str(cert_path), "--public-key", str(elsewhere / "issuer.pub"), "--model-dir", str(elsewhere / "model")]
    ok = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "valid" in ok.stdout and "key destroyed: True" in ok.stdout, ok.stderr
    tampered = json.loads(cert_path.read_text())
    tampered["new"]["version"] = "9"
    cert_path.write_text(json.dumps(tampered))  # another key order and spacing: canonical form still applies
    bad = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "new: altered after signing" in bad.stderr
    assert not (elsewhere / "no-state").exists() or not any((elsewhere / "no-state").rglob("*.pem"))
