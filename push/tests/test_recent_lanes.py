"""Recent-only channels' two publish calls in Redis at once (``recent_store._Lane``):
never two on one channel, each channel's publishes numbered in the order queued,
whatever happens to either call."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from django.conf import settings
from django.test import override_settings

from common.errors import PushError
from common.redis_client import HeldConnection
from push.fanout.message import ChannelMessage
from push.storage import recent_store
from push.storage.write_batch import Published
from push.tests.redis_proxy import Proxy

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_node"),
    pytest.mark.skipif(not settings.REDIS_URL, reason="recent channels live in Redis"),
]

RECENT = {"HISTORY_MODES": [("tick:*", "recent")], "RECENT_WINDOW_MESSAGES": 1000}

Call = dict[str, list[Any]]


class _Gate:
    """Holds back the reply of a call that numbers its channel (the script ran)."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()


class _Calls:
    """The store's publish calls as they go: the channels of each, how many are in Redis
    at once (checking no two hold one channel), and gates that hold a call's reply."""

    def __init__(self, store: recent_store.RecentStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self._real = store._publish_all
        self.sent: list[list[str]] = []
        self.in_redis: list[set[str]] = []
        self.most_at_once = 0
        self.gates: dict[str, _Gate] = {}
        self.delay: Callable[[], float] | None = None
        monkeypatch.setattr(store, "_publish_all", self._publish_all)

    def gate(self, channel: str) -> _Gate:
        gate = self.gates[channel] = _Gate()
        return gate

    async def _publish_all(self, connection: HeldConnection, call: Call, entries: int) -> None:
        channels = set(call)
        assert all(channels.isdisjoint(other) for other in self.in_redis), (channels, self.in_redis)
        self.in_redis.append(channels)
        self.most_at_once = max(self.most_at_once, len(self.in_redis))
        self.sent.append(list(call))
        try:
            await self._real(connection, call, entries)
            if self.delay is not None:
                await asyncio.sleep(self.delay())
            for channel in channels:
                gate = self.gates.get(channel)
                if gate is not None:
                    gate.reached.set()
                    await gate.opened.wait()
        finally:
            self.in_redis.remove(channels)


@pytest.fixture
async def store() -> AsyncIterator[recent_store.RecentStore]:
    yield recent_store.store()
    await recent_store.store_close()


def _submit(
    channel: str, data: Any, sink: list[ChannelMessage] | None = None
) -> asyncio.Future[Any]:
    broadcast = (sink if sink is not None else []).append
    return recent_store.publish_submitted(channel, [json.dumps(data)], broadcast=broadcast)


def _seq(outcome: Any) -> int:
    assert isinstance(outcome, Published), outcome
    return outcome.messages[0].seq


async def _seqs(answers: list[asyncio.Future[Any]]) -> list[int]:
    return [_seq(await answer) for answer in answers]


async def _leases(*channels: str) -> None:
    """Each channel's lease started (its first publish reserves it), so the calls a
    test makes afterwards are numbering calls only."""
    assert await _seqs([_submit(channel, 0) for channel in channels]) == [1] * len(channels)


async def _settled() -> None:
    """Let the store's tasks run until the loop has nothing ready for a moment."""
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.02)


@override_settings(PUSH=RECENT)
async def test_a_second_call_takes_other_channels_while_the_first_is_in_redis(
    store: recent_store.RecentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _leases("tick:a", "tick:b")
    calls = _Calls(store, monkeypatch)
    gate = calls.gate("tick:a")
    first = _submit("tick:a", 1)
    await asyncio.wait_for(gate.reached.wait(), 2)  # its script ran; its reply is held back
    # Queued while tick:a is in Redis: tick:a's wait, in order, behind that call;
    # tick:b's go past them in a call of their own at once.
    channels = ["tick:a", "tick:b", "tick:a", "tick:b"]
    later = [_submit(channel, n) for n, channel in enumerate(channels)]
    assert await asyncio.wait_for(later[1], 2) and await asyncio.wait_for(later[3], 2)
    assert [_seq(later[1].result()), _seq(later[3].result())] == [2, 3]
    assert calls.sent == [["tick:a"], ["tick:b"]] and calls.most_at_once == 2
    assert not first.done() and not later[0].done() and not later[2].done()
    assert [(n.channel, json.loads(n.data_jsons[0])) for n in store._waiting] == [
        ("tick:a", 0),
        ("tick:a", 2),
    ]
    gate.opened.set()
    assert await _seqs([first, later[0], later[2]]) == [2, 3, 4]
    assert calls.sent[2:] == [["tick:a"]]  # the two left behind, in the next call
    assert (store._queued_messages, store._queued_bytes) == (0, 0)


@override_settings(PUSH=RECENT)
async def test_a_publish_of_the_channel_in_redis_does_not_start_the_second_lane(
    store: recent_store.RecentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _leases("tick:one")
    calls = _Calls(store, monkeypatch)
    gate = calls.gate("tick:one")
    started: list[str] = []
    spawn = recent_store.spawn

    def counted(coroutine: Any, *, name: str, loop: Any = None) -> asyncio.Task[Any]:
        started.append(name)
        return spawn(coroutine, name=name, loop=loop)

    monkeypatch.setattr(recent_store, "spawn", counted)
    answers = [_submit("tick:one", 1)]
    await asyncio.wait_for(gate.reached.wait(), 2)
    answers += [_submit("tick:one", n) for n in (2, 3)]
    await _settled()
    gate.opened.set()
    assert await _seqs(answers) == [2, 3, 4]
    # One lane started, and it took the two that waited once its call was answered.
    assert started == ["push-recent-publish"]
    assert calls.sent == [["tick:one"], ["tick:one"]] and calls.most_at_once == 1


@override_settings(PUSH={**RECENT, "RECENT_SEQ_BLOCK": 5})
async def test_seqs_are_gapless_in_queue_order_with_many_publishers_on_shared_channels(
    store: recent_store.RecentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """128 publishes kept in flight over 12 channels, each answer submitting the next,
    with calls of uneven length and leases of 5 seqs (a hold and a renewal every few
    calls): each channel's seqs follow the order its publishes were queued, none
    missing or repeated, and what was broadcast and stored is what was answered."""
    channels = [f"tick:shared{n}" for n in range(12)]
    calls = _Calls(store, monkeypatch)
    chooser = random.Random(7)
    calls.delay = lambda: chooser.random() * 0.002
    queued: dict[str, list[int]] = {channel: [] for channel in channels}
    answered: dict[int, int] = {}
    broadcast: list[ChannelMessage] = []
    total, counter = 1500, iter(range(1500))
    finished = asyncio.Event()

    def submit_next(_: Any = None) -> None:
        n = next(counter, None)
        if n is None:
            return
        channel = chooser.choice(channels)
        queued[channel].append(n)
        answer = _submit(channel, n, broadcast)
        answer.add_done_callback(lambda done, n=n: record(n, done))

    def record(n: int, done: asyncio.Future[Any]) -> None:
        answered[n] = _seq(done.result())
        if len(answered) == total:
            finished.set()
        submit_next()

    for _ in range(128):
        submit_next()
    await asyncio.wait_for(finished.wait(), 30)
    assert calls.most_at_once == 2
    for channel in channels:
        assert [answered[n] for n in queued[channel]] == list(range(1, len(queued[channel]) + 1))
        mine = [m for m in broadcast if m.channel == channel]
        assert [json.loads(m.data_json) for m in mine] == queued[channel]
        latest, stored = await store.read(channel, 0, 1000, recent_store.Window.from_settings())  # type: ignore[misc]  # None only for a channel it does not hold
        assert [(m.seq, m.message_id) for m in stored] == [(m.seq, m.message_id) for m in mine]
        assert latest == len(queued[channel])
    assert (store._queued_messages, store._queued_bytes) == (0, 0)


@override_settings(PUSH={**RECENT, "RECENT_SEQ_BLOCK": 3})
async def test_a_channel_held_for_its_lease_keeps_its_order_while_the_other_lane_works(
    store: recent_store.RecentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _leases("tick:in", "tick:held", "tick:free")
    calls = _Calls(store, monkeypatch)
    gate = calls.gate("tick:in")
    in_redis = _submit("tick:in", 1)
    await asyncio.wait_for(gate.reached.wait(), 2)
    # tick:held's lease (3 seqs) runs out in the second lane's call; its block waits.
    reserving, reserved = asyncio.Event(), asyncio.Event()
    reserve = recent_store._seq_block_take

    async def slow_reserve(channel: str, amount: int) -> int:
        reserving.set()
        await reserved.wait()
        return await reserve(channel, amount)

    monkeypatch.setattr(recent_store, "_seq_block_take", slow_reserve)
    held = [_submit("tick:held", n) for n in range(1, 4)]
    await asyncio.wait_for(reserving.wait(), 2)
    assert not any(answer.done() for answer in held)
    # Later ones of tick:held join its hold; tick:free's go on meanwhile.
    held += [_submit("tick:held", n) for n in range(4, 6)]
    free = [_submit("tick:free", n) for n in range(1, 3)]  # within its lease
    assert await asyncio.wait_for(asyncio.gather(*free), 2)
    assert [_seq(answer.result()) for answer in free] == [2, 3]
    assert not any(answer.done() for answer in held)
    reserved.set()
    assert await asyncio.wait_for(_seqs(held), 2) == [2, 3, 4, 5, 6]
    assert not in_redis.done()  # all the while, tick:in's call was in Redis
    gate.opened.set()
    assert _seq(await in_redis) == 2
    assert (store._queued_messages, store._queued_bytes) == (0, 0)


@override_settings(PUSH=RECENT)
async def test_the_bounds_count_what_waits_behind_the_other_call(
    store: recent_store.RecentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishes left queued behind a call of their channel count against the queue's
    bound; a call takes at most APPENDS_PER_CALL past them; one given up there is
    dropped."""
    await _leases("tick:x", "tick:y")
    calls = _Calls(store, monkeypatch)
    gate = calls.gate("tick:x")
    monkeypatch.setattr(recent_store, "APPENDS_PER_CALL", 2)
    answers = [_submit("tick:x", 1)]
    await asyncio.wait_for(gate.reached.wait(), 2)
    with override_settings(PUSH={**RECENT, "WRITE_QUEUE_MAX_MESSAGES": 4}):
        answers.append(_submit("tick:x", 2))
        given_up = recent_store._Awaited("tick:x", ['"gone"'])
        store.append(given_up)
        answers += [_submit("tick:y", n) for n in (1, 2)]
        with pytest.raises(PushError, match="overloaded"):
            _submit("tick:y", 3)
        given_up.future.cancel()
        await asyncio.wait_for(asyncio.gather(*answers[2:]), 2)
        answers += [_submit("tick:y", n) for n in (3, 4, 5)]
        await asyncio.wait_for(asyncio.gather(*answers[4:]), 2)
    assert await _seqs(answers[2:]) == [2, 3, 4, 5, 6]
    assert calls.sent[1:] == [["tick:y"], ["tick:y"], ["tick:y"]]  # 2, 2, then 1
    gate.opened.set()
    assert await _seqs(answers[:2]) == [2, 3]  # the given-up one was never sent
    assert (store._queued_messages, store._queued_bytes) == (0, 0)


async def _proxied(store: recent_store.RecentStore, proxy: Proxy, lane: int) -> aioredis.Redis:
    """``lane``'s calls through ``proxy`` (that can freeze or cut them), the other's
    straight to Redis."""
    target = aioredis.connection.parse_url(str(settings.REDIS_URL))
    port = await proxy.start()
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/{target.get('db', 0)}")
    store._lanes[lane].connection = HeldConnection(lambda: client.connection_pool)
    return client


def _proxy() -> Proxy:
    target = aioredis.connection.parse_url(str(settings.REDIS_URL))
    return Proxy((target.get("host", "127.0.0.1"), int(target.get("port", 6379))))


@override_settings(PUSH=RECENT)
async def test_a_call_whose_connection_breaks_fails_alone(
    store: recent_store.RecentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _leases("tick:cut", "tick:fine")
    proxy = _proxy()
    client = await _proxied(store, proxy, lane=0)
    try:
        proxy.frozen = True
        cut = _submit("tick:cut", 1)
        await _settled()
        behind = _submit("tick:cut", 2)  # waits behind the frozen call
        fine = [_submit("tick:fine", n) for n in (1, 2)]
        assert await asyncio.wait_for(_seqs(fine), 2) == [2, 3]
        assert not cut.done() and not behind.done()
        proxy.cut()
        refused = await asyncio.wait_for(cut, 2)
        assert isinstance(refused, PushError) and refused.code == "UNAVAILABLE"
        assert "Redis unavailable" in refused.message
        await asyncio.sleep(0.05)
        proxy.frozen = False
        # The next call, on a new connection, numbers what waited behind it.
        assert _seq(await asyncio.wait_for(behind, 2)) == 2
        assert await asyncio.wait_for(_seqs([_submit("tick:fine", 3)]), 2) == [4]
    finally:
        await proxy.stop()
        await client.aclose()


@override_settings(PUSH=RECENT)
async def test_publishes_in_both_calls_redis_never_answers_may_have_been_stored(
    store: recent_store.RecentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recent_store, "PUBLISH_DEADLINE_SECS", 0.3)
    monkeypatch.setattr(recent_store, "EXPIRY_CHECK_SECS", 0.05)
    await _leases("tick:s1", "tick:s2")
    proxies = [_proxy(), _proxy()]
    clients = [await _proxied(store, proxy, lane) for lane, proxy in enumerate(proxies)]
    try:
        for proxy in proxies:
            proxy.frozen = True
        sent = [_submit("tick:s1", 1)]
        await _settled()
        sent.append(_submit("tick:s2", 1))
        await _settled()
        queued = _submit("tick:s1", 2)
        assert sum(bool(lane.call) for lane in store._lanes) == 2
        for answer in sent:
            outcome = await asyncio.wait_for(answer, 3)
            assert isinstance(outcome, PushError) and outcome.code == "UNAVAILABLE"
            assert "the publish may have been stored" in outcome.message
        outcome = await asyncio.wait_for(queued, 3)
        assert isinstance(outcome, PushError) and "may have been stored" not in outcome.message
    finally:
        for proxy in proxies:
            await proxy.stop()
        for client in clients:
            await client.aclose()


@override_settings(PUSH=RECENT)
async def test_a_call_whose_answer_is_lost_may_have_been_stored(
    store: recent_store.RecentStore,
) -> None:
    """Redis ran the call and its answer never came: the store's client gives up at its
    socket timeout. The publisher must not be told to simply retry (its message is in
    the window, with its seq, and a retry would publish it twice)."""
    proxy = _proxy()
    target = aioredis.connection.parse_url(str(settings.REDIS_URL))
    port = await proxy.start()
    client = aioredis.from_url(
        f"redis://127.0.0.1:{port}/{target.get('db', 0)}", socket_timeout=0.3
    )
    store._lanes[0].connection = HeldConnection(lambda: client.connection_pool)
    try:
        await _leases("tick:unanswered")  # the lane's connection made, answers coming
        proxy.answers_lost = True
        outcome = await asyncio.wait_for(_submit("tick:unanswered", "once"), 3)
        assert isinstance(outcome, PushError) and outcome.code == "UNAVAILABLE"
        assert "the publish may have been stored" in outcome.message, outcome.message
        proxy.answers_lost = False
        assert _seq(await asyncio.wait_for(_submit("tick:unanswered", "next"), 3)) == 3
        window = recent_store.Window.from_settings()
        _, stored = await store.read("tick:unanswered", 0, 10, window)  # type: ignore[misc]  # None only for a channel it does not hold
        assert [(m.seq, m.data) for m in stored] == [(1, 0), (2, "once"), (3, "next")]
    finally:
        await proxy.stop()
        await client.aclose()


@override_settings(PUSH=RECENT)
async def test_closing_with_two_calls_in_redis_answers_every_publish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = recent_store.store()
    await _leases("tick:c1", "tick:c2")
    calls = _Calls(store, monkeypatch)
    gates = [calls.gate("tick:c1"), calls.gate("tick:c2")]
    submitted = [_submit("tick:c1", 1)]
    await asyncio.wait_for(gates[0].reached.wait(), 2)
    submitted.append(_submit("tick:c2", 1))
    await asyncio.wait_for(gates[1].reached.wait(), 2)
    submitted.append(_submit("tick:c1", 2))  # queued behind the first call
    awaited = recent_store._Awaited("tick:c2", ['"a"'])
    store.append(awaited)
    await recent_store.store_close()
    await _settled()
    for answer in submitted:
        outcome = answer.result()
        assert isinstance(outcome, PushError) and outcome.code == "UNAVAILABLE"
        assert "stopping" in outcome.message
    assert awaited.future.cancelled()
    assert all(lane.idle() and not lane.call for lane in store._lanes)
    assert not store._waiting and (store._queued_messages, store._queued_bytes) == (0, 0)


@override_settings(PUSH=RECENT)
async def test_a_publish_queued_in_the_tick_the_store_closes_is_answered() -> None:
    await _leases("tick:last")
    answer = _submit("tick:last", 1)  # its lane is started, and has not run yet
    await recent_store.store_close()
    outcome = await asyncio.wait_for(answer, 2)
    assert isinstance(outcome, PushError) and "stopping" in outcome.message
