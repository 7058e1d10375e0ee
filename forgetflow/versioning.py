"""DVC: the remote lives in the same object store as the checkpoints, under its own prefix.

`.dvc/config` (committed) names the remote `store` = s3://<bucket>/<dvc_prefix>; the
endpoint and credentials are machine-specific and go to `.dvc/config.local` (git-ignored
by DVC), written from the resolved service settings.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from forgetflow.services import Settings


def configure_dvc_remote(settings: Settings, repo_root: Path, prefix: str) -> None:
    if not (repo_root / ".dvc").is_dir():
        return
    dvc = [sys.executable, "-m", "dvc"]
    url = f"s3://{settings.bucket}/{prefix}"
    for args in (["remote", "add", "-f", "-d", "store", url],
                 ["remote", "modify", "--local", "store", "endpointurl", settings.s3_endpoint],
                 ["remote", "modify", "--local", "store", "access_key_id", settings.access_key],
                 ["remote", "modify", "--local", "store", "secret_access_key", settings.secret_key]):
        subprocess.run(dvc + args, cwd=repo_root, check=True, capture_output=True, text=True)
