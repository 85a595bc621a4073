"""The hub's ``rewind``: the channel's last N messages, then live, served from the
node's recent messages, or from one history read that concurrent subscribers share."""

from __future__ import annotations

import asyncio
from typing import Any

from push.fanout.replay_slots import ReplaySlots
from push.tests.test_hub import (
    FakeClient,
    MemoryHistory,
    PusherSocket,
    make_hub,
    make_message,
    until_seqs,
)
from tests.waiting import wait_until


async def loop_turns(count: int = 20) -> None:
    """Let every subscribe task that is ready run up to its next real wait (the gated
    history read, or the read it shares): turns of the loop, not time."""
    for _ in range(count):
        await asyncio.sleep(0)


async def read_started(history: MemoryHistory, calls: int) -> None:
    await wait_until(lambda: history.page_calls == calls, f"{calls} history read(s) begun")
    await loop_turns()


async def _hub_with(history: MemoryHistory, stored: int, **kwargs: object):  # type: ignore[no-untyped-def]  # test helper
    for seq in range(1, stored + 1):
        history.store("news", seq)
    return await make_hub(history, **kwargs)


async def test_rewind_sends_the_last_messages_from_memory_then_live() -> None:
    history = MemoryHistory()
    hub, _ = await _hub_with(history, 30)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply, rewind=5)
    assert client.replies == [(30, None)]  # no ``recovered``: the request had no since
    hub.deliver(make_message("news", 31))
    await until_seqs(client, [26, 27, 28, 29, 30, 31])
    assert history.page_calls == 0 and history.recent_calls == 1  # the join's one read


async def test_rewind_beyond_the_stored_history_sends_what_there_is() -> None:
    history = MemoryHistory()
    hub, _ = await _hub_with(history, 3)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply, rewind=100)
    await until_seqs(client, [1, 2, 3])
    assert client.replies == [(3, None)]


async def test_rewind_on_an_empty_channel_goes_live() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history)
    client = FakeClient()
    await hub.subscribe(client, "news", since=None, reply=client.reply, rewind=10)
    hub.deliver(make_message("news", 1))
    await until_seqs(client, [1])
    assert client.replies == [(0, None)]


async def test_rewind_past_memory_shares_one_history_read_and_keeps_the_seam() -> None:
    """The recent messages hold only 4: rewinds of 10 read history; the ones that start
    while the read runs share it, and messages that arrive meanwhile follow exactly:
    the last 10 end at the seq ``subscribed`` names, the latest when the read ended."""
    history = MemoryHistory()
    hub, _ = await _hub_with(history, 20, recent_size=4)
    first = FakeClient()
    await hub.subscribe(first, "news", since=None, reply=first.reply)  # joins the channel
    history.page_gate = asyncio.Event()
    clients = [FakeClient() for _ in range(50)]
    tasks = [
        asyncio.ensure_future(hub.subscribe(c, "news", since=None, reply=c.reply, rewind=10))
        for c in clients
    ]
    await read_started(history, 1)
    history.store("news", 21)
    history.store("news", 22)
    hub.deliver(make_message("news", 21))  # live while the read runs: held
    hub.deliver(make_message("news", 22))
    history.page_gate.set()
    await asyncio.gather(*tasks)
    hub.deliver(make_message("news", 23))
    for client in clients:
        await until_seqs(client, list(range(13, 24)))
        assert client.replies == [(22, None)]
    assert history.page_calls == 1


async def test_a_trigger_excluding_a_socket_mid_rewind_does_not_reach_it() -> None:
    """A Pusher cache channel's subscribe (a rewind of 1) past memory: a trigger that
    excludes the subscribing socket arrives while the read runs, is held with the
    replay, and is still kept from that socket when the replay ends."""
    history = MemoryHistory()
    hub, _ = await _hub_with(history, 20, recent_size=0)
    other = FakeClient()
    await hub.subscribe(other, "news", since=None, reply=other.reply)
    history.page_gate = asyncio.Event()
    sender = PusherSocket("11.22")
    task = asyncio.ensure_future(
        hub.subscribe(sender, "news", since=None, reply=sender.reply, rewind=1)
    )
    await read_started(history, 1)
    excluding = make_message("news", 21)  # (the page stops at 20)
    excluding.exclude = "11.22"
    hub.deliver(excluding)
    history.page_gate.set()
    await task
    assert sender.replies == [(21, None)]  # the last 1 is 21, which is not for it
    hub.deliver(make_message("news", 22))
    await until_seqs(other, [21, 22])
    await until_seqs(sender, [22])


async def test_a_read_begun_before_the_channel_moved_is_not_shared() -> None:
    """A replay that starts after a message was fanned out cannot join a read begun
    before it: that message would be in neither the page nor its buffer."""
    history = MemoryHistory()
    hub, _ = await _hub_with(history, 20, recent_size=2)
    await hub.subscribe(FakeClient(), "news", since=None, reply=lambda s, r: None)
    history.page_gate = asyncio.Event()
    early = FakeClient()
    early_task = asyncio.ensure_future(
        hub.subscribe(early, "news", since=None, reply=early.reply, rewind=5)
    )
    await read_started(history, 1)
    history.store("news", 21)
    hub.deliver(make_message("news", 21))
    late = FakeClient()
    late_task = asyncio.ensure_future(
        hub.subscribe(late, "news", since=None, reply=late.reply, rewind=5)
    )
    await read_started(history, 2)
    history.page_gate.set()
    await asyncio.gather(early_task, late_task)
    await until_seqs(early, [17, 18, 19, 20, 21])
    await until_seqs(late, [17, 18, 19, 20, 21])
    assert history.page_calls == 2


async def test_rewinds_sharing_a_read_take_no_replay_slot_and_reuse_it_after() -> None:
    """One slot per address: the first rewind takes it and reads; the others share the
    read (while it runs, or just after while the channel has not moved) without one."""
    history = MemoryHistory()
    slots = ReplaySlots(per_node=1, per_ip=1, wait_secs=0.05)
    hub, _ = await _hub_with(history, 30, recent_size=2, replay_slots=slots)
    await hub.subscribe(FakeClient(), "news", since=None, reply=lambda s, r: None)
    history.page_gate = asyncio.Event()
    clients = [FakeClient() for _ in range(20)]
    for client in clients:
        client.ip = "10.0.0.1"
    first = [
        asyncio.ensure_future(hub.subscribe(c, "news", since=None, reply=c.reply, rewind=5))
        for c in clients[:10]
    ]
    await read_started(history, 1)
    history.page_gate.set()
    await asyncio.gather(*first)
    for client in clients[10:]:  # after the read, the channel unchanged
        await hub.subscribe(client, "news", since=None, reply=client.reply, rewind=5)
    assert history.page_calls == 1 and slots.in_use == 0
    assert all(client.seqs() == [26, 27, 28, 29, 30] for client in clients)


class TrimmingHistory(MemoryHistory):
    """Retention kept the channel's messages from 25 on when a rewind's first page was
    read, and trims 27 and 28 before its second page."""

    def trim(self, first_kept: int) -> None:
        self.stored["news"] = [m for m in self.stored["news"] if m.seq >= first_kept]

    async def page(self, channel: str, since: int, limit: int, max_bytes: int = 10**9) -> Any:
        if self.page_calls == 0:
            self.trim(25)
        elif self.page_calls == 1:
            self.stored["news"] = [m for m in self.stored["news"] if m.seq not in (27, 28)]
        return await super().page(channel, since, limit, max_bytes)


async def test_a_rewind_trimmed_between_pages_closes_rather_than_skip() -> None:
    """Rewind 10 of 30 read in pages of 2: the first starts at the oldest kept message
    (fewer than asked, as the contract allows), but 27 and 28 go before the second
    page. Sending 29 after 26 would be a gap in what the rewind replays: the client
    gets 25 and 26, then 4002 ("reconnect, resume with since"), never 29 or 30."""
    history = TrimmingHistory()
    hub, _ = await _hub_with(history, 30, recent_size=1)
    await hub.subscribe(FakeClient(), "news", since=None, reply=lambda seq, recovered: None)
    client = FakeClient(max_frames=4)
    subscription = await hub.subscribe(client, "news", since=None, reply=client.reply, rewind=10)
    assert client.replies == [(30, None)]
    await until_seqs(client, [25, 26])
    assert client.overflowed and not subscription.active
    hub.deliver(make_message("news", 31))
    await loop_turns()
    assert client.seqs() == [25, 26]
