"""A full disk and a read-only state folder (issue 6): `request submit` fails with one line
naming the problem, and the ledger keeps exactly what it had, with no stray key or document.

The state folder lives on a small tmpfs mounted in a private mount namespace (`unshare`), so
the disk really fills and really turns read-only; the script copies the state folder out at
the end for the assertions."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forgetflow.ledger import Ledger

SCRIPT = r"""
set -u
mount -t tmpfs -o size=1m tmpfs "$DISK"
run() { "$PY" -m forgetflow.cli --state-dir "$DISK/state" request submit "$1" >"$OUT/$2.out" 2>"$OUT/$2.err"; echo $? >"$OUT/$2.rc"; }
run "$DOCS/kept.json" kept
dd if=/dev/zero of="$DISK/filler" bs=4k >/dev/null 2>&1
run "$DOCS/on-full-disk.json" full
rm -f "$DISK/filler"
mount -o remount,ro "$DISK"
run "$DOCS/on-read-only.json" readonly
cp -a "$DISK/state" "$OUT/state"
"""


def _namespace_prefix() -> list[str]:
    """unshare with a private mount namespace (a user namespace too when not root)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare: cannot mount a small disk here")
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr.strip()}")
    return prefix


def test_full_disk_and_read_only_state_folder_refuse_cleanly_and_keep_the_ledger(tmp_path):
    prefix = _namespace_prefix()
    docs, out, disk = tmp_path / "docs", tmp_path / "out", tmp_path / "disk"
    for d in (docs, out, disk):
        d.mkdir()
    for rid in ("kept", "on-full-disk", "on-read-only"):
        (docs / f"{rid}.json").write_text(json.dumps(
            {"request_id": rid, "model": "digits", "target": {"kind": "diffusion-class", "classes": [7]}}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no server: accepted, not announced
    env.update(DISK=str(disk), OUT=str(out), DOCS=str(docs), PY=sys.executable)
    done = subprocess.run([*prefix, "bash", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]

    def result(name: str) -> tuple[int, str]:
        return int((out / f"{name}.rc").read_text()), (out / f"{name}.err").read_text()

    assert result("kept")[0] == 0, result("kept")[1]
    for name, problem in (("full", ("no space left on device", "database or disk is full")),
                          ("readonly", ("read-only file system", "readonly database"))):
        code, stderr = result(name)
        assert code == 1, stderr
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr  # one line
        assert any(p in stderr.lower() for p in problem) and "state" in stderr, stderr

    state = out / "state"
    ledger = Ledger(state)
    assert [(e.request_id, e.state) for e in ledger.list()] == [("kept", "accepted")]
    assert ledger.load_request("kept").request_id == "kept"  # its key and sealed document still open
    left = sorted(p.name for d in ("keys", "requests") for p in (state / d).iterdir())
    assert left == ["kept.enc", "kept.key"]  # nothing half-written by the refused ones
