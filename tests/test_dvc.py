"""DVC as a user runs it on a fresh clone after `forgetflow up`: `dvc repro` runs a stage of
dvc.yaml (tiny preset, through FORGETFLOW_PRESET), `dvc push` sends its outputs to the S3
store, and another clone with an empty cache gets exactly those bytes back with `dvc pull`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forgetflow.storage import ObjectStore

pytestmark = [pytest.mark.slow, pytest.mark.services]
REPO = Path(__file__).resolve().parent.parent
GIT = ["git", "-c", "user.name=forgetflow-test", "-c", "user.email=test@forgetflow.invalid"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _fresh_clone(dst: Path, env: dict[str, str]) -> Path:
    """The project's tracked files as they are in the working tree, committed in a new repo."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    _run(["git", "init", "-q"], dst, env)
    _run([*GIT, "add", "-A"], dst, env)
    _run([*GIT, "commit", "-qm", "clone"], dst, env)
    return dst


def _small_train_base(clone: Path) -> None:
    """The clone's user tunes the tiny preset down: DVC's plumbing is under test, not the
    model (tests/diffusion_fixtures.py trains the tiny teacher the other tests judge)."""
    params_path = clone / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["presets"]["tiny"]["diffusion"]["base"] = {"steps": 20, "judge_epochs": 1}
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_repro_push_and_pull_on_fresh_clones(services, tmp_path):
    env = {**os.environ, "FORGETFLOW_STATE_DIR": str(services.state_dir), "FORGETFLOW_PRESET": "tiny",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    forgetflow, dvc = [sys.executable, "-m", "forgetflow.cli"], [sys.executable, "-m", "dvc"]
    first = _fresh_clone(tmp_path / "first", env)
    _small_train_base(first)
    _run([*GIT, "commit", "-qam", "a small train_base"], first, env)
    assert "DVC remote:        store -> s3://" in _run([*forgetflow, "up"], first, env)
    _run([*dvc, "repro", "train_base"], first, env)
    outs = first / "artifacts" / "digits-ddpm"
    assert (outs / "model" / "model_card.json").exists() and (outs / "judge" / "judge_card.json").exists()
    card = json.loads((outs / "model" / "model_card.json").read_text())
    assert card["hyperparameters"]["base"]["steps"] == 20  # the stage read the clone's params.yaml, as dvc.lock says
    assert "artifacts/digits-ddpm/model" in (first / "dvc.lock").read_text()
    _run([*dvc, "push"], first, env)
    assert ObjectStore(services.settings()).list("dvc"), "dvc push wrote nothing to the store"
    _run([*GIT, "add", "-A"], first, env)
    _run([*GIT, "commit", "-qm", "repro train_base"], first, env)

    second = tmp_path / "second"
    _run(["git", "clone", "-q", str(first), str(second)], tmp_path, env)
    assert not (second / "artifacts").exists()
    _run([*forgetflow, "up"], second, env)
    _run([*dvc, "pull", "train_base"], second, env)
    assert _digests(second / "artifacts" / "digits-ddpm") == _digests(outs)
    assert "train_base" not in _run([*dvc, "status", "train_base"], second, env)  # up to date
