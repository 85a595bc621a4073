"""Measurement side of the load generator: delivery accounting and latency histograms.

Every worker process keeps one ``DeliveryStats``; the orchestrator merges them. The
latency histogram is a sparse dict of 0.1 ms buckets: one dict increment per frame
on the hot path, small to pickle across processes, percentiles exact to 0.1 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

BUCKETS_PER_SEC = 10_000  # 0.1 ms buckets: exact enough, and a dict increment is cheap


def bucket_of(latency_secs: float) -> int:
    """Histogram bucket of one latency (negative clock noise lands in bucket 0)."""
    return int(latency_secs * BUCKETS_PER_SEC) if latency_secs > 0 else 0


def bucket_upper_secs(index: int) -> float:
    """Upper edge of bucket ``index``, in seconds."""
    return (index + 1) / BUCKETS_PER_SEC


@dataclass
class LatencyHistogram:
    """Counts per 0.1 ms bucket (sparse: only buckets that were hit) and the maximum."""

    counts: dict[int, int] = field(default_factory=dict)
    total: int = 0
    max_secs: float = 0.0

    def add(self, latency_secs: float) -> None:
        index = bucket_of(latency_secs)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.total += 1
        self.max_secs = max(self.max_secs, latency_secs)

    def merge(self, other: LatencyHistogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.total += other.total
        self.max_secs = max(self.max_secs, other.max_secs)

    def percentile_secs(self, fraction: float) -> float | None:
        """Upper edge of the bucket holding the given fraction of samples."""
        if not self.total:
            return None
        rank = max(1, math.ceil(self.total * fraction))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(bucket_upper_secs(index), self.max_secs)
        return self.max_secs

    def summary_ms(self, prefix: str) -> dict[str, float | None]:
        """p50, p99 and max in milliseconds, keyed ``<prefix>_p50_ms`` and so on."""
        return {
            f"{prefix}_p50_ms": _ms(self.percentile_secs(0.50)),
            f"{prefix}_p99_ms": _ms(self.percentile_secs(0.99)),
            f"{prefix}_max_ms": _ms(self.max_secs if self.total else None),
        }


@dataclass
class DeliveryStats:
    """What a set of subscriber connections saw; mergeable across processes."""

    received: int = 0
    duplicates: int = 0
    gaps: int = 0
    missing: int = 0
    expected: int = 0
    connections: int = 0
    closed_by_server: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_rx: float = 0.0
    last_rx: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def merge(self, other: DeliveryStats) -> None:
        for name in ("received", "duplicates", "gaps", "missing", "expected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.connections += other.connections
        self.closed_by_server += other.closed_by_server
        _add_counts(self.close_codes, other.close_codes)
        _add_counts(self.errors, other.errors)
        if other.first_rx and (not self.first_rx or other.first_rx < self.first_rx):
            self.first_rx = other.first_rx
        self.last_rx = max(self.last_rx, other.last_rx)
        self.latency.merge(other.latency)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the report, latencies in milliseconds."""
        return {
            "received": self.received,
            "expected": self.expected,
            "loss": self.missing,
            "duplicates": self.duplicates,
            "gaps": self.gaps,
            "closed_by_server": self.closed_by_server,
            "close_codes": dict(self.close_codes),
            "errors": dict(self.errors),
            **self.latency.summary_ms("lat"),
        }


def _add_counts(into: dict[Any, int], other: dict[Any, int]) -> None:
    for key, count in other.items():
        into[key] = into.get(key, 0) + count


def _ms(secs: float | None) -> float | None:
    return None if secs is None else round(secs * 1000.0, 2)


def merge_all(parts: list[DeliveryStats]) -> DeliveryStats:
    """One ``DeliveryStats`` for a whole run."""
    total = DeliveryStats()
    for part in parts:
        total.merge(part)
    return total
