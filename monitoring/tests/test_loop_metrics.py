"""The lock-free metric kinds of the event loop's hot paths are exposed exactly as
prometheus' own Counter and Histogram are (less their ``_created`` samples), so
dashboards and alerts read them the same way."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common import metrics

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_a_loop_histogram_reads_as_a_prometheus_histogram() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = metrics.LoopHistogram(
        "t_seconds", "t", ["type"], buckets=BUCKETS, registry=ours_registry
    )
    theirs = Histogram("t_seconds", "t", ["type"], buckets=BUCKETS, registry=theirs_registry)
    values = [random.choice([0, *BUCKETS]) for _ in range(200)]  # bounds included
    values += [random.uniform(0, 6) for _ in range(300)]
    for index, value in enumerate(values):
        kind = ("publish", "subscribe")[index % 2]
        ours.labels(kind).observe(value)
        theirs.labels(kind).observe(value)
    ours_samples = _samples(ours_registry, "t_seconds")
    theirs_samples = _samples(theirs_registry, "t_seconds")
    assert ours_samples.keys() == theirs_samples.keys()
    for key, value in theirs_samples.items():
        assert abs(ours_samples[key] - value) < 1e-9, key


def test_a_tally_family_reads_as_a_prometheus_counter() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = metrics.TallyFamily("t_frames", "t", ["type"], registry=ours_registry)
    theirs = Counter("t_frames", "t", ["type"], registry=theirs_registry)
    for kind, amount in [("publish", 1), ("subscribe", 3), ("publish", 2)]:
        ours.labels(kind).inc(amount)
        theirs.labels(kind).inc(amount)
    assert _samples(ours_registry, "t_frames") == _samples(theirs_registry, "t_frames")
