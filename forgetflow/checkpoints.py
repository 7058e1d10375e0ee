"""Where long training runs keep their resumable state.

A trainer writes its full state into a fresh local directory every N iterations and hands
it to a CheckpointSink; on start it asks the sink for the latest state and resumes there.
`LocalCheckpointSink` keeps copies on the local disk (tests, single-machine runs); an
object-store sink implements the same two methods.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class CheckpointSink(Protocol):
    def save(self, step: int, local_dir: Path) -> None:
        """Persist the state in `local_dir` (written at `step`); the caller may delete it after."""

    def latest(self) -> tuple[int, Path] | None:
        """(step, local directory holding that state) of the newest checkpoint, or None."""


class LocalCheckpointSink:
    """Checkpoints as `root/step-<step>` directories; a copy is made complete before it is
    renamed into place, so an interrupted save never shows up as the latest."""

    _PATTERN = re.compile(r"^step-(\d+)$")

    def __init__(self, root: Path):
        self.root = Path(root)

    def save(self, step: int, local_dir: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        partial = self.root / f".partial-step-{step:08d}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(local_dir, partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)

    def latest(self) -> tuple[int, Path] | None:
        if not self.root.is_dir():
            return None
        steps = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := self._PATTERN.match(p.name))]
        return max(steps) if steps else None
