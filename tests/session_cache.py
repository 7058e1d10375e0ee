"""Trained test artifacts built once per pytest session, shared by every module that asks.

They live under the session's base temp dir; a `.done` marker written after a successful build
tells a later fixture call the folder is whole (a half-built one is removed and rebuilt).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    root = tmp_path_factory.getbasetemp() / "session-cache" / name
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        build(root)
        (root / ".done").touch()
    return root
