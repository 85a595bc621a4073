"""Measurements of the fault tests: printed as they are taken, summed up at the end of
the run and written to ``artifacts/faults/measurements.json``."""

from __future__ import annotations

MEASUREMENTS: list[tuple[str, str, str]] = []


def measure(test: str, name: str, value: str) -> None:
    MEASUREMENTS.append((test, name, value))
    print(f"[faults] {test}: {name} = {value}")
