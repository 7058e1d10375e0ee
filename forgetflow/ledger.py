"""The request ledger: the durable record of every accepted deletion request.

Invariant 1 (DESIGN.md): a request is written here before any work starts and keeps its
final state. Invariant 2: the same request id is one piece of work; resubmitting the same
document returns the existing entry, a different document under the same id is refused.
Invariant 6: the request document is personal data, so the ledger keeps only what is safe
in clear (id, model, family, state, versions, paths, errors that name no content) and
stores the document encrypted with a per-request key (Fernet). :meth:`Ledger.shred`
destroys that key once the request is final (crypto-shredding): every copy of the
ciphertext, wherever it was replicated, becomes unreadable.

Storage: one sqlite database (WAL) under the state folder, so several processes (CLI,
flows, workers) share it safely.
"""
from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet

from forgetflow.request import DeletionRequest, parse_request_text

STATES = ("accepted", "running", "awaiting-approval", "promoted", "rejected", "failed")
FINAL_STATES = ("promoted", "rejected")  # failed may be rerun
SHREDDED_EVENT = "key-shredded"  # the events row recording when the request key was destroyed

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
  request_id TEXT PRIMARY KEY,
  model TEXT NOT NULL,
  family TEXT NOT NULL,
  method TEXT,
  digest TEXT NOT NULL,
  state TEXT NOT NULL,
  created REAL NOT NULL,
  updated REAL NOT NULL,
  flow_run_id TEXT,
  base_version TEXT,
  new_version TEXT,
  report_path TEXT,
  error TEXT,
  key_shredded INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
  request_id TEXT NOT NULL,
  at REAL NOT NULL,
  state TEXT NOT NULL,
  detail TEXT
);
"""


class LedgerError(RuntimeError):
    """A ledger operation was refused (conflict, unknown id, unwritable state folder)."""


class RequestConflict(LedgerError):
    """A request id that is already taken by a different document."""


@dataclass(frozen=True)
class Entry:
    request_id: str
    model: str
    family: str
    method: str | None
    digest: str
    state: str
    created: float
    updated: float
    flow_run_id: str | None
    base_version: str | None
    new_version: str | None
    report_path: str | None
    error: str | None
    key_shredded: bool


class Ledger:
    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        try:
            (self.root / "requests").mkdir(parents=True, exist_ok=True)
            (self.root / "keys").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"state folder {self.root} is not writable: {exc.strerror}") from None
        self.db_path = self.root / "ledger.db"
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self):
        try:
            db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.row_factory = sqlite3.Row
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger {self.db_path}: {exc}{self._disk_problem()}") from None
        try:
            yield db
        except sqlite3.OperationalError as exc:
            raise LedgerError(f"ledger write failed ({self.db_path}): {exc}{self._disk_problem()}") from None
        finally:
            db.close()

    def _disk_problem(self) -> str:
        """What the file system says is wrong with the state folder (sqlite often reports a
        full or read-only disk only as 'disk I/O error')."""
        try:
            fs = os.statvfs(self.root)
        except OSError:
            return ""
        if fs.f_flag & os.ST_RDONLY:
            return " (the state folder is on a read-only file system)"
        if fs.f_bavail * fs.f_frsize < 1 << 20:
            return f" (no space left on device: {fs.f_bavail * fs.f_frsize // 1024} KiB free)"
        return ""

    # ---- encrypted payload -------------------------------------------------------------
    def _key_path(self, request_id: str) -> Path:
        return self.root / "keys" / f"{request_id}.key"

    def _payload_path(self, request_id: str) -> Path:
        return self.root / "requests" / f"{request_id}.enc"

    def _write_private(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` (mode 600) atomically: all of it or, on any error, nothing."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            with suppress(OSError):  # on a read-only disk even this fails: nothing was written
                tmp.unlink(missing_ok=True)
            raise

    def request_key(self, request_id: str) -> bytes:
        """The per-request key (for encrypting data derived from the request)."""
        path = self._key_path(request_id)
        if not path.exists():
            raise LedgerError(f"request {request_id}: its key was destroyed (crypto-shredded)")
        return path.read_bytes()

    def load_request(self, request_id: str) -> DeletionRequest:
        token = self._payload_path(request_id).read_bytes()
        return parse_request_text(Fernet(self.request_key(request_id)).decrypt(token))

    # ---- lifecycle -----------------------------------------------------------------------
    def submit(self, request: DeletionRequest) -> tuple[Entry, bool]:
        """Record a request (before any work). Returns (entry, created).

        One submitter at a time holds the ledger's write lock while it writes the request's
        key, its sealed document and its rows, so two submits of one id cannot mix their
        files; if any write fails (a full or read-only disk), the files written so far are
        removed and the transaction rolls back: no half-written entry, the ledger unchanged."""
        digest = request.digest()
        key = Fernet.generate_key()
        files = {self._key_path(request.request_id): key,
                 self._payload_path(request.request_id): Fernet(key).encrypt(request.canonical_json().encode())}
        written: list[Path] = []
        try:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT digest FROM requests WHERE request_id = ?", (request.request_id,)).fetchone()
                if row is not None:
                    db.execute("ROLLBACK")
                    if row["digest"] != digest:
                        raise RequestConflict(f"request id {request.request_id} already exists with a different document")
                    return self.get(request.request_id), False
                for path, data in files.items():
                    written.append(path)
                    self._write_private(path, data)
                now = time.time()
                db.execute(
                    "INSERT INTO requests (request_id, model, family, method, digest, state, created, updated)"
                    " VALUES (?, ?, ?, ?, ?, 'accepted', ?, ?)",
                    (request.request_id, request.model, request.family, request.method, digest, now, now),
                )
                db.execute("INSERT INTO events VALUES (?, ?, 'accepted', NULL)", (request.request_id, now))
                db.execute("COMMIT")
        except (OSError, LedgerError) as exc:
            for path in written:
                with suppress(OSError):
                    path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise LedgerError(f"cannot write to state folder {self.root}: {exc.strerror}") from None
            raise
        return self.get(request.request_id), True

    def update(self, request_id: str, state: str | None = None, **fields) -> Entry:
        if state is not None and state not in STATES:
            raise LedgerError(f"unknown state {state!r}")
        allowed = {"flow_run_id", "base_version", "new_version", "report_path", "error", "method"}
        if unknown := set(fields) - allowed:
            raise LedgerError(f"unknown ledger fields {sorted(unknown)}")
        self.get(request_id)
        sets = dict(fields, updated=time.time())
        if state is not None:
            sets["state"] = state
        cols = ", ".join(f"{k} = ?" for k in sets)
        with self._connect() as db:
            db.execute(f"UPDATE requests SET {cols} WHERE request_id = ?", (*sets.values(), request_id))
            if state is not None:
                db.execute(
                    "INSERT INTO events VALUES (?, ?, ?, ?)",
                    (request_id, sets["updated"], state, fields.get("error")),
                )
        return self.get(request_id)

    def shred(self, request_id: str) -> None:
        """Destroy the request key: the encrypted document and everything encrypted with the
        key become unreadable. Only for final requests."""
        entry = self.get(request_id)
        if entry.state not in FINAL_STATES:
            raise LedgerError(f"request {request_id} is {entry.state}, not final; refusing to shred")
        path = self._key_path(request_id)
        if path.exists():
            with open(path, "r+b") as fh:
                fh.write(os.urandom(len(fh.read()) or 44))
                fh.flush()
                os.fsync(fh.fileno())
            path.unlink()
        with self._connect() as db:
            if not entry.key_shredded:
                db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (request_id, time.time(), SHREDDED_EVENT, None))
            db.execute("UPDATE requests SET key_shredded = 1 WHERE request_id = ?", (request_id,))

    # ---- queries -------------------------------------------------------------------------
    def get(self, request_id: str, missing_ok: bool = False) -> Entry | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            if missing_ok:
                return None
            raise LedgerError(f"unknown request id {request_id!r}")
        return Entry(**{**dict(row), "key_shredded": bool(row["key_shredded"])})

    def list(self, model: str | None = None, state: str | None = None) -> list[Entry]:
        query, args = "SELECT * FROM requests WHERE 1=1", []
        if model:
            query, args = query + " AND model = ?", args + [model]
        if state:
            query, args = query + " AND state = ?", args + [state]
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created", args).fetchall()
        return [Entry(**{**dict(r), "key_shredded": bool(r["key_shredded"])}) for r in rows]

    def events(self, request_id: str) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM events WHERE request_id = ? ORDER BY at", (request_id,)).fetchall()
        return [dict(r) for r in rows]
