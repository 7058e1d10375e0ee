"""The CLI as a user runs it: a subprocess with the tiny preset, in a work folder, against a
state folder (the services the session's fixtures started)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def forgetflow(workdir: Path, state_dir: Path, *args: str, timeout: int = 1500,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FORGETFLOW_STATE_DIR": str(state_dir), **(env or {})}
    return subprocess.run([sys.executable, "-m", "forgetflow.cli", "--preset", "tiny", *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
