"""Request-derived data at rest: sealed with the request's own key (crypto-shredding).

Synthesized forget data names the request's subjects and holds their values in clear (an
LLM's forget rows must, to be trained on). Everything of it that leaves the run's working
folder is sealed file by file with the request's Fernet key from the ledger; when the request
reaches a final state the ledger destroys the key and every sealed copy becomes unreadable,
in S3 and in any DVC cache alike.
"""
from __future__ import annotations

from pathlib import Path

from cryptography.fernet import Fernet

SEALED_SUFFIX = ".fernet"


def seal_dir(src: Path, dst: Path, key: bytes) -> Path:
    """Copy every file of src into dst encrypted (name + '.fernet'); returns dst."""
    fernet = Fernet(key)
    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        out = Path(dst) / (path.relative_to(src).as_posix() + SEALED_SUFFIX)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(fernet.encrypt(path.read_bytes()))
    return Path(dst)


def open_dir(src: Path, dst: Path, key: bytes) -> Path:
    """Decrypt a sealed folder (InvalidToken if the key is not the one it was sealed with)."""
    fernet = Fernet(key)
    for path in sorted(p for p in Path(src).rglob(f"*{SEALED_SUFFIX}") if p.is_file()):
        out = Path(dst) / path.relative_to(src).as_posix()[:-len(SEALED_SUFFIX)]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(fernet.decrypt(path.read_bytes()))
    return Path(dst)
