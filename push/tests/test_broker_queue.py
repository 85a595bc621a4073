"""The broker's outgoing queue while Redis is slow, and tasks started in the
background: bounded, counted, and never silently lost."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer
from prometheus_client import REGISTRY

from common.background import cancel_and_wait, running_count, spawn
from push.cluster.broker import Broker
from push.tests.test_hub import make_message
from tests.waiting import wait_until


class SlowLayer(InMemoryChannelLayer):
    """A layer whose group_send waits until released: Redis that does not answer."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.sent: list[int] = []

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await self.release.wait()
        self.sent.append(message["seq"])


def _dropped() -> float:
    return REGISTRY.get_sample_value("push_broker_outgoing_dropped_total") or 0.0


async def test_outgoing_messages_are_bounded_while_redis_is_slow_and_drops_are_counted() -> None:
    layer = SlowLayer()
    broker = Broker(layer, on_message=lambda m: None, max_outgoing=5)
    await broker.start()
    before = _dropped()
    broker.publish_soon(make_message("news", 1))
    await wait_until(lambda: broker.outgoing_count() == 0, "seq 1 in flight, held by the layer")
    for seq in range(2, 21):
        broker.publish_soon(make_message("news", seq))
    assert broker.outgoing_count() == 5
    assert _dropped() == before + 14
    layer.release.set()
    # The oldest waiting ones were dropped; what goes out keeps its order.
    await wait_until(lambda: len(layer.sent) == 6, "the six messages kept to go out")
    assert layer.sent == [1, 16, 17, 18, 19, 20]
    await broker.stop()


async def test_a_flush_sends_what_is_queued_then_the_sender_ends() -> None:
    layer = SlowLayer()
    layer.release.set()
    broker = Broker(layer, on_message=lambda m: None)
    await broker.start()
    for seq in (1, 2, 3):
        broker.publish_soon(make_message("news", seq))
    await broker.flush(5.0)
    assert layer.sent == [1, 2, 3]
    assert broker._sender is not None and broker._sender.done()
    await broker.stop()


async def test_a_flush_gives_up_on_redis_that_does_not_answer_at_its_timeout() -> None:
    layer = SlowLayer()
    broker = Broker(layer, on_message=lambda m: None)
    await broker.start()
    broker.publish_soon(make_message("news", 1))
    started = time.monotonic()
    await broker.flush(0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert layer.sent == []
    await broker.stop()


async def test_outgoing_characters_are_bounded_too() -> None:
    layer = SlowLayer()
    broker = Broker(layer, on_message=lambda m: None, max_outgoing_chars=30)
    message = make_message("news", 1)  # data_json '{"n": 1}': 8 characters
    for seq in range(1, 11):
        broker.publish_soon(make_message("news", seq))
    assert broker.outgoing_count() == 30 // len(message.data_json)


async def test_a_background_task_is_kept_until_done_and_its_error_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="common.background")
    gate = asyncio.Event()

    async def fails() -> None:
        await gate.wait()
        raise RuntimeError("lost otherwise")

    before = running_count()
    spawn(fails(), name="doomed")  # the result is dropped, as fire-and-forget does
    gc.collect()
    assert running_count() == before + 1
    gate.set()
    await wait_until(lambda: running_count() == before, "the background task to end")
    [record] = [r for r in caplog.records if r.name == "common.background"]
    assert "doomed" in record.getMessage() and "lost otherwise" in str(record.exc_info[1])


async def test_stopping_ends_a_task_that_swallowed_its_first_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node's loop whose await swallowed the cancellation (a library did, once) carries
    on to its next await: cancelled once and left, it would run for ever."""
    caplog.set_level(logging.WARNING, logger="common.background")
    swallowed = asyncio.Event()

    async def loop_that_swallows() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()

    task = spawn(loop_that_swallows(), name="stubborn")
    await asyncio.sleep(0)
    await cancel_and_wait([task], timeout=5)
    assert swallowed.is_set() and task.cancelled()
    assert not caplog.records


async def test_stopping_gives_up_on_a_task_that_never_ends_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="common.background")
    gate = asyncio.Event()

    async def never_ends() -> None:
        while not gate.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    task = spawn(never_ends(), name="immortal")
    await asyncio.sleep(0)
    await cancel_and_wait([task], timeout=0.2)
    assert not task.done()
    assert "immortal" in caplog.records[-1].getMessage()
    gate.set()
    task.cancel()
    await asyncio.wait([task])


async def test_a_burst_crosses_redis_in_order_in_one_round_trip(settings: Any) -> None:
    """Committed messages go to the other nodes in one script call, exactly as group_send sends
    them: another node's broker receives every one, in order."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from push.cluster.broker import batched_publisher, channel_group
    from push.fanout.message import ChannelMessage

    config = settings.CHANNEL_LAYERS["default"]["CONFIG"]
    sender_layer = RedisPubSubChannelLayer(**config)
    receiver_layer = RedisPubSubChannelLayer(**config)
    received: list[ChannelMessage] = []
    sender = Broker(sender_layer, on_message=lambda m: None)
    receiver = Broker(receiver_layer, on_message=received.append)
    assert batched_publisher(sender_layer) is not None
    await sender.start()
    await receiver.start()
    try:
        channel = f"burst-{id(received)}"
        await receiver.join(channel)
        for seq in range(1, 301):
            sender.publish_soon(make_message(channel, seq))
        async with asyncio.timeout(10):
            while len(received) < 300:
                await asyncio.sleep(0.01)
        assert [m.seq for m in received] == list(range(1, 301))
        assert channel_group(channel).startswith("ch.")
    finally:
        await sender.stop()
        await receiver.stop()
        await sender_layer.flush()
        await receiver_layer.flush()


async def test_a_node_drops_its_own_messages_coming_back_and_reads_the_others(
    settings: Any,
) -> None:
    """Two nodes read one channel and both publish to it: each hands the other's
    messages to its hub, and recognizes its own coming back from Redis (it delivered
    them already) without reading them again, so nothing of them stays remembered."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    from channels_redis.pubsub import RedisPubSubChannelLayer

    config = settings.CHANNEL_LAYERS["default"]["CONFIG"]
    layers = [RedisPubSubChannelLayer(**config) for _ in range(2)]
    received: list[list[tuple[str, int]]] = [[], []]
    brokers = [
        Broker(layer, on_message=lambda m, into=into: into.append((m.channel, m.seq)))
        for layer, into in zip(layers, received, strict=True)
    ]
    channel = f"echoes-{id(received)}"
    for broker in brokers:
        await broker.start()
        await broker.join(channel)
    try:
        for seq in range(1, 201):
            brokers[seq % 2].publish_soon(make_message(channel, seq))
        async with asyncio.timeout(10):
            while sum(map(len, received)) < 200 or any(len(b.echoes) for b in brokers):
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # nothing more arrives
        assert received[0] == [(channel, seq) for seq in range(1, 201) if seq % 2 == 1]
        assert received[1] == [(channel, seq) for seq in range(1, 201) if seq % 2 == 0]
    finally:
        for broker, layer in zip(brokers, layers, strict=True):
            await broker.stop()
            await layer.flush()


def test_remembered_echoes_are_bounded_in_count_and_bytes() -> None:
    from push.cluster.broker import Echoes

    echoes = Echoes(max_count=3, max_bytes=100)
    for index in range(5):
        echoes.expect(b"%d" % index)
    assert len(echoes) == 3
    assert not echoes.returned(b"1")  # forgotten: read as any message is
    assert echoes.returned(b"4") and not echoes.returned(b"4")
    echoes.expect(b"x" * 90)
    echoes.expect(b"y" * 20)  # 110 bytes: the oldest ones give way
    assert not echoes.returned(b"x" * 90) and echoes.returned(b"y" * 20)
    assert len(echoes) == 0


def test_other_layers_send_one_by_one() -> None:
    from push.cluster.broker import batched_publisher

    assert batched_publisher(InMemoryChannelLayer()) is None


async def test_a_channels_messages_cross_redis_together_in_order(settings: Any) -> None:
    """Messages of several channels, interleaved: each channel's go out together in one
    payload (runs of ``PAYLOAD_MAX_MESSAGES``), and another node's broker hands every
    one to its hub in each channel's order."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from push.cluster.broker import PAYLOAD_MAX_MESSAGES

    config = settings.CHANNEL_LAYERS["default"]["CONFIG"]
    sender_layer = RedisPubSubChannelLayer(**config)
    receiver_layer = RedisPubSubChannelLayer(**config)
    received: list[tuple[str, int]] = []
    sender = Broker(sender_layer, on_message=lambda m: None)
    receiver = Broker(receiver_layer, on_message=lambda m: received.append((m.channel, m.seq)))
    channels = [f"together-{index}-{id(received)}" for index in range(3)]
    burst = [make_message(channels[seq % 3], seq) for seq in range(1, 301)]
    pairs = sender._serialized(burst)
    # 100 messages a channel: one payload each; 250 of one channel: three.
    assert len(pairs) == 3 and PAYLOAD_MAX_MESSAGES == 100
    assert len(sender._serialized([make_message("one", seq) for seq in range(1, 251)])) == 3
    await sender.start()
    await receiver.start()
    try:
        for channel in channels:
            await receiver.join(channel)
        for message in burst:
            sender.publish_soon(message)
        async with asyncio.timeout(10):
            while len(received) < 300:
                await asyncio.sleep(0.01)
        for channel in channels:
            seqs = [seq for name, seq in received if name == channel]
            assert seqs == [m.seq for m in burst if m.channel == channel]
    finally:
        await sender.stop()
        await receiver.stop()
        await sender_layer.flush()
        await receiver_layer.flush()


def test_a_payload_of_one_channel_is_bounded_in_characters_too() -> None:
    from push.cluster.broker import PAYLOAD_MAX_CHARS, _runs
    from push.fanout.message import ChannelMessage

    def sized(seq: int, chars: int) -> ChannelMessage:
        message = make_message("c", seq)
        message.data_json = '"' + "x" * (chars - 2) + '"'
        return message

    big = PAYLOAD_MAX_CHARS // 3
    runs = list(_runs([sized(seq, big) for seq in range(1, 8)]))
    assert [[m.seq for m in run] for run in runs] == [[1, 2, 3], [4, 5, 6], [7]]
    alone = list(_runs([sized(1, 10), sized(2, PAYLOAD_MAX_CHARS * 2), sized(3, 10)]))
    assert [[m.seq for m in run] for run in alone] == [[1], [2], [3]]
