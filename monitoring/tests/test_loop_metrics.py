"""The lock-free metric kinds of the event loop's hot paths are exposed exactly as
prometheus' own Counter and Histogram are (less their ``_created`` samples), so
dashboards and alerts read them the same way; so are prometheus' own children that
the loop writes without their lock."""

from __future__ import annotations

import random
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as prometheus_values
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


def test_loop_writers_of_prometheus_children_add_to_what_they_show() -> None:
    """Counts and observations made through the loop writers and through the children
    themselves (another thread's) show as if all went through the children."""
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours_counter = Counter("t_requests", "t", ["view"], registry=ours_registry)
    theirs_counter = Counter("t_requests", "t", ["view"], registry=theirs_registry)
    ours_histogram = Histogram("t_bytes", "t", ["view"], buckets=BUCKETS, registry=ours_registry)
    theirs_histogram = Histogram(
        "t_bytes", "t", ["view"], buckets=BUCKETS, registry=theirs_registry
    )
    counted = metrics.loop_counter_writer(ours_counter.labels("a"))
    observed = metrics.loop_histogram_writer(ours_histogram.labels("a"))
    # A second writer of the same child shares what the first added.
    metrics.loop_counter_writer(ours_counter.labels("a")).inc(2)
    theirs_counter.labels("a").inc(2)
    values = [random.choice([0, *BUCKETS]) for _ in range(100)]  # bounds included
    values += [random.uniform(0, 6) for _ in range(200)]
    for index, value in enumerate(values):
        view = ("a", "b")[index % 3 == 0]
        if view == "a" and index % 2:
            counted.inc()
            observed.observe(value)
        else:  # the child's own, as Django's middleware counts
            ours_counter.labels(view).inc()
            ours_histogram.labels(view).observe(value)
        theirs_counter.labels(view).inc()
        theirs_histogram.labels(view).observe(value)
    for name in ("t_requests", "t_bytes"):
        ours_samples = _samples(ours_registry, name)
        theirs_samples = _samples(theirs_registry, name)
        assert ours_samples.keys() == theirs_samples.keys()
        for key, value in theirs_samples.items():
            assert abs(ours_samples[key] - value) < 1e-9, key


def test_loop_writers_are_the_children_in_multiprocess_mode(monkeypatch: Any) -> None:
    """prometheus' multiprocess mode reads values from files, not from the children:
    the children count themselves there."""
    registry = CollectorRegistry()
    counter = Counter("t_requests", "t", ["view"], registry=registry)
    histogram = Histogram("t_bytes", "t", ["view"], buckets=BUCKETS, registry=registry)
    counted, observed = counter.labels("a"), histogram.labels("a")
    monkeypatch.setattr(prometheus_values, "ValueClass", object)
    assert metrics.loop_counter_writer(counted) is counted
    assert metrics.loop_histogram_writer(observed) is observed
