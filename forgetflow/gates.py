"""Promotion gates: a named threshold check. `@champion` moves only if every gate passed.

A gate whose metric could not be computed (value None: a concept the judge cannot name, an
attack that was not run) fails closed with its `reason`; it never drops out of the list.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from forgetflow.stats import min_trials


@dataclass(frozen=True)
class Gate:
    """`value` compared with `threshold`: `min` passes when value >= threshold, `max` when <=;
    None never passes. `reason` says why a gate failed where the value alone does not."""

    name: str
    value: float | None
    threshold: float
    kind: Literal["min", "max"]
    reason: str | None = None

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.threshold if self.kind == "min" else self.value <= self.threshold

    @property
    def margin(self) -> float:
        """Signed distance to failing, relative to the threshold scale (> 0 passes); -inf for
        a metric that could not be computed."""
        if self.value is None:
            return float("-inf")
        scale = max(abs(self.threshold), 1e-12)
        diff = self.value - self.threshold if self.kind == "min" else self.threshold - self.value
        return diff / scale

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def metric_gate(name: str, value: float | None, threshold: float, kind: Literal["min", "max"],
                missing: str) -> Gate:
    """A gate on a metric that may be missing; `missing` is the reason it fails then."""
    return Gate(name, value, threshold, kind, None if value is not None else missing)


def attack_gates(attacks: dict[str, dict], thresholds: dict[str, float]) -> list[Gate]:
    """`attack:<name>` for each attack of gates.attacks: upper95 of its rate <= threshold
    (forgetflow/stats.py). Fails closed when the attack did not run or had no trials, and says
    when its trials are too few for the bound to ever pass (more probes per value, more samples)."""
    gates = []
    for name, threshold in thresholds.items():
        record = attacks.get(name) or {}
        if record.get("upper95") is None:
            gates.append(Gate(f"attack:{name}", None, threshold, "max",
                              record.get("reason") or f"attack {name} was not run or had no trials"))
            continue
        need = min_trials(threshold)
        reason = (f"undecidable: {record['n']} trials cannot bound the rate below {threshold:g} at 95% "
                  f"(need >= {need}: more probes per value or more samples)") if record["n"] < need else None
        gates.append(Gate(f"attack:{name}", record["upper95"], threshold, "max", reason))
    return gates


def all_passed(gates: list[Gate]) -> bool:
    return bool(gates) and all(g.passed for g in gates)


def records_passed(records: list[dict]) -> bool:
    """all_passed of gates as they travel between stages and into reports (Gate.to_dict)."""
    return bool(records) and all(r["passed"] for r in records)
