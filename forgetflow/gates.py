"""Promotion gates: a named threshold check. `@champion` moves only if every gate passed."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Gate:
    """`value` compared with `threshold`: `min` passes when value >= threshold, `max` when <=."""

    name: str
    value: float
    threshold: float
    kind: Literal["min", "max"]

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.kind == "min" else self.value <= self.threshold

    @property
    def margin(self) -> float:
        """Signed distance to failing, relative to the threshold scale (> 0 passes)."""
        scale = max(abs(self.threshold), 1e-12)
        diff = self.value - self.threshold if self.kind == "min" else self.threshold - self.value
        return diff / scale

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def all_passed(gates: list[Gate]) -> bool:
    return bool(gates) and all(g.passed for g in gates)


def records_passed(records: list[dict]) -> bool:
    """all_passed of gates as they travel between stages and into reports (Gate.to_dict)."""
    return bool(records) and all(r["passed"] for r in records)
