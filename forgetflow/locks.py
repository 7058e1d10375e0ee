"""A per-model lock so promotions of one model happen one at a time on this machine.

Requests for the same model must be applied in order (DESIGN.md invariant 3). Within one
host an fcntl lock on <state_dir>/locks/<model>.lock serialises the compare-and-set of
`@champion`; across hosts the Prefect concurrency limit keyed by model does (issue 4).
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def model_lock(state_dir: str | Path, model: str):
    path = Path(state_dir) / "locks" / f"{model}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
