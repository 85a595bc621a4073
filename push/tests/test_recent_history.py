"""Recent history: what a node holds in memory and the Redis cache a restarted node
reads, both bound by retention exactly as PostgreSQL is."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import override_settings
from prometheus_client import REGISTRY

from common.redis_client import redis_async, redis_prefix
from push.fanout.message import ChannelMessage, new_message_ids
from push.services.publishing import message_publish
from push.services.runtime import get_node, stop_node
from push.storage import history
from push.storage.recent_cache import (
    MAX_QUEUED_APPENDS,
    RecentCache,
    message_from_entry,
    recent_key,
)
from push.tests.wsclient import WsClient, connected_client
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

needs_redis = pytest.mark.skipif(not settings.REDIS_URL, reason="the cache lives in Redis")


async def _publish(channel: str, count: int) -> None:
    for n in range(count):
        await sync_to_async(message_publish)(channel=channel, data=n)


async def _watching(channel: str) -> WsClient:
    """A subscriber, so this node holds the channel's messages in memory."""
    client = await connected_client()
    await client.request({"type": "subscribe", "channel": channel})
    return client


async def _resume(channel: str, since: int, replayed: int) -> tuple[dict[str, Any], list[int]]:
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": channel, "since": since})
    seqs = [(await client.recv_type("message"))["seq"] for _ in range(replayed)]
    await client.expect_nothing()
    await client.close()
    return reply, seqs


async def _cached_seqs(channel: str, count: int) -> list[int]:
    """The seqs in the channel's stream, once the node has appended ``count``."""
    redis = redis_async()

    async def all_cached() -> list[Any] | None:
        entries = await redis.xrange(recent_key(redis_prefix(), channel))
        return entries if len(entries) >= count else None

    try:
        entries = await wait_until(all_cached, f"{count} messages of {channel} in the cache")
        return [message_from_entry(channel, fields).seq for _, fields in entries]
    finally:
        await redis.aclose()


async def _published_then_restarted(channel: str, count: int) -> list[int]:
    """Publish ``count`` messages, wait until they are cached, restart the node (the new
    one holds nothing in memory); returns the cached seqs."""
    await get_node()
    await _publish(channel, count)
    cached = await _cached_seqs(channel, count)
    await stop_node()
    return cached


def _cache_reads(result: str) -> float:
    value = REGISTRY.get_sample_value("push_recent_cache_reads_total", {"result": result})
    return value or 0.0


@pytest.fixture
def database_recent_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every read of recent history from PostgreSQL."""
    calls: list[str] = []
    read = history._history_recent

    async def recording(*, channel: str, count: int, max_bytes: int) -> Any:
        calls.append(channel)
        return await read(channel=channel, count=count, max_bytes=max_bytes)

    monkeypatch.setattr(history, "_history_recent", recording)
    return calls


# ----- retention on the node's memory ------------------------------------------------


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 3})
async def test_a_live_node_replays_only_what_retention_keeps() -> None:
    watcher = await _watching("kept3")
    await _publish("kept3", 8)
    # No trim job has run: the database still has all 8, the node holds them too.
    reply, seqs = await _resume("kept3", since=2, replayed=3)
    assert (reply["seq"], reply["recovered"], seqs) == (8, False, [6, 7, 8])
    reply, seqs = await _resume("kept3", since=5, replayed=3)
    assert (reply["recovered"], seqs) == (True, [6, 7, 8])
    await watcher.close()


@override_settings(PUSH={"RETENTION_MAX_AGE_SECS": 1})
async def test_a_live_node_replays_nothing_older_than_the_age_limit() -> None:
    watcher = await _watching("young")
    await _publish("young", 3)
    await asyncio.sleep(1.2)  # the point: the three grow older than the 1 s age limit
    await _publish("young", 1)
    reply, seqs = await _resume("young", since=0, replayed=1)
    assert (reply["seq"], reply["recovered"], seqs) == (4, False, [4])
    await watcher.close()


@needs_redis
@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 3})
async def test_every_node_gives_the_same_answer_under_retention(
    database_recent_reads: list[str],
) -> None:
    await _publish("same", 8)
    from_database = await _resume("same", since=2, replayed=3)
    await stop_node()
    await _cached_seqs("same", 3)
    from_cache = await _resume("same", since=2, replayed=3)
    assert from_database == from_cache
    assert from_cache[0]["recovered"] is False and from_cache[1] == [6, 7, 8]


# ----- the Redis cache after a restart ------------------------------------------------


@needs_redis
async def test_a_restarted_node_resumes_from_the_cache_without_the_database(
    database_recent_reads: list[str],
) -> None:
    assert await _published_then_restarted("warm", 5) == [1, 2, 3, 4, 5]
    hits = _cache_reads("hit")
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": "warm", "since": 2})
    assert (reply["seq"], reply["recovered"]) == (5, True)
    assert [(await client.recv_type("message"))["seq"] for _ in range(3)] == [3, 4, 5]
    assert database_recent_reads == [] and _cache_reads("hit") == hits + 1
    await _publish("warm", 1)
    assert (await client.recv_type("message"))["seq"] == 6
    await client.close()


@needs_redis
async def test_a_cache_lost_with_redis_falls_back_to_the_database(
    database_recent_reads: list[str],
) -> None:
    await _published_then_restarted("lost", 5)
    redis = redis_async()
    await redis.delete(recent_key(redis_prefix(), "lost"))
    await redis.aclose()
    reply, seqs = await _resume("lost", since=2, replayed=3)
    assert (reply["seq"], reply["recovered"], seqs) == (5, True, [3, 4, 5])
    assert database_recent_reads == ["lost"]


@needs_redis
@override_settings(PUSH={"SYNC_INTERVAL_SECS": 0.2})
async def test_a_cache_missing_the_newest_message_still_delivers_it() -> None:
    await _published_then_restarted("stale", 5)
    redis = redis_async()
    key = recent_key(redis_prefix(), "stale")
    newest = await redis.xrevrange(key, count=1)
    await redis.xdel(key, newest[0][0])  # as if that append had failed
    await redis.aclose()
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": "stale", "since": 2})
    # The node knows the channel up to 4: it says so, and delivers 5 once its sync
    # with the database sees the channel ahead of it.
    assert (reply["seq"], reply["recovered"]) == (4, True)
    assert [(await client.recv_type("message"))["seq"] for _ in range(3)] == [3, 4, 5]
    await _publish("stale", 1)
    assert (await client.recv_type("message"))["seq"] == 6
    await client.expect_nothing()
    await client.close()


async def test_a_channel_joined_while_this_nodes_append_is_under_way_starts_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """This node committed a message of a channel it does not serve (its hub has no
    subscriber to give it to), and the append that writes it to the channel's stream,
    and relays it, has not reached Redis when a subscriber joins. The stream, which
    lacks it, must not stand for the channel's latest: the node drops its own relay
    unread, and the subscriber would get the message only after a later one or the
    next sync, past a ``subscribed`` that named the seq before it."""
    node = await get_node()
    await _publish("joining", 2)
    assert await _cached_seqs("joining", 2) == [1, 2]
    released = asyncio.Event()
    write = RecentCache._write

    async def held_until_released(self: RecentCache, batch: list[ChannelMessage]) -> None:
        await released.wait()
        await write(self, batch)

    monkeypatch.setattr(RecentCache, "_write", held_until_released)
    await _publish("joining", 1)  # seq 3: committed, its append held
    await wait_until(lambda: node.recent_cache.appending("joining"), "seq 3 being appended")
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": "joining"})
    assert reply["seq"] == 3
    released.set()
    assert await _cached_seqs("joining", 3) == [1, 2, 3]
    await _publish("joining", 1)
    assert (await client.recv_type("message"))["seq"] == 4
    await client.expect_nothing()
    await client.close()


# ----- a cursor from the future ---------------------------------------------------------


async def test_a_since_past_the_channels_history_gets_the_real_latest_seq() -> None:
    await _publish("reset", 3)
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": "reset", "since": 2**40})
    # Nothing can be replayed after a seq the channel never had: the client learns the
    # channel's latest seq and that its state is not recovered, then gets the live stream.
    assert (reply["seq"], reply["recovered"]) == (3, False)
    await _publish("reset", 1)
    assert (await client.recv_type("message"))["seq"] == 4
    await client.close()


# ----- the cache's byte budget -------------------------------------------------------


@needs_redis
@override_settings(PUSH={"RECENT_CACHE_MAX_BYTES": 1000})
async def test_the_cache_holds_and_reads_at_most_its_byte_budget_per_channel() -> None:
    """Messages of 300 bytes against a budget of 1000: the stream keeps three (not
    ``PUSH_RECENT_CACHE_SIZE``), and a read takes no more than the budget it is given."""
    node = await get_node()
    for _ in range(10):
        await sync_to_async(message_publish)(channel="wide-cache", data="x" * 298)
    redis = redis_async()
    key = recent_key(redis_prefix(), "wide-cache")

    async def tenth_cached() -> bool:
        newest = await redis.xrevrange(key, count=1)
        return bool(newest) and message_from_entry("wide-cache", newest[0][1]).seq == 10

    try:
        await wait_until(tenth_cached, "seq 10 in the cache")
        cached = [message_from_entry("wide-cache", fields) for _, fields in await redis.xrange(key)]
    finally:
        await redis.aclose()
    assert [m.seq for m in cached] == [8, 9, 10]
    assert sum(len(m.data_json) for m in cached) <= 1000
    assert [m.seq for m in await node.recent_cache.read("wide-cache", 100, 10**9)] == [8, 9, 10]
    assert [m.seq for m in await node.recent_cache.read("wide-cache", 100, 700)] == [9, 10]
    assert [m.seq for m in await node.recent_cache.read("wide-cache", 100, 10)] == [10]


@needs_redis
async def test_a_process_without_a_node_appends_to_the_cache_too() -> None:
    """A management command or a worker publishes without a node: its messages reach
    the cache all the same, so a node that starts serving the channel finds them."""
    await stop_node()
    for _ in range(3):
        await sync_to_async(message_publish)(channel="from-a-command", data="x")
    assert await _cached_seqs("from-a-command", 3) == [1, 2, 3]


@needs_redis
async def test_the_cache_keeps_each_field_of_a_message_exactly() -> None:
    """A batch's messages travel to the append script in one MessagePack argument: any
    data (newlines, non-ASCII, 70,000 characters) comes back as it was stored, each in
    its own channel's stream when the batch interleaves two channels."""
    datas = ['"a\\nb"', '{"k":"\\n\\n","e":""}', '"é 漢字 😀"', "[]", '"x\ny"', '""']
    datas.append('"' + "z" * 70_000 + '"')
    messages = [
        ChannelMessage(
            channel=("packed", "packed-2")[index % 2],
            seq=index // 2 + 1,
            message_id=message_id,
            data_json=data,
            timestamp=1796000000.123456 + index,
        )
        for index, (data, message_id) in enumerate(
            zip(datas, new_message_ids(len(datas)), strict=True)
        )
    ]
    redis = redis_async()
    cache = RecentCache(redis, redis_prefix(), size=100, ttl_secs=60, max_bytes=1_048_576)
    try:
        await cache._write(messages)
        for channel in ("packed", "packed-2"):
            read = await cache.read(channel, 100, 1_048_576)
            assert [(m.seq, m.message_id, m.data_json, m.timestamp) for m in read] == [
                (m.seq, m.message_id, m.data_json, m.timestamp)
                for m in messages
                if m.channel == channel
            ]
    finally:
        await redis.delete(*(recent_key(redis_prefix(), c) for c in ("packed", "packed-2")))
        await redis.aclose()


def _messages(channel: str, datas: list[str], first_seq: int = 1) -> list[ChannelMessage]:
    return [
        ChannelMessage(
            channel=channel,
            seq=first_seq + index,
            message_id=message_id,
            data_json=data,
            timestamp=1796000000.5,
        )
        for index, (data, message_id) in enumerate(
            zip(datas, new_message_ids(len(datas)), strict=True)
        )
    ]


@needs_redis
async def test_a_batch_mixing_large_and_small_messages_trims_as_one_append_each() -> None:
    """Each message trims the stream as its own append would, in batch order: small ones
    to the count, large ones exactly to what fits the byte budget (three of 300 here)."""
    datas = ['"a"'] * 5 + ['"' + "x" * 298 + '"'] * 4 + ['"b"'] * 2
    redis = redis_async()
    cache = RecentCache(redis, redis_prefix(), size=100, ttl_secs=60, max_bytes=1000)
    key = recent_key(redis_prefix(), "mixed")
    try:
        await cache._write(_messages("mixed", datas))
        cached = [message_from_entry("mixed", fields) for _, fields in await redis.xrange(key)]
        assert [m.seq for m in cached] == [7, 8, 9, 10, 11]
        assert 0 < await redis.ttl(key) <= 60
    finally:
        await redis.delete(key)
        await redis.aclose()


@needs_redis
async def test_entries_written_before_the_one_field_format_are_still_read() -> None:
    """Nodes of the previous version wrote four fields per entry; a stream may hold both
    kinds while a cluster upgrades, and a read takes both."""
    redis = redis_async()
    cache = RecentCache(redis, redis_prefix(), size=100, ttl_secs=60, max_bytes=1_048_576)
    key = recent_key(redis_prefix(), "upgraded")
    old = _messages("upgraded", ['"old 1"', '{"k": "old 2"}'])
    new = _messages("upgraded", ['"new 3"', '"new 4"'], first_seq=3)
    try:
        for m in old:
            fields = {"s": m.seq, "m": m.message_id, "d": m.data_json, "t": repr(m.timestamp)}
            await redis.xadd(key, fields)
        await cache._write(new)
        read = await cache.read("upgraded", 100, 1_048_576)
        assert [(m.seq, m.message_id, m.data_json, m.timestamp) for m in read] == [
            (m.seq, m.message_id, m.data_json, m.timestamp) for m in old + new
        ]
    finally:
        await redis.delete(key)
        await redis.aclose()


@needs_redis
async def test_a_stream_whose_ttl_was_set_lately_keeps_it_unless_it_is_gone() -> None:
    """A node sets a stream's TTL (a 64th longer) at most once per 64th of the TTL: the
    next appends leave it alone, but a stream gone in between (expired, lost by Redis)
    is made again whole and gets its TTL."""
    redis = redis_async()
    cache = RecentCache(redis, redis_prefix(), size=100, ttl_secs=6400, max_bytes=1_048_576)
    key = recent_key(redis_prefix(), "fresh")
    try:
        await cache._write(_messages("fresh", ['"1"', '"2"']))
        assert 6400 < await redis.ttl(key) <= 6500
        await redis.expire(key, 9000)  # so that setting it again would show
        await cache._write(_messages("fresh", ['"3"'], first_seq=3))
        assert await redis.ttl(key) > 6500
        await redis.delete(key)
        await cache._write(_messages("fresh", ['"4"', '"5"'], first_seq=4))
        assert 6400 < await redis.ttl(key) <= 6500
        assert [m.seq for m in await cache.read("fresh", 100, 1_048_576)] == [4, 5]
    finally:
        await redis.delete(key)
        await redis.aclose()


async def test_appends_past_the_queue_while_redis_is_away_are_counted() -> None:
    """While Redis is away appends wait in a bounded queue; the oldest give way past
    it, and each one dropped is counted for operators
    (``push_recent_cache_appends_dropped_total``): its relay to the other nodes went
    with it, so they read it from history on their next sync."""
    redis = redis_async()
    cache = RecentCache(redis, redis_prefix(), size=100, ttl_secs=60, max_bytes=1_048_576)
    name = "push_recent_cache_appends_dropped_total"
    before = REGISTRY.get_sample_value(name) or 0.0
    try:
        # Nothing writes them (the cache's run is not started): the queue only fills.
        for message in _messages("dropped", ['"x"'] * (MAX_QUEUED_APPENDS + 3)):
            cache.append_soon(message)
        assert REGISTRY.get_sample_value(name) == before + 3
        assert len(cache._queue) == MAX_QUEUED_APPENDS
    finally:
        await redis.aclose()
