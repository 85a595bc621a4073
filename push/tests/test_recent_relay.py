"""A recent channel's messages reach the other nodes from the Redis call that numbers
them (``recent_store.Relay``), read on a real Redis: what the script publishes, how a
node reads it, and that the node's own come back to it as nothing."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from django.conf import settings
from django.test import override_settings

from push.cluster.broker import Broker, relayed_messages
from push.cluster.node import STOP_FLUSH_MIN_SECS, Node
from push.fanout.message import ChannelMessage
from push.services.runtime import get_node
from push.storage import recent_store
from push.storage.history import RecentHistory
from push.storage.recent_cache import message_from_entry, recent_key
from push.storage.relay import CACHED_ENTRIES, RECENT_ENTRIES, RELAY_MARK
from push.storage.relay import current as current_relay
from push.storage.write_batch import Published, PublishUnit
from push.tests.redis_proxy import Proxy
from push.tests.test_hub import make_hub
from push.tests.test_hub_repair import repair_past_exclusion

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_node"),
    pytest.mark.skipif(not settings.REDIS_URL, reason="recent channels live in Redis"),
]

RECENT = {"HISTORY_MODES": [("tick:*", "recent")], "RECENT_WINDOW_MESSAGES": 1000}


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    with override_settings(PUSH=RECENT):
        yield await get_node()


class _Group:
    """The Redis pub/sub channel of one push channel's group, read as another node
    reads it."""

    def __init__(self, group: bytes) -> None:
        self.client = aioredis.from_url(settings.REDIS_URL)
        self.pubsub = self.client.pubsub()
        self.group = group

    async def __aenter__(self) -> _Group:
        await self.pubsub.subscribe(self.group)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()

    async def payloads(self, count: int) -> list[bytes]:
        found: list[bytes] = []
        async with asyncio.timeout(5):
            while len(found) < count:
                message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    found.append(message["data"])
        return found


async def _publish(node: Node, channel: str, values: list[Any]) -> list[ChannelMessage]:
    outcome = await recent_store.publish_submitted(
        channel, [json.dumps(v) for v in values], broadcast=node.broadcast
    )
    assert isinstance(outcome, Published), outcome
    return outcome.messages


def _fields(messages: list[ChannelMessage]) -> list[tuple[Any, ...]]:
    return [(m.channel, m.seq, m.message_id, m.data_json, m.timestamp) for m in messages]


async def test_the_numbering_call_relays_a_recent_publish_to_the_channels_group(
    node: Node,
) -> None:
    relay = current_relay()
    assert relay is not None, "a node on the project's Redis layer relays recent publishes"
    assert relay.mark == node.broker.relay_mark
    channel = "tick:relayed"
    async with _Group(relay.group_of(channel)) as group:
        messages = await _publish(node, channel, [{"n": 1}, "two", 3])
        (payload,) = await group.payloads(1)
    assert payload.startswith(node.broker.relay_mark)
    assert _fields(relayed_messages(payload)) == _fields(messages)
    assert [m.seq for m in messages] == [1, 2, 3]
    assert all(m.relayed for m in messages)
    # The node sent them to its local subscribers, and not again through its broker.
    assert node.broker.outgoing_count() == 0


async def test_a_large_call_is_relayed_in_payloads_of_at_most_100_messages(node: Node) -> None:
    relay = current_relay()
    assert relay is not None
    channel = "tick:many"
    async with _Group(relay.group_of(channel)) as group:
        messages = await _publish(node, channel, list(range(250)))
        payloads = await group.payloads(3)
    parts = [relayed_messages(p) for p in payloads]
    assert [len(part) for part in parts] == [100, 100, 50]
    assert _fields([m for part in parts for m in part]) == _fields(messages)


async def test_a_publish_that_skips_a_pusher_socket_goes_through_the_broker(node: Node) -> None:
    """A node of an earlier version reads no ``exclude`` from a window entry: such a
    channel's messages of the call are sent by the broker, which carries it."""
    sent: list[ChannelMessage] = []
    outcome = await recent_store.publish_submitted(
        "tick:excluding", ['"x"'], broadcast=sent.append, exclude="123.456"
    )
    assert isinstance(outcome, Published)
    assert [(m.relayed, m.exclude) for m in sent] == [(False, "123.456")]


def test_a_window_entry_holds_its_excluded_socket_and_is_weighed_with_it() -> None:
    tails = recent_store.entry_tails(
        ["0190aaaa-0000-7000-8000-000000000000"] * 2, 1e9 + 1e-6, ['"a"', '"b"'], [None, "9.8"]
    )
    entries = ['{"seq":41,' + tails[0], '{"seq":42,' + tails[1]]
    messages = [recent_store.message_from_entry("tick:e", e) for e in entries]
    assert [(m.seq, m.data, m.exclude) for m in messages] == [(41, "a", None), (42, "b", "9.8")]
    # The node's bound on what the window counts for an entry is never below it.
    for entry, message in zip(entries, messages, strict=True):
        assert recent_store.entry_bytes_at_most(message) >= len(entry)
    assert len(entries[1]) > recent_store.entry_bytes_at_most(messages[0])


async def test_a_repair_keeps_a_recent_trigger_from_the_socket_it_excluded(node: Node) -> None:
    """A node that missed the broadcast reads the window: its entry names the socket."""

    async def publish(data_json: str, exclude: str | None) -> None:
        outcome = await recent_store.publish_submitted(
            "tick:repaired", [data_json], broadcast=lambda message: None, exclude=exclude
        )
        assert isinstance(outcome, Published)

    hub, _ = await make_hub(RecentHistory())
    await repair_past_exclusion(hub, "tick:repaired", publish)


def _receiving_broker() -> tuple[Broker, list[ChannelMessage]]:
    received: list[ChannelMessage] = []
    return Broker(object(), on_message=received.append), received


def _payload(mark: bytes, channel: str, *entries: str, kind: bytes = RECENT_ENTRIES) -> bytes:
    import msgpack

    return mark + kind + msgpack.packb([channel, *entries], use_bin_type=False)


def test_a_node_reads_another_nodes_relayed_payload_in_order() -> None:
    broker, received = _receiving_broker()
    other = RELAY_MARK + b"0123456789abcdef:"
    entries = [
        '{"seq":7,"message_id":"m7","timestamp":1.5,"data":{"a":1}}',
        '{"seq":8,"message_id":"m8","timestamp":1.5,"data":"caf\u00e9"}',
    ]
    broker._receive(_payload(other, "tick:x", *entries))
    assert _fields(received) == [
        ("tick:x", 7, "m7", '{"a":1}', 1.5),
        ("tick:x", 8, "m8", '"caf\u00e9"', 1.5),
    ]


def test_a_node_drops_its_own_relayed_payload_and_survives_a_broken_one() -> None:
    broker, received = _receiving_broker()
    entry = '{"seq":1,"message_id":"m1","timestamp":1.0,"data":1}'
    broker._receive(_payload(broker.relay_mark, "tick:x", entry))
    assert received == []
    broker._receive(RELAY_MARK + b"tag:" + b"\xc1 not msgpack")
    broker._receive(RELAY_MARK + b"no colon after the tag")
    assert received == []


async def test_a_relayed_payload_reaches_a_node_that_joined_the_channel(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group the relay names is the one the node's group readers subscribe to."""
    relay = current_relay()
    assert relay is not None
    received: list[ChannelMessage] = []
    monkeypatch.setattr(node.broker, "on_message", received.append)
    channel = "tick:joined"
    await node.broker.join(channel)
    entry = '{"seq":4,"message_id":"m4","timestamp":2.0,"data":[1]}'
    other = RELAY_MARK + b"fedcba9876543210:"
    client = aioredis.from_url(settings.REDIS_URL)
    try:
        await client.publish(relay.group_of(channel), _payload(other, channel, entry))
    finally:
        await client.aclose()
    async with asyncio.timeout(5):
        while not received:
            await asyncio.sleep(0.01)
    assert _fields(received) == [(channel, 4, "m4", "[1]", 2.0)]
    await node.broker.leave(channel)


@override_settings(PUSH={**RECENT, "STORAGE_RELAY": False})
async def test_relaying_turned_off_leaves_recent_messages_to_the_broker() -> None:
    node = await get_node()
    assert current_relay() is None
    sent: list[ChannelMessage] = []
    outcome = await recent_store.publish_submitted("tick:off", ['"y"'], broadcast=sent.append)
    assert isinstance(outcome, Published)
    assert [m.relayed for m in sent] == [False]
    # A node with it off still reads what others relay.
    assert node.broker._subscribers is not None


def _committed(channel: str, seq: int, exclude: str | None = None) -> ChannelMessage:
    return ChannelMessage(
        channel=channel,
        seq=seq,
        message_id=f"00000000-0000-4000-8000-{seq:012d}",
        data_json=json.dumps({"n": seq}),
        timestamp=1700000000.25,
        exclude=exclude,
    )


async def test_the_cache_append_relays_a_durable_message_to_the_channels_group(
    node: Node,
) -> None:
    relay = current_relay()
    assert relay is not None
    channel = "room:durable-relay"
    messages = [_committed(channel, seq) for seq in (1, 2, 3)]
    async with _Group(relay.group_of(channel)) as group:
        for message in messages:
            node.broadcast(message)
        (payload,) = await group.payloads(1)
    assert payload.startswith(node.broker.relay_mark + CACHED_ENTRIES)
    assert _fields(relayed_messages(payload)) == _fields(messages)
    assert all(m.relayed for m in messages)
    assert node.broker.outgoing_count() == 0


async def _relayed_and_brokered(
    node: Node, channel: str, *, then_stop: bool = False
) -> tuple[ChannelMessage, ChannelMessage, list[bytes]]:
    """Seq 1 (the cache's call relays it) and seq 2, which skips a Pusher socket (the
    broker sends it), broadcast on ``node`` (stopped at once after, ``then_stop``):
    the two messages and the two payloads the channel's group got, seq 1's relayed."""
    relay = current_relay()
    assert relay is not None
    plain, excluding = _committed(channel, 1), _committed(channel, 2, exclude="1.2")
    async with _Group(relay.group_of(channel)) as group:
        node.broadcast(plain)
        node.broadcast(excluding)
        if then_stop:
            await node.stop()
        payloads = await group.payloads(2)
    relayed = [p for p in payloads if p.startswith(RELAY_MARK)]
    assert [_fields(relayed_messages(p)) for p in relayed] == [_fields([plain])]
    return plain, excluding, payloads


async def test_a_durable_message_that_skips_a_pusher_socket_goes_through_the_broker(
    node: Node,
) -> None:
    plain, excluding, payloads = await _relayed_and_brokered(node, "room:durable-excluding")
    assert (plain.relayed, excluding.relayed) == (True, False)
    # The other one is the broker's, in the layer's format, with the socket to skip.
    (brokered,) = [p for p in payloads if not p.startswith(RELAY_MARK)]
    assert node.broker.layer.deserialize(brokered)["exclude"] == "1.2"


async def test_what_a_node_committed_right_before_it_stops_reaches_the_channels_group(
    node: Node,
) -> None:
    """A stop sends what its cache and broker queued (the last messages of a drain), so
    the other nodes have them at once, not at their next sync; the cache has them too."""
    channel = "room:last-before-stop"
    await _relayed_and_brokered(node, channel, then_stop=True)
    client = aioredis.from_url(settings.REDIS_URL)
    try:
        entries = await client.xrange(recent_key(node.recent_cache.prefix, channel))
    finally:
        await client.aclose()
    assert [message_from_entry(channel, fields).seq for _, fields in entries] == [1, 2]


async def test_a_stop_whose_redis_does_not_answer_ends_within_its_bound() -> None:
    target = aioredis.connection.parse_url(str(settings.REDIS_URL))
    proxy = Proxy((target.get("host", "127.0.0.1"), int(target.get("port", 6379))))
    url = f"redis://127.0.0.1:{await proxy.start()}/{target.get('db', 0)}"
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    layers["default"]["CONFIG"]["hosts"] = [url]
    try:
        with override_settings(REDIS_URL=url, CHANNEL_LAYERS=layers, PUSH=RECENT):
            node = await get_node()
            assert current_relay() is not None, "the node relays through the proxied Redis"
            node.broadcast(_committed("room:stop-unanswered", 1))
            node.broadcast(_committed("room:stop-unanswered", 2, exclude="1.2"))
            proxy.frozen = True
            started = time.monotonic()
            await node.stop()
            stopped_after = time.monotonic() - started
    finally:
        await proxy.stop()
    assert stopped_after < STOP_FLUSH_MIN_SECS + 1.0, stopped_after


async def test_what_the_write_pipeline_commits_while_the_node_stops_reaches_the_group(
    node: Node,
) -> None:
    """The pipeline stops before the flush: a batch whose COMMIT was on its way when the
    stop began is broadcast, so queued, and sent with the rest."""
    relay = current_relay()
    pipeline = node.write_pipeline
    assert relay is not None and pipeline is not None
    channel = "room:committed-while-stopping"
    async with _Group(relay.group_of(channel)) as group:
        published = pipeline.submit(PublishUnit(items=[(channel, '"last"')], publisher_id=None))
        async with asyncio.timeout(5):
            while not pipeline._writing:  # polled each tick: the COMMIT takes a millisecond
                await asyncio.sleep(0)
        await node.stop()
        outcome = await published
        (payload,) = await group.payloads(1)
    assert isinstance(outcome, Published)
    assert [m.data_json for m in relayed_messages(payload)] == ['"last"']
