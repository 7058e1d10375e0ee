"""A bench run's folder, written as the run goes so that a killed run resumes where it stopped.

    <out>/<UTC timestamp>-<family>/
        plan.json      what the run measures: family, methods, seeds, base (model_dir, eval_kit),
                       device, command, and the whole validated params
        trials.jsonl   one line per finished trial (method, seed), appended as each ends
        trials.superseded.jsonl  trials a resume was told to run again (`--rerun`), kept apart
        work/setup.json  each built setup step (the demo base, its judge or reference model, the
                       serving version): its result and the seconds it took
        work/          the built models and every trial's versions

`forgetflow bench --resume <folder>` runs the plan with its own params, refuses a device other
than its (the trials would not compare), keeps the finished trials and the built steps, and
runs the rest. A step or trial cut short is built again from an empty folder. `--rerun
METHODS` first sets those methods' finished trials aside (e.g. after a fix to one method), so
they run again on the code of now; each trial records the commit it ran on.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PLAN, TRIALS, SUPERSEDED, SETUP = "plan.json", "trials.jsonl", "trials.superseded.jsonl", "setup.json"


class ResumeError(ValueError):
    """The folder cannot be resumed (not a bench folder, or another device); the message says why."""


class BenchFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.work = self.path / "work"

    @classmethod
    def create(cls, out_root: Path, plan: dict) -> "BenchFolder":
        """A new folder <out_root>/<UTC timestamp>-<family> holding `plan` (plus its "created" stamp)."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        folder = cls(Path(out_root) / f"{stamp}-{plan['family']}")
        folder.work.mkdir(parents=True)
        (folder.path / PLAN).write_text(json.dumps({**plan, "created": stamp}, indent=1, default=str))
        return folder

    @classmethod
    def resume(cls, path: Path) -> "BenchFolder":
        """The folder of an earlier run (ResumeError if it is not one)."""
        folder = cls(path)
        if not (folder.path / PLAN).is_file():
            raise ResumeError(f"{folder.path} is not a bench folder (no {PLAN})")
        return folder

    def check_device(self, device: str) -> None:
        """ResumeError unless the trials to come run on the plan's device (they would not compare)."""
        if self.plan["device"] != device:
            raise ResumeError(f"the run being resumed ran on {self.plan['device']}, this one would run on {device}")

    @property
    def plan(self) -> dict:
        return json.loads((self.path / PLAN).read_text())

    def finished(self) -> dict[tuple[str, int], dict]:
        """(method, seed) -> the trial recorded for it (a torn last line, from a kill mid-write, is skipped)."""
        out = {}
        path = self.path / TRIALS
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                trial = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[(trial["method"], trial["seed"])] = trial
        return out

    def superseded(self) -> list[dict]:
        path = self.path / SUPERSEDED
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

    def supersede(self, methods: list[str]) -> list[tuple[str, int]]:
        """Set the finished trials of `methods` aside (appended to trials.superseded.jsonl, their
        work folders removed) so that the run does them again; the (method, seed) pairs moved.
        ResumeError for a method the plan does not run."""
        if unknown := [m for m in methods if m not in self.plan["methods"]]:
            raise ResumeError(f"--rerun {', '.join(unknown)}: not a method of this run ({', '.join(self.plan['methods'])})")
        done = self.finished()
        moved = [key for key in done if key[0] in methods]
        if not moved:
            return []
        with (self.path / SUPERSEDED).open("a") as f:
            for key in moved:
                f.write(json.dumps({**done[key], "superseded": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")},
                                   default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        kept = self.path / (TRIALS + ".tmp")  # the trials left, swapped in whole: a kill keeps one or the other
        kept.write_text("".join(json.dumps(t, default=str) + "\n" for key, t in done.items() if key not in moved))
        os.replace(kept, self.path / TRIALS)
        for method, seed in moved:
            shutil.rmtree(self._trial_path(method, seed), ignore_errors=True)
        return moved

    def record(self, trial: dict) -> None:
        path = self.path / TRIALS
        torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        with path.open("a") as f:
            f.write(("\n" if torn else "") + json.dumps(trial, default=str) + "\n")  # never glued to a torn line
            f.flush()
            os.fsync(f.fileno())

    def trial_dir(self, method: str, seed: int) -> Path:
        """An empty folder for the trial (what a killed attempt left in it is removed)."""
        out = self._trial_path(method, seed)
        shutil.rmtree(out, ignore_errors=True)
        return out

    def _trial_path(self, method: str, seed: int) -> Path:
        return self.work / f"{method}-seed{seed}"

    def step(self, name: str, folder: Path, build: Callable[[], Any]) -> Any:
        """build()'s result (JSON-able: paths come back as strings on a resumed run), built into
        `folder` once per run; the seconds it took are kept in setup.json (`seconds`)."""
        done = self._setup()
        if name in done:
            return done[name]["result"]
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        result = build()
        done[name] = {"result": json.loads(json.dumps(result, default=str)), "seconds": round(time.perf_counter() - start, 2)}
        (self.work / SETUP).write_text(json.dumps(done, indent=1))
        return result

    def seconds(self, *names: str) -> float | None:
        """Total seconds of the named setup steps (None if none of them was built)."""
        done = self._setup()
        spent = [done[n]["seconds"] for n in names if n in done]
        return round(sum(spent), 2) if spent else None

    def _setup(self) -> dict:
        path = self.work / SETUP
        return json.loads(path.read_text()) if path.exists() else {}
