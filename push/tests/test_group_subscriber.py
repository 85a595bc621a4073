"""The broker's own readers of the channels' groups, against a real Redis: what they
receive, and how they come back after the connection breaks or goes silent."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.connection import ConnectionPool

from push.cluster import group_subscriber
from push.cluster.group_subscriber import ShardSubscriber
from push.tests.redis_proxy import Proxy
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(not settings.REDIS_URL, reason="needs Redis (REDIS_URL)")


def _redis_url(port: int | None = None) -> str:
    url = str(settings.REDIS_URL)
    if port is None:
        return url
    parsed = aioredis.connection.parse_url(url)
    return f"redis://127.0.0.1:{port}/{parsed.get('db', 0)}"


@contextlib.asynccontextmanager
async def _subscriber(
    url: str, on_resubscribed: Callable[[], None] | None = None
) -> AsyncIterator[tuple[ShardSubscriber, list[bytes], list[Any]]]:
    received: list[bytes] = []
    errors: list[BaseException] = []
    subscriber = ShardSubscriber(
        ConnectionPool.from_url(url),
        on_message=received.append,
        on_error=errors.append,
        on_resubscribed=on_resubscribed,
    )
    subscriber.start()
    try:
        yield subscriber, received, errors
    finally:
        await subscriber.stop()


async def _publish(group: str, data: bytes) -> int:
    client = aioredis.from_url(_redis_url())
    try:
        return int(await client.publish(group, data))
    finally:
        await client.aclose()


def _delivered(group: str, received: list[bytes]) -> Callable[[], Awaitable[bool]]:
    """A condition for ``wait_until``: a message published now is received (the group
    is subscribed again at some point; published before that, it is missed)."""
    data = uuid.uuid4().bytes

    async def published_and_received() -> bool:
        await _publish(group, data)
        await asyncio.sleep(0.02)
        return data in received

    return published_and_received


def _group() -> str:
    return f"test-group-{uuid.uuid4().hex}"


async def test_a_subscribed_group_is_read_from_the_moment_subscribe_returns() -> None:
    group, other = _group(), _group()
    async with _subscriber(_redis_url()) as (subscriber, received, _):
        await subscriber.subscribe(group)
        # Confirmed by Redis before it returned: a PUBLISH right after reaches it.
        assert await _publish(group, b"one") == 1
        await subscriber.subscribe(other)
        await subscriber.unsubscribe(group)
        await _publish(group, b"after leaving")
        await _publish(other, b"two")
        await wait_until(lambda: len(received) >= 2, "both messages")
        await asyncio.sleep(0.05)
        assert received == [b"one", b"two"]


async def test_a_cut_connection_is_opened_again_with_every_group() -> None:
    proxy = Proxy(("127.0.0.1", _redis_port()))
    port = await proxy.start()
    group = _group()
    resubscribed: list[None] = []
    try:
        async with _subscriber(
            _redis_url(port), on_resubscribed=lambda: resubscribed.append(None)
        ) as (subscriber, received, errors):
            await subscriber.subscribe(group)
            assert not resubscribed  # the first connection follows no failure
            proxy.cut()
            await wait_until(lambda: errors, "the subscriber to see the cut")
            await wait_until(lambda: proxy.accepted == 2, "a new connection")

            await wait_until(_delivered(group, received), "a message after the cut")
            # Told, so that what was missed meanwhile is put right (presence).
            assert resubscribed == [None]
    finally:
        await proxy.stop()


async def test_everything_published_before_is_read_once_heard_all_before_returns() -> None:
    group = _group()
    async with _subscriber(_redis_url()) as (subscriber, received, _):
        await subscriber.subscribe(group)
        sent = [f"m{n}".encode() for n in range(200)]
        for data in sent:
            await _publish(group, data)
        await subscriber.heard_all_before()
        assert received == sent


async def test_a_silent_connection_is_given_up_once_a_ping_goes_unanswered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(group_subscriber, "PING_SECS", 0.2)
    proxy = Proxy(("127.0.0.1", _redis_port()))
    port = await proxy.start()
    group = _group()
    try:
        async with _subscriber(_redis_url(port)) as (subscriber, received, _):
            await subscriber.subscribe(group)
            proxy.frozen = True
            # Unfrozen only once a new connection was asked for: the old one was given up.
            await wait_until(lambda: proxy.accepted == 2, "a new connection", timeout=5)
            proxy.frozen = False
            await wait_until(_delivered(group, received), "a message after the silence")
    finally:
        await proxy.stop()


async def test_subscribing_while_redis_cannot_be_reached_fails_at_once() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with _subscriber(_redis_url(port)) as (subscriber, _, errors):
        async with asyncio.timeout(2):
            with pytest.raises(ConnectionError):
                await subscriber.subscribe(_group())
            with pytest.raises(ConnectionError):
                await subscriber.heard_all_before()
        assert errors


def _redis_port() -> int:
    return int(aioredis.connection.parse_url(str(settings.REDIS_URL)).get("port", 6379))
