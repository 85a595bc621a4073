from __future__ import annotations

import pytest
from django.test import Client, override_settings

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


def test_metrics_are_exposed() -> None:
    body = Client().get("/metrics").content.decode()
    assert "push_deliveries_total" in body
    assert "push_connections_active" in body
