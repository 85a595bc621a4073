"""The shipped Grafana dashboard and Prometheus config name only metrics we expose."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

import common.metrics  # noqa: F401 - registers our metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_NAME = re.compile(r"\b((?:push|django)_[a-z0-9_]+)\b")

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exposed_sample_names() -> set[str]:
    from django_prometheus.middleware import Metrics

    # Django's request metrics are registered when the middleware first runs; a test
    # run that served no request has not registered them yet.
    Metrics.get_instance()
    names: set[str] = set()
    for family in [*REGISTRY.collect(), *event_worker_stream_families()]:
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def event_worker_stream_families() -> list[Metric]:
    """What the event worker's own /metrics reads from Redis at a scrape (registered in
    the worker's process only), read here from a stream and group of the test's own."""
    from django.conf import settings

    from common.redis_client import redis_sync
    from push.ops.worker_metrics import EventStreamCollector

    if not settings.REDIS_URL:
        return []
    client = redis_sync()
    stream = f"dashboard-test-{uuid.uuid4().hex[:8]}"
    try:
        client.xadd(stream, {"event": "{}"})
        client.xgroup_create(stream, "workers", id="0")
        return list(EventStreamCollector(client, stream=stream, group="workers").collect())
    finally:
        client.delete(stream)
        client.close()


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "push-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_every_panel_metric_exists(expr: str) -> None:
    names = METRIC_NAME.findall(expr)
    assert names, f"panel without a metric: {expr}"
    missing = set(names) - exposed_sample_names()
    assert not missing, f"{expr} names metrics nobody exposes: {missing}"


def test_prometheus_scrapes_metrics_path() -> None:
    config = (DEPLOY / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in config


def test_every_exported_metric_is_named_in_the_operations_guide() -> None:
    """An operator reads what a metric counts in docs/operations.md; one added to
    ``common/metrics.py`` without a line there is a number nobody can interpret."""
    guide = (DEPLOY.parent / "docs" / "operations.md").read_text()
    named = set(METRIC_NAME.findall(guide))
    exported = {family.name for family in REGISTRY.collect() if family.name.startswith("push_")}
    counters = {f.name for f in REGISTRY.collect() if f.type == "counter"}
    missing = {
        name for name in exported if (name + "_total" if name in counters else name) not in named
    }
    assert not missing, f"metrics not named in docs/operations.md: {sorted(missing)}"
