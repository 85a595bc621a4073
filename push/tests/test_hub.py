"""The node-local hub: order, exactly-once, gap repair, resume seam, slow consumers.

Driven directly, with an in-memory history and broker, so each race is staged exactly.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from common.errors import ErrorCode, PushError
from push.cluster.address_budgets import NO_LIMIT, ByteBucket
from push.fanout.hub import MAX_PENDING_PER_CHANNEL, ChannelState, HistoryBudget, Hub
from push.fanout.message import ChannelMessage, HistoryPage
from push.fanout.outbox import Outbox, deliveries_together
from push.wire.codecs import CODECS, Codec
from tests.waiting import wait_until

JSON = CODECS["v1.json"]


def make_message(channel: str, seq: int) -> ChannelMessage:
    return ChannelMessage(
        channel=channel,
        seq=seq,
        message_id=f"00000000-0000-0000-0000-{seq:012d}",
        data_json=json.dumps({"n": seq}),
        timestamp=time.time(),
    )


class MemoryHistory:
    def __init__(self) -> None:
        self.stored: dict[str, list[ChannelMessage]] = {}
        self.latest: dict[str, int] = {}
        self.page_gate: asyncio.Event | None = None
        self.page_calls = 0
        self.recent_calls = 0

    def store(self, channel: str, seq: int) -> ChannelMessage:
        message = make_message(channel, seq)
        self.stored.setdefault(channel, []).append(message)
        self.latest[channel] = max(self.latest.get(channel, 0), seq)
        return message

    async def latest_seqs(self, channels: list[str]) -> dict[str, int]:
        return {c: self.latest.get(c, 0) for c in channels}

    async def recent(self, channel: str, count: int, max_bytes: int = 10**9) -> HistoryPage:
        self.recent_calls += 1
        latest = self.latest.get(channel, 0)
        stored = [m for m in self.stored.get(channel, []) if m.seq <= latest][-count:]
        messages = [make_message(channel, m.seq) for m in stored]
        since = messages[0].seq - 1 if messages else latest
        return HistoryPage(since=since, messages=messages, latest_seq=latest)

    async def page(
        self, channel: str, since: int, limit: int, max_bytes: int = 10**9
    ) -> HistoryPage:
        self.page_calls += 1
        latest = self.latest.get(channel, 0)
        if self.page_gate is not None:
            await self.page_gate.wait()
        messages = [m for m in self.stored.get(channel, []) if m.seq > since][:limit]
        # Fresh objects, as a database read would give.
        copies = [make_message(channel, m.seq) for m in messages]
        return HistoryPage(since=since, messages=copies, latest_seq=latest)

    # Nothing here applies retention: what a repair reads is what a replay reads.
    stored_page = page


class FakeClient:
    """A subscriber whose outbox records what would have been sent."""

    def __init__(self, codec: Codec = JSON, max_frames: int = 1000) -> None:
        self.codec = codec
        self.ip: str | None = None
        self.history_budget: HistoryBudget = NO_LIMIT
        self.gone = False  # set by a test: the client left
        self.sent: list[dict[str, Any]] = []
        self.payloads: list[str | bytes] = []  # as handed to the socket, undecoded
        self.overflowed = False
        self.replies: list[tuple[int, bool | None]] = []
        self.outbox = Outbox(
            self._send, max_frames=max_frames, max_bytes=10**9, on_overflow=self._overflow
        )

    async def _send(self, event: dict[str, Any]) -> None:
        payload = event.get("text") if event.get("text") is not None else event["bytes"]
        self.payloads.append(payload)
        self.sent.append(self.codec.decode(payload))

    def _overflow(self) -> None:
        self.overflowed = True

    def reply(self, seq: int, recovered: bool | None) -> None:
        self.replies.append((seq, recovered))

    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.sent if m.get("type") == "message"]


class PusherSocket(FakeClient):
    """A subscriber with a Pusher socket id, as a Pusher connection has."""

    def __init__(self, socket_id: str) -> None:
        super().__init__()
        self.socket_id = socket_id


class Membership:
    def __init__(self) -> None:
        self.joined: list[str] = []
        self.left: list[str] = []

    async def join(self, channel: str) -> None:
        self.joined.append(channel)

    async def leave(self, channel: str) -> None:
        self.left.append(channel)


async def make_hub(history: MemoryHistory, **kwargs: Any) -> tuple[Hub, Membership]:
    membership = kwargs.pop("membership", None) or Membership()
    hub = Hub(
        history=history,
        join=membership.join,
        leave=membership.leave,
        drop_oldest_patterns=kwargs.pop("drop_oldest_patterns", []),
        gap_wait_secs=kwargs.pop("gap_wait_secs", 0.05),
        **kwargs,
    )
    return hub, membership


async def news_subscriber(
    *, stored: int, **hub_options: Any
) -> tuple[MemoryHistory, Hub, FakeClient]:
    """A hub with one subscriber of ``news``, whose history holds seqs 1 to ``stored``
    (none delivered yet)."""
    history = MemoryHistory()
    hub, _ = await make_hub(history, **hub_options)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply)
    for seq in range(1, stored + 1):
        history.store("news", seq)
    return history, hub, client


async def until_seqs(client: FakeClient, seqs: list[int]) -> None:
    """Wait until ``client`` was sent exactly ``seqs`` (a repair or a replay runs in a
    task of the hub's); a duplicate or a wrong order never matches, so the wait fails."""
    await wait_until(lambda: client.seqs() == seqs, f"seqs {seqs}, in that order")


async def test_messages_arriving_out_of_order_are_delivered_in_order() -> None:
    history = MemoryHistory()
    hub, membership = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply)
    assert membership.joined == ["news"] and client.replies == [(0, None)]
    for seq in (2, 3, 1, 5, 4):
        hub.deliver(make_message("news", seq))
    await until_seqs(client, [1, 2, 3, 4, 5])


async def test_duplicates_are_dropped() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply)
    for seq in (1, 1, 2, 1, 2, 3):
        hub.deliver(make_message("news", seq))
    await until_seqs(client, [1, 2, 3])


async def test_gap_that_does_not_fill_is_read_from_history() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply)
    for seq in (1, 2, 3, 4):
        history.store("news", seq)
    hub.deliver(make_message("news", 1))
    hub.deliver(make_message("news", 4))  # 2 and 3 were lost on the way
    await until_seqs(client, [1, 2, 3, 4])


async def test_a_gap_met_while_a_batch_is_broadcast_is_repaired_and_sent() -> None:
    """A committed batch is broadcast inside ``deliveries_together``; the repair a gap
    schedules there runs later, in a copy of that context, and what it reads must go
    out then, not wait for the connection's next message."""
    _, hub, client = await news_subscriber(stored=3, gap_wait_secs=0.01)
    with deliveries_together():
        hub.deliver(make_message("news", 1))
        hub.deliver(make_message("news", 3))  # 2, another node's, was lost on its way
    await until_seqs(client, [1, 2, 3])


async def test_repair_racing_live_messages_skips_nothing_in_flight() -> None:
    """A repair's history read is slow; meanwhile the gap fills live and a new one
    opens whose message is committed but still on its way. The repair must not take
    the new gap for trimmed history."""
    history, hub, client = await news_subscriber(stored=3, gap_wait_secs=0.01)
    hub.deliver(make_message("news", 1))
    hub.deliver(make_message("news", 3))  # 2 is late: a repair is scheduled
    history.page_gate = asyncio.Event()
    # The repair is reading, held at the gate.
    await wait_until(lambda: history.page_calls == 1, "the repair's history read")
    hub.deliver(make_message("news", 2))  # the gap fills live
    hub.deliver(make_message("news", 5))  # 4 and 5 commit after the read began
    history.page_gate.set()
    await wait_until(lambda: not hub.channels["news"].repairing, "the repair to finish")
    history.page_gate = None
    history.store("news", 4)
    history.store("news", 5)
    hub.deliver(make_message("news", 4))
    await until_seqs(client, [1, 2, 3, 4, 5])


async def test_gap_removed_by_retention_is_skipped() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history, gap_wait_secs=0.01)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply)
    for seq in (1, 2, 3, 4):
        history.store("news", seq)
    history.stored["news"] = [m for m in history.stored["news"] if m.seq not in (2, 3)]
    hub.deliver(make_message("news", 1))
    hub.deliver(make_message("news", 4))
    await until_seqs(client, [1, 4])


async def test_resume_ahead_of_a_node_with_held_messages_gets_no_duplicate() -> None:
    """The client saw seq 3 on another node; this node has delivered 1 and holds 3
    waiting for 2. The client gets exactly what comes after 3."""
    history = MemoryHistory()
    hub, _ = await make_hub(history, gap_wait_secs=5.0)
    watcher = FakeClient()
    await hub.subscribe(watcher, "news", since=None, reply=watcher.reply)
    for seq in (1, 2, 3):
        history.store("news", seq)  # all committed; 2 is late on the broker
    hub.deliver(make_message("news", 1))
    hub.deliver(make_message("news", 3))
    client = FakeClient()
    await hub.subscribe(client, "news", since=3, reply=client.reply)
    hub.deliver(make_message("news", 2))
    hub.deliver(history.store("news", 4))
    await until_seqs(watcher, [1, 2, 3, 4])
    assert client.replies == [(3, True)]
    assert client.seqs() == [4]


async def test_lost_last_message_is_caught_by_the_periodic_sync() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply)
    history.store("news", 1)  # committed, but its broadcast never arrives
    await hub.sync_with_history()  # first sync only notes where the database is
    # The point is a window in which nothing arrives: a repair started by this sync
    # would have delivered within it (its read answers at once).
    await asyncio.sleep(0.02)
    assert client.seqs() == []
    await hub.sync_with_history()  # a whole interval later the hub is still behind
    await until_seqs(client, [1])


async def test_subscribe_without_since_starts_after_latest_seq() -> None:
    history = MemoryHistory()
    for seq in (1, 2, 3):
        history.store("news", seq)
    hub, _ = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply)
    assert client.replies == [(3, None)]
    hub.deliver(make_message("news", 3))  # a late broadcast of an old message
    hub.deliver(make_message("news", 4))
    await until_seqs(client, [4])


async def test_resume_replays_then_goes_live_without_duplicates() -> None:
    history = MemoryHistory()
    for seq in range(1, 6):
        history.store("news", seq)
    hub, _ = await make_hub(history)
    first = FakeClient()
    await hub.subscribe(first, "news", since=None, reply=first.reply)
    resumed = FakeClient()
    await hub.subscribe(resumed, "news", since=2, reply=resumed.reply)
    assert resumed.replies == [(5, True)]
    history.store("news", 6)
    hub.deliver(make_message("news", 6))
    await until_seqs(resumed, [3, 4, 5, 6])
    assert first.seqs() == [6]


async def _resume_over_budget(budget: ByteBucket) -> tuple[Hub, MemoryHistory, FakeClient]:
    """A live channel of 10 stored messages that only history holds, and a client with
    ``budget`` that reads pages of 2 (16 bytes of data each), not yet subscribed."""
    history = MemoryHistory()
    for seq in range(1, 11):
        history.store("news", seq)
    hub, _ = await make_hub(history, recent_size=1)  # a resume from 0 reads pages
    first = FakeClient()
    await hub.subscribe(first, "news", since=None, reply=first.reply)
    client = FakeClient(max_frames=4)
    client.history_budget = budget
    return hub, history, client


async def test_a_replay_goes_at_its_addresss_history_budget() -> None:
    """Pages of 2 messages (16 bytes of data): the first within the budget's burst,
    the rest as the budget refills at 80 bytes a second, all in order."""
    hub, _, client = await _resume_over_budget(ByteBucket(16, 80))
    started = time.monotonic()
    await hub.subscribe(client, "news", since=0, reply=client.reply)
    assert client.seqs() == list(range(1, 11))
    # 64 bytes past the burst at 80 a second, less the one byte each wait ends at.
    assert time.monotonic() - started >= 0.6


async def test_a_replay_waiting_for_its_history_budget_stops_when_its_client_leaves() -> None:
    hub, history, client = await _resume_over_budget(ByteBucket(16, 1))
    subscribing = asyncio.create_task(hub.subscribe(client, "news", since=0, reply=client.reply))
    await wait_until(lambda: client.seqs() == [1, 2], "the first page")
    reads = history.page_calls
    client.gone = True
    subscription = await asyncio.wait_for(subscribing, 2.0)
    assert not subscription.active
    assert history.page_calls == reads
    assert client.seqs() == [1, 2]


async def test_live_messages_during_the_replay_read_are_held_then_deduplicated() -> None:
    history = MemoryHistory()
    for seq in range(1, 4):
        history.store("news", seq)
    # No recent messages in memory: the resume has to read history, with an await.
    hub, _ = await make_hub(history, recent_size=0)
    watcher = FakeClient()
    await hub.subscribe(watcher, "news", since=None, reply=watcher.reply)
    history.page_gate = asyncio.Event()
    resumed = FakeClient()
    task = asyncio.create_task(hub.subscribe(resumed, "news", since=0, reply=resumed.reply))
    await wait_until(lambda: history.page_calls == 1, "the replay's history read")
    # While the replay is being read, 4 and 5 are published and broadcast.
    for seq in (4, 5):
        history.store("news", seq)
        hub.deliver(make_message("news", seq))
    history.page_gate.set()
    await task
    hub.deliver(make_message("news", 6))
    await until_seqs(resumed, [1, 2, 3, 4, 5, 6])
    assert watcher.seqs() == [4, 5, 6]


async def test_resume_within_recent_messages_reads_no_history() -> None:
    history = MemoryHistory()
    for seq in range(1, 11):
        history.store("news", seq)
    hub, _ = await make_hub(history)
    clients = [FakeClient() for _ in range(100)]
    for client in clients:
        await hub.subscribe(client, "news", since=7, reply=client.reply)
    hub.deliver(make_message("news", 11))
    await wait_until(lambda: clients[-1].seqs() == [8, 9, 10, 11], "the last client's seqs")
    assert history.page_calls == 0 and history.recent_calls == 1
    assert all(c.seqs() == [8, 9, 10, 11] and c.replies == [(10, True)] for c in clients)


async def test_resume_from_trimmed_history_is_not_recovered() -> None:
    history = MemoryHistory()
    for seq in range(5, 9):  # 1..4 were removed by retention
        history.store("news", seq)
    history.latest["news"] = 8
    hub, _ = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=1, reply=client.reply)
    await until_seqs(client, [5, 6, 7, 8])
    assert client.replies == [(8, False)]


async def test_resume_with_nothing_missed_is_recovered() -> None:
    history = MemoryHistory()
    history.store("news", 1)
    hub, _ = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=1, reply=client.reply)
    assert client.replies == [(1, True)]


async def test_each_message_is_encoded_once_per_format() -> None:
    calls = {codec.name: 0 for codec in CODECS.values()}

    class Counting:
        def __init__(self, inner: Codec) -> None:
            self.inner = inner
            self.name = inner.name
            self.binary = inner.binary

        def encode_message(self, message: ChannelMessage) -> Any:
            calls[self.name] += 1
            return self.inner.encode_message(message)

        def send_event(self, payload: Any) -> dict[str, Any]:
            return self.inner.send_event(payload)

        def decode(self, payload: Any) -> Any:
            return self.inner.decode(payload)

    history = MemoryHistory()
    hub, _ = await make_hub(history)
    by_format = {
        codec.name: [FakeClient(Counting(codec)) for _ in range(30)]  # type: ignore[arg-type]  # a duck-typed codec
        for codec in CODECS.values()
    }
    clients = [client for group in by_format.values() for client in group]
    for client in clients:
        await hub.subscribe(client, "news", since=None, reply=client.reply)
    for seq in (1, 2, 3):
        hub.deliver(make_message("news", seq))
    await wait_until(
        lambda: all(client.seqs() == [1, 2, 3] for client in clients), "every client's seqs"
    )
    assert calls == {name: 3 for name in by_format}
    assert all(client.seqs() == [1, 2, 3] for client in clients)
    for group in by_format.values():  # one frame per message, shared by its subscribers
        for n in range(3):
            assert all(client.payloads[n] is group[0].payloads[n] for client in group)


async def test_slow_subscriber_overflows_without_affecting_others() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history)
    fast = FakeClient()
    slow = FakeClient(max_frames=3)
    slow.outbox._send = _never_returns
    for client in (fast, slow):
        await hub.subscribe(client, "news", since=None, reply=client.reply)
    for seq in range(1, 21):
        hub.deliver(make_message("news", seq))
    await until_seqs(fast, list(range(1, 21)))
    assert slow.overflowed


async def test_drop_oldest_channel_drops_instead_of_disconnecting() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history, drop_oldest_patterns=["ticker:*"])
    slow = FakeClient(max_frames=3)
    gate = asyncio.Event()
    original_send = slow._send

    async def gated_send(event: dict[str, Any]) -> None:
        await gate.wait()
        await original_send(event)

    slow.outbox._send = gated_send
    await hub.subscribe(slow, "ticker:ACME", since=None, reply=slow.reply)
    for seq in range(1, 11):
        hub.deliver(make_message("ticker:ACME", seq))
    gate.set()
    await wait_until(lambda: 10 in slow.seqs(), "the newest ticker frame")
    assert not slow.overflowed
    seqs = slow.seqs()
    assert seqs == sorted(seqs) and seqs[-1] == 10 and len(seqs) <= 4


async def test_empty_channel_is_left_after_linger() -> None:
    history = MemoryHistory()
    hub, membership = await make_hub(history, linger_secs=0.05)
    client = FakeClient()
    subscription = await hub.subscribe(client, "news", since=None, reply=client.reply)
    hub.unsubscribe(subscription)
    await wait_until(lambda: "news" not in hub.channels, "the channel to be left")
    assert membership.left == ["news"]
    again = FakeClient()
    await hub.subscribe(again, "news", since=None, reply=again.reply)
    assert membership.joined == ["news", "news"]


class HistoryAway(MemoryHistory):
    """PostgreSQL unreachable (and nothing cached): a channel's latest seq cannot be read."""

    async def recent(self, channel: str, count: int, max_bytes: int = 10**9) -> HistoryPage:
        raise ConnectionError("the database is away")


async def test_a_join_that_fails_after_the_broker_joined_leaves_the_broker_again() -> None:
    """The broker reads the channel's group (and the node counted the channel occupied)
    before the hub reads its latest seq: when that read fails, the subscribe is refused
    and the channel forgotten here, so no linger would ever end it. The group is left at
    once, and a later subscribe joins afresh."""
    history = HistoryAway()
    hub, membership = await make_hub(history)
    client = FakeClient()
    with pytest.raises(PushError) as refused:
        await hub.subscribe(client, "news", since=None, reply=client.reply)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "news" not in hub.channels
    assert membership.joined == ["news"]
    assert membership.left == ["news"]


class GatedRecent(MemoryHistory):
    """A channel's latest seq read held until ``gate`` opens, then ``failure`` raised
    (None: read as usual)."""

    def __init__(self, failure: BaseException | None = None) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.failure = failure

    async def recent(self, channel: str, count: int, max_bytes: int = 10**9) -> HistoryPage:
        self.recent_calls += 1
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return await super().recent(channel, count, max_bytes)


async def _two_subscribes_at_the_join(
    history: GatedRecent, hub: Hub
) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    """One subscribe of ``news`` joining it, held at its read; another waiting for it."""
    clients = FakeClient(), FakeClient()
    joining, waiting = (
        asyncio.create_task(hub.subscribe(c, "news", since=None, reply=c.reply)) for c in clients
    )
    await wait_until(lambda: history.recent_calls == 1, "the join reading the latest seq")
    for _ in range(3):  # the other subscribe's turns: it finds the join under way
        await asyncio.sleep(0)
    assert not waiting.done() and history.recent_calls == 1
    return joining, waiting


@pytest.mark.parametrize(
    ("stage", "failure", "told"),
    [
        (
            "join",
            ConnectionError("redis:6379 refused"),
            "message broker unavailable: ConnectionError",
        ),
        ("history", ConnectionError("db:5432 refused"), "history unavailable: ConnectionError"),
        (
            "history",
            PushError(ErrorCode.UNAVAILABLE, "database unavailable: OperationalError"),
            "database unavailable: OperationalError",
        ),
    ],
)
async def test_a_failed_join_tells_every_waiting_subscribe_what_failed(
    stage: str, failure: BaseException, told: str
) -> None:
    """The subscribe that joins and those waiting for its join get one answer, which
    names the part that failed: the broker's join or the history read after it."""
    history = GatedRecent(failure if stage == "history" else None)

    class FailingMembership(Membership):
        async def join(self, channel: str) -> None:
            await super().join(channel)
            if stage == "join":
                await history.gate.wait()
                raise failure

    hub, membership = await make_hub(history, membership=FailingMembership())
    if stage == "join":
        history.recent_calls = 1  # (the join fails before any read)
        clients = FakeClient(), FakeClient()
        joining, waiting = (
            asyncio.create_task(hub.subscribe(c, "news", since=None, reply=c.reply))
            for c in clients
        )
        await wait_until(lambda: membership.joined == ["news"], "the broker's join under way")
        for _ in range(3):
            await asyncio.sleep(0)
    else:
        joining, waiting = await _two_subscribes_at_the_join(history, hub)
    history.gate.set()
    for subscribe in (joining, waiting):
        with pytest.raises(PushError) as refused:
            await subscribe
        assert (refused.value.code, refused.value.message) == (ErrorCode.UNAVAILABLE, told)
    assert "news" not in hub.channels


async def test_a_subscribe_cancelled_while_joining_stays_cancelled_and_the_waiting_one_joins() -> (
    None
):
    """The client that started the join went away: its subscribe is cancelled (not
    refused), the group is left, and the subscribe that waited joins afresh."""
    history = GatedRecent()
    hub, membership = await make_hub(history)
    joining, waiting = await _two_subscribes_at_the_join(history, hub)
    joining.cancel()
    await asyncio.wait({joining})
    assert joining.cancelled()
    history.gate.set()
    subscription = await waiting
    assert subscription.channel is hub.channels["news"]
    assert membership.joined == ["news", "news"] and membership.left == ["news"]


async def test_channels_emptied_at_once_are_left_one_per_loop_turn() -> None:
    """A client that held 200 subscriptions leaves: their lingers end in the same turn,
    and the channels are left one at a time, the loop running everything else between
    leaves (here a ticker standing for the node's other work)."""
    log: list[str] = []

    class LoggedMembership(Membership):
        async def leave(self, channel: str) -> None:
            log.append("leave")
            await super().leave(channel)

    hub, membership = await make_hub(
        MemoryHistory(), membership=LoggedMembership(), linger_secs=0.01
    )
    client = FakeClient()
    channels = [f"room-{n}" for n in range(200)]
    subscriptions = [
        await hub.subscribe(client, channel, since=None, reply=client.reply) for channel in channels
    ]
    for subscription in subscriptions:
        hub.unsubscribe(subscription)
    while len(membership.left) < len(channels):
        log.append("tick")
        await asyncio.sleep(0)
    assert membership.left == channels and not hub.channels
    between = [len(run) for run in "".join("L" if e == "leave" else " " for e in log).split()]
    assert max(between) == 1


async def test_a_channel_waiting_to_be_left_keeps_a_subscriber_that_comes_back() -> None:
    gate = asyncio.Event()

    class GatedMembership(Membership):
        async def leave(self, channel: str) -> None:
            await gate.wait()
            await super().leave(channel)

    hub, membership = await make_hub(
        MemoryHistory(), membership=GatedMembership(), linger_secs=0.01
    )
    client = FakeClient()
    first = await hub.subscribe(client, "first", since=None, reply=client.reply)
    second = await hub.subscribe(client, "second", since=None, reply=client.reply)
    hub.unsubscribe(first)
    hub.unsubscribe(second)
    # "first" is being left (its leave waits at the gate); "second" waits its turn.
    await wait_until(lambda: hub.channels["first"].state is ChannelState.LEAVING, "first leaving")
    back = FakeClient()
    # Bounded only so that a subscribe stuck behind the gate fails instead of hanging.
    await asyncio.wait_for(hub.subscribe(back, "second", since=None, reply=back.reply), 5.0)
    assert membership.joined == ["first", "second"]  # still joined: no join again
    gate.set()
    await wait_until(lambda: "first" not in hub.channels, "the first channel left")
    await asyncio.sleep(0.05)  # more than its linger: nothing more is left
    assert membership.left == ["first"]
    hub.deliver(make_message("second", 1))
    assert back.seqs() == [1]


async def _never_returns(event: dict[str, Any]) -> None:
    await asyncio.Event().wait()


@pytest.fixture(autouse=True)
def _no_database() -> None:
    """These tests never touch the database."""


async def test_a_replay_slower_than_the_channel_holds_a_bounded_buffer() -> None:
    history = MemoryHistory()
    for seq in range(1, 6):
        history.store("busy", seq)
    hub, _ = await make_hub(history, recent_size=0)
    watcher = FakeClient(max_frames=5000)
    await hub.subscribe(watcher, "busy", since=None, reply=watcher.reply)
    history.page_gate = asyncio.Event()
    resumed = FakeClient(max_frames=5000)
    resuming = asyncio.create_task(hub.subscribe(resumed, "busy", since=0, reply=resumed.reply))
    await wait_until(lambda: history.page_calls == 1, "the replay's history read")
    # The replay's first read is stuck while the channel runs far ahead of it.
    last = 5 + MAX_PENDING_PER_CHANNEL + 100
    for seq in range(6, last + 1):
        hub.deliver(history.store("busy", seq))
    (held,) = hub.channels["busy"].catching_up
    assert held.buffer is not None and len(held.buffer) <= MAX_PENDING_PER_CHANNEL
    history.page_gate.set()
    await resuming
    hub.deliver(history.store("busy", last + 1))
    await until_seqs(resumed, list(range(1, last + 2)))


async def test_a_since_past_everything_stored_is_not_recovered_and_goes_live() -> None:
    history = MemoryHistory()
    for seq in (1, 2):
        history.store("news", seq)
    hub, _ = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=10**12, reply=client.reply)
    hub.deliver(history.store("news", 3))
    await until_seqs(client, [3])
    assert client.replies == [(2, False)]


class BrokenOutbox(Outbox):
    """An outbox whose push raises, as a bug or a server that broke under us would."""

    __slots__ = ()

    def push(self, frame: Any) -> bool:
        if self.closed:
            return False
        raise RuntimeError("write failed")


async def test_a_subscriber_whose_push_raises_does_not_keep_the_message_from_the_others() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history)
    clients = [FakeClient() for _ in range(4)]
    failures: list[BaseException] = []
    broken = clients[1]
    broken.outbox = BrokenOutbox(
        broken._send,
        max_frames=10,
        max_bytes=10**9,
        on_overflow=broken._overflow,
        on_send_failed=failures.append,
    )
    for client in clients:
        await hub.subscribe(client, "news", since=None, reply=client.reply)
    for seq in (1, 2):
        hub.deliver(make_message("news", seq))
    hub.deliver_event("news", {"type": "join", "channel": "news", "member": {"user_id": 1}})
    last = clients[-1]
    await wait_until(lambda: [m["type"] for m in last.sent][-1:] == ["join"], "the join event")
    for client in (clients[0], clients[2], clients[3]):
        assert client.seqs() == [1, 2]
        assert client.sent[-1]["type"] == "join"
    # The broken one is failed once (its owner closes it 1011) and then left alone.
    assert [str(exc) for exc in failures] == ["write failed"]
    assert broken.outbox.closed and broken.sent == []
