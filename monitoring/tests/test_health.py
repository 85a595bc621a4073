from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
from django.db import connection, transaction
from django.test import Client, override_settings
from prometheus_client.parser import text_string_to_metric_families

import push
from monitoring import checks

pytestmark = pytest.mark.django_db(transaction=True)


def test_health_answers() -> None:
    response = Client().get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_ready_when_database_and_redis_answer() -> None:
    response = Client().get("/ready")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "ready"


@override_settings(REDIS_URL="redis://127.0.0.1:1/0")
def test_not_ready_when_redis_is_unreachable() -> None:
    response = Client().get("/ready")
    assert response.status_code == 503
    failing = response.json()["failing"]
    assert len(failing) == 1 and failing[0].startswith("redis")


def test_an_outage_probed_every_second_is_logged_once_not_once_per_probe(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A load balancer probing /ready through an outage gets 503 each time, but the log
    says once that Redis went down and once that it is back: no ERROR line per probe
    from django.request."""
    monkeypatch.setattr(checks, "_failing_logged", frozenset())
    caplog.set_level(logging.INFO)
    with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
        answers = [Client().get("/ready") for _ in range(10)]
    assert [a.status_code for a in answers] == [503] * 10
    assert all(a.json()["failing"][0].startswith("redis") for a in answers)
    assert Client().get("/ready").status_code == 200

    errors = [
        r for r in caplog.records if r.name == "django.request" and r.levelno >= logging.ERROR
    ]
    assert errors == []
    changes = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.name == "monitoring.checks"
    ]
    assert len(changes) == 2, changes
    assert changes[0][0] == "WARNING" and changes[0][1].startswith("not ready: redis: ")
    assert changes[1] == ("WARNING", "redis answers again")


def test_not_ready_when_the_database_answers_but_cannot_be_read() -> None:
    """A database that answers SELECT 1 but not a read of the node's tables (here the
    table is gone, as in a database that was never migrated) is not ready."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE push_channel RENAME TO push_channel_away")
    try:
        response = Client().get("/ready")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE push_channel_away RENAME TO push_channel")
    assert response.status_code == 503
    failing = response.json()["failing"]
    assert len(failing) == 1 and failing[0].startswith("database"), failing


def test_not_ready_when_the_database_does_not_answer_says_so_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A database that does not answer (the pool still waiting for a connection) is
    named with what happened, within the checks' bound."""

    async def no_answer() -> None:
        await asyncio.sleep(60)

    monkeypatch.setattr(checks, "_database_read_async", no_answer)
    monkeypatch.setattr(checks, "DEPENDENCY_TIMEOUT_SECS", 0.2)
    started = time.monotonic()
    response = Client().get("/ready")
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert response.json()["failing"] == ["database: no answer within 0.2 s"]


def test_metrics_are_exposed() -> None:
    body = Client().get("/metrics").content.decode()
    assert "push_deliveries_total" in body
    assert "push_connections_active" in body


def _published_by_application_code() -> float:
    """``push_messages_published_total{transport="django"}`` as /metrics shows it."""
    body = Client().get("/metrics").content.decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if (
                sample.name == "push_messages_published_total"
                and sample.labels.get("transport") == "django"
            ):
                return sample.value
    return 0.0


def test_messages_published_from_application_code_are_counted() -> None:
    """push.publish() from Django code stores and broadcasts a message like any other
    publish: the operator's count of messages published has it, once it committed."""
    before = _published_by_application_code()
    with transaction.atomic():
        push.publish("orders", {"state": "paid"})
    with contextlib.suppress(RuntimeError), transaction.atomic():
        push.publish("orders", {"state": "refunded"})
        raise RuntimeError("rolled back: nothing is published")
    push.publish("orders", {"state": "shipped"})
    assert _published_by_application_code() == before + 2
