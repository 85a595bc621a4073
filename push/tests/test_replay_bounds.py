"""What a resume may cost the node: a replay stops when its client leaves, goes out a
slice at a time with the node serving everyone else in between, replays hold bounded
slots per node and per address, and the hub's buffers are bounded in bytes as well as
in messages."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from prometheus_client import REGISTRY

from common.errors import ErrorCode, PushError
from push.fanout.hub import REPLAY_SLICE_FRAMES
from push.fanout.message import ChannelMessage
from push.fanout.replay_slots import ReplaySlots
from push.models import Channel, Message
from push.storage.history import DatabaseHistory
from push.tests.test_hub import FakeClient, MemoryHistory, make_hub, make_message, until_seqs
from tests.waiting import wait_until

# 300 characters of data: three of them fit in a budget of 1000 bytes, four do not.
BIG_DATA = json.dumps("x" * 298)


def big_message(channel: str, seq: int) -> ChannelMessage:
    return ChannelMessage(
        channel=channel,
        seq=seq,
        message_id=str(uuid.uuid4()),
        data_json=BIG_DATA,
        timestamp=time.time(),
    )


def store_big(history: MemoryHistory, channel: str, seq: int) -> ChannelMessage:
    message = big_message(channel, seq)
    history.stored.setdefault(channel, []).append(message)
    history.latest[channel] = max(history.latest.get(channel, 0), seq)
    return message


def client_from(ip: str) -> FakeClient:
    client = FakeClient()
    client.ip = ip
    return client


class UnreadClient(FakeClient):
    """A client that reads nothing: what is sent to it waits in its queue."""

    async def _send(self, event: dict[str, Any]) -> None:
        await asyncio.Event().wait()


def rows_read() -> float:
    return REGISTRY.get_sample_value("push_history_rows_read_total") or 0.0


def _store_rows(channel: str, count: int) -> None:
    stored = Channel.objects.create(name=channel, last_seq=count)
    now = datetime.now(tz=UTC)
    Message.objects.bulk_create(
        Message(channel=stored, seq=seq, message_id=uuid.uuid4(), data=str(seq), created_at=now)
        for seq in range(1, count + 1)
    )


# ----- a replay stops when its client leaves (real PostgreSQL) ------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_replay_reads_no_more_history_once_its_client_left() -> None:
    """The client subscribes from 0 to 3,000 stored messages and leaves at once. Its
    sends still succeed (as a closed socket's do under daphne), so only knowing that
    it left stops the replay: one page is read, not the channel's whole history."""
    await sync_to_async(_store_rows)("deep", 3000)
    hub, _ = await make_hub(DatabaseHistory(), recent_size=1)
    client = FakeClient(max_frames=100)  # pages of 50

    def leave(seq: int, recovered: bool | None) -> None:
        client.gone = True

    before = rows_read()
    subscription = await hub.subscribe(client, "deep", since=0, reply=leave)
    read = rows_read() - before
    assert not subscription.active
    assert read <= 1 + 50  # the join's recent message and the first page
    # The point is a window in which no more history may be read: a replay that went
    # on would read its next pages within it.
    await asyncio.sleep(0.3)
    assert rows_read() - before == read
    assert hub.channels["deep"].subscriber_count() == 0


@pytest.mark.django_db(transaction=True)
async def test_a_replay_waiting_for_its_client_to_read_stops_when_it_leaves() -> None:
    await sync_to_async(_store_rows)("stalled", 3000)
    hub, _ = await make_hub(DatabaseHistory(), recent_size=1)
    client = UnreadClient(max_frames=100)
    before = rows_read()
    resuming = asyncio.create_task(hub.subscribe(client, "stalled", since=0, reply=client.reply))
    outbox = client.outbox
    await wait_until(
        lambda: len(outbox) > outbox.max_frames // 2, "the replay to fill the unread queue"
    )
    assert not resuming.done()  # waiting for the client to read its queue
    read = rows_read() - before
    client.gone = True
    subscription = await asyncio.wait_for(resuming, 0.5)
    assert not subscription.active
    # The point is a window in which no more history may be read (as above).
    await asyncio.sleep(0.2)
    assert rows_read() - before == read <= 1 + 100


# ----- a replay leaves room for everyone else ---------------------------------------


class LoggedClient(FakeClient):
    """A client that notes its name in a log shared with others each time it is sent a
    frame: the order in which the node served them."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name = name
        self.log = log

    async def _send(self, event: dict[str, Any]) -> None:
        self.log.append(self.name)
        await super()._send(event)


@pytest.mark.django_db(transaction=True)
async def test_live_messages_go_out_between_the_slices_of_a_replay() -> None:
    """A client resumes 500 stored messages (one page of history) while another
    channel's messages keep coming, one per loop turn as a publisher's would. The
    replay is sent a slice at a time, so the other client is served between slices:
    never more than a slice of the replay goes out between two of its messages."""
    await sync_to_async(_store_rows)("deep", 500)
    hub, _ = await make_hub(DatabaseHistory(), recent_size=1)
    log: list[str] = []
    watcher = LoggedClient("watcher", log)
    await hub.subscribe(watcher, "live", since=None, reply=watcher.reply)
    resumed = LoggedClient("resumed", log)
    resuming = asyncio.create_task(hub.subscribe(resumed, "deep", since=0, reply=resumed.reply))
    seq = 0
    while not resuming.done():
        seq += 1
        hub.deliver(make_message("live", seq))
        await asyncio.sleep(0)
    await resuming
    assert resumed.seqs() == list(range(1, 501))
    assert watcher.seqs() == list(range(1, seq + 1))
    between = [len(run) for run in "".join("r" if n == "resumed" else " " for n in log).split()]
    assert max(between) <= REPLAY_SLICE_FRAMES


# ----- replay slots ------------------------------------------------------------------


async def test_replays_are_bounded_per_address_and_per_node() -> None:
    history = MemoryHistory()
    for seq in range(1, 11):
        history.store("deep", seq)
    slots = ReplaySlots(per_node=2, per_ip=1, wait_secs=0.2)
    hub, _ = await make_hub(history, recent_size=1, replay_slots=slots)
    history.page_gate = asyncio.Event()  # replays hold their slot while they read
    first = client_from("10.0.0.1")
    first_task = asyncio.create_task(hub.subscribe(first, "deep", since=0, reply=first.reply))
    await wait_until(lambda: slots.in_use == 1, "the first replay to take its slot")

    same_address = client_from("10.0.0.1")
    with pytest.raises(PushError) as refused:
        await hub.subscribe(same_address, "deep", since=0, reply=same_address.reply)
    assert refused.value.code is ErrorCode.RATE_LIMITED

    second = client_from("10.0.0.2")
    second_task = asyncio.create_task(hub.subscribe(second, "deep", since=0, reply=second.reply))
    await wait_until(lambda: slots.in_use == 2, "the second replay to take its slot")
    third = client_from("10.0.0.3")
    with pytest.raises(PushError) as refused:
        await hub.subscribe(third, "deep", since=0, reply=third.reply)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert slots.in_use == 2

    # A resume that the node's recent messages serve reads nothing and needs no slot.
    from_memory = client_from("10.0.0.1")
    calls = history.page_calls
    await hub.subscribe(from_memory, "deep", since=9, reply=from_memory.reply)
    assert (from_memory.seqs(), history.page_calls) == ([10], calls)

    # A waiter whose client leaves stops waiting at once.
    slots.wait_secs = 30.0
    leaving = client_from("10.0.0.4")
    waiting = asyncio.create_task(hub.subscribe(leaving, "deep", since=0, reply=leaving.reply))
    catching_up = hub.channels["deep"].catching_up
    await wait_until(
        lambda: any(s.subscriber is leaving for s in catching_up), "the replay waiting for a slot"
    )
    leaving.gone = True
    assert not (await asyncio.wait_for(waiting, 0.5)).active
    assert leaving.replies == []

    history.page_gate.set()
    await first_task
    await second_task
    await until_seqs(first, list(range(1, 11)))
    await until_seqs(second, list(range(1, 11)))


async def test_an_ipv6_hosts_replays_are_bounded_per_64_block() -> None:
    """One host may pick any address of its /64 (privacy addresses): the address's slots
    are its block's, as every other per-address limit is. Counted per exact address, one
    host resuming from 16 of its addresses took all 64 slots of a node, and a reader
    that stops reading holds its slot as long as its queue has room (hours of pings)."""
    history = MemoryHistory()
    for seq in range(1, 11):
        history.store("deep", seq)
    slots = ReplaySlots(per_node=4, per_ip=1, wait_secs=0.2)
    hub, _ = await make_hub(history, recent_size=1, replay_slots=slots)
    history.page_gate = asyncio.Event()
    first = client_from("2001:db8:0:1::a")
    first_task = asyncio.create_task(hub.subscribe(first, "deep", since=0, reply=first.reply))
    await wait_until(lambda: slots.in_use == 1, "the first replay to take its slot")
    same_block = client_from("2001:db8:0:1:ffff::b")
    with pytest.raises(PushError) as refused:
        # (Let in, it would wait for the gated read.)
        await asyncio.wait_for(
            hub.subscribe(same_block, "deep", since=0, reply=same_block.reply), 5
        )
    assert refused.value.code is ErrorCode.RATE_LIMITED
    other_block = client_from("2001:db8:0:2::a")
    other_task = asyncio.create_task(
        hub.subscribe(other_block, "deep", since=0, reply=other_block.reply)
    )
    await wait_until(lambda: slots.in_use == 2, "another block's replay to take its slot")
    history.page_gate.set()
    await first_task
    await other_task
    await until_seqs(first, list(range(1, 11)))
    assert slots.in_use == 0
    assert slots.in_use == 0
    again = client_from("10.0.0.1")
    await hub.subscribe(again, "deep", since=0, reply=again.reply)
    await until_seqs(again, list(range(1, 11)))


# ----- the hub's buffers in bytes ----------------------------------------------------


async def test_a_replay_waiting_for_a_reader_that_stopped_gives_its_slot_to_others() -> None:
    """A slot bounds the history reads running at once; a replay waiting for its client
    to read its queue down reads nothing, and gives its slot back until its next page.
    Held, one reader that stopped reading (its queue never empties, and the stream's
    pings or its own heartbeats keep it open) held the slot for hours: with 4 per
    address and 64 per node, a few such readers had every other resume refused."""
    history = MemoryHistory()
    for seq in range(1, 301):
        history.store("deep", seq)
    slots = ReplaySlots(per_node=1, per_ip=1, wait_secs=0.2)
    hub, _ = await make_hub(history, recent_size=1, replay_slots=slots)
    stalled = UnreadClient(max_frames=100)  # pages of 50
    stalled.ip = "10.0.0.1"
    stalled_task = asyncio.create_task(hub.subscribe(stalled, "deep", since=0, reply=stalled.reply))
    outbox = stalled.outbox
    await wait_until(
        lambda: len(outbox) > outbox.max_frames // 2, "the replay to fill the unread queue"
    )
    other = client_from("10.0.0.2")
    await hub.subscribe(other, "deep", since=0, reply=other.reply)
    await until_seqs(other, list(range(1, 301)))
    assert not stalled_task.done() and slots.in_use == 0
    # Its address's slot stays held: what one address makes the node hold (each
    # replay's page and queue) stays bounded by its slots, stalled or not.
    same_address = client_from("10.0.0.1")
    with pytest.raises(PushError) as refused:
        await hub.subscribe(same_address, "deep", since=0, reply=same_address.reply)
    assert refused.value.code is ErrorCode.RATE_LIMITED
    stalled.gone = True
    assert not (await asyncio.wait_for(stalled_task, 1)).active
    assert slots.in_use == 0
    again = client_from("10.0.0.1")  # and given back when the replay ended
    await hub.subscribe(again, "deep", since=0, reply=again.reply)
    await until_seqs(again, list(range(1, 301)))


async def test_recent_messages_are_bounded_in_bytes() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history, recent_bytes=1000)
    client = FakeClient()
    await hub.subscribe(client, "wide", since=None, reply=client.reply)
    for seq in range(1, 11):
        hub.deliver(store_big(history, "wide", seq))
    recent = hub.channels["wide"].recent
    assert [m.seq for m in recent] == [8, 9, 10]
    assert recent.bytes <= 1000


async def test_the_reorder_buffer_is_bounded_in_bytes_and_the_gap_still_fills() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history, pending_bytes=1000, gap_wait_secs=5.0)
    client = FakeClient()
    await hub.subscribe(client, "gappy", since=None, reply=client.reply)
    store_big(history, "gappy", 1)  # committed, but its broadcast is late
    for seq in range(2, 21):
        hub.deliver(store_big(history, "gappy", seq))
        assert hub.channels["gappy"].pending_bytes <= 1000
    await until_seqs(client, list(range(1, 21)))


async def test_a_replays_buffer_of_live_messages_is_bounded_in_bytes() -> None:
    history = MemoryHistory()
    for seq in range(1, 6):
        history.store("busy", seq)
    hub, _ = await make_hub(history, recent_size=0, pending_bytes=1000)
    watcher = FakeClient(max_frames=5000)
    await hub.subscribe(watcher, "busy", since=None, reply=watcher.reply)
    history.page_gate = asyncio.Event()
    resumed = FakeClient(max_frames=5000)
    resuming = asyncio.create_task(hub.subscribe(resumed, "busy", since=0, reply=resumed.reply))
    await wait_until(lambda: history.page_calls == 1, "the replay's history read")
    for seq in range(6, 40):
        hub.deliver(store_big(history, "busy", seq))
        (held,) = hub.channels["busy"].catching_up
        assert held.buffer_bytes <= 1000
    history.page_gate.set()
    await resuming
    await until_seqs(resumed, list(range(1, 40)))


class RecordingHistory(DatabaseHistory):
    def __init__(self) -> None:
        self.pages: list[int] = []

    async def page(self, channel: str, since: int, limit: int, max_bytes: int) -> Any:
        page = await super().page(channel, since, limit, max_bytes)
        self.pages.append(len(page.messages))
        return page


def _store_large_rows(channel: str, count: int, size: int) -> None:
    stored = Channel.objects.create(name=channel, last_seq=count)
    now = datetime.now(tz=UTC)
    Message.objects.bulk_create(
        Message(
            channel=stored,
            seq=seq,
            message_id=uuid.uuid4(),
            data=json.dumps(f"{seq}:" + "z" * size),
            created_at=now,
        )
        for seq in range(1, count + 1)
    )


@pytest.mark.django_db(transaction=True)
async def test_a_replay_reads_history_in_pages_bounded_in_bytes() -> None:
    """Messages of 100 KB against a replay budget of 250 KB: pages of two, and the
    client still receives every message once, in order."""
    await sync_to_async(_store_large_rows)("large", 7, 100_000)
    history = RecordingHistory()
    hub, _ = await make_hub(history, recent_size=1, replay_batch_bytes=250_000)
    client = FakeClient()
    await hub.subscribe(client, "large", since=0, reply=client.reply)
    await until_seqs(client, list(range(1, 8)))
    assert history.pages == [2, 2, 2, 1]


async def _resume_from_zero(hub: Any, seqs: list[int]) -> FakeClient:
    client = FakeClient(max_frames=20)  # pages of 10 messages
    await hub.subscribe(client, "news", since=0, reply=client.reply)
    await until_seqs(client, seqs)
    return client


async def test_resumes_of_one_range_share_every_page_read_while_the_channel_is_still() -> None:
    """Clients that resume from 0 one after another (as an attacker who subscribes and
    leaves again and again would) cost one history read per page, not one per client."""
    history = MemoryHistory()
    for seq in range(1, 36):
        history.store("news", seq)
    hub, _ = await make_hub(history, recent_size=2)
    await _resume_from_zero(hub, list(range(1, 36)))
    assert history.page_calls == 4  # after 0, 10, 20 and 30
    for _ in range(3):
        await _resume_from_zero(hub, list(range(1, 36)))
    assert history.page_calls == 4


async def test_kept_pages_are_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the bound a page is shared only while its read runs: read again after."""
    # The pages after 0 and 10 hold 81 and 90 characters of data ({"n": 1} ...): both
    # fit in 180, the next two do not.
    monkeypatch.setattr("push.fanout.hub.PAGE_REUSE_MAX_BYTES", 180)
    history = MemoryHistory()
    for seq in range(1, 36):
        history.store("news", seq)
    hub, _ = await make_hub(history, recent_size=2)
    await _resume_from_zero(hub, list(range(1, 36)))
    await _resume_from_zero(hub, list(range(1, 36)))
    assert history.page_calls == 4 + 2
