"""A subscribe whose channel cannot be joined on this node: what the client is told,
on a node of this process (the failure is one call that raises, as a broken Redis or
PostgreSQL connection makes it)."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.db import OperationalError
from django.test import override_settings
from redis.exceptions import ConnectionError as RedisConnectionError

from common.db import database_unavailable
from push.services.runtime import get_node
from push.storage import history, recent_store
from push.tests.wsclient import connected_client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

RECENT = {"HISTORY_MODES": [("tick:*", "recent")]}


async def _refusal(channel: str) -> dict[str, Any]:
    client = await connected_client()
    error = await client.request({"type": "subscribe", "channel": channel, "id": 1})
    await client.close()
    return error


async def test_a_broker_that_cannot_join_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    node = await get_node()

    async def refused(channel: str) -> None:
        raise RedisConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")

    monkeypatch.setattr(node.broker, "join", refused)
    error = await _refusal("news")
    assert (error["type"], error["code"], error["message"]) == (
        "error",
        "UNAVAILABLE",
        "message broker unavailable: ConnectionError",
    )


async def test_a_history_read_that_fails_names_postgresql_not_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def database_away(**kwargs: Any) -> Any:
        raise database_unavailable(OperationalError("server closed the connection"))

    monkeypatch.setattr(history, "_history_recent", database_away)
    node = await get_node()
    node.recent_cache.size = 0  # no cache in front: the read is PostgreSQL's
    error = await _refusal("news")
    assert (error["code"], error["message"]) == (
        "UNAVAILABLE",
        "database unavailable: OperationalError",
    )


@pytest.mark.skipif(not settings.REDIS_URL, reason="recent channels live in Redis")
@override_settings(PUSH=RECENT)
async def test_a_recent_channels_window_that_cannot_be_read_names_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def redis_away(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(recent_store.RecentStore, "read", redis_away)
    error = await _refusal("tick:away")
    assert (error["code"], error["message"]) == (
        "UNAVAILABLE",
        "Redis unavailable: ConnectionError; retry",
    )
