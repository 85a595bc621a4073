"""Races between a subscribe and the hub's own bookkeeping, staged exactly: what a
subscriber receives when the hub leaves, repairs or rejoins a channel while the
subscribe is between two awaits."""

from __future__ import annotations

import asyncio

import pytest

from push.fanout.hub import ChannelState
from push.tests.test_hub import FakeClient, Membership, MemoryHistory, make_hub, make_message
from tests.waiting import wait_until


class GatedLatest(MemoryHistory):
    """``latest_seqs`` waits at a gate once armed: a resume from ahead of the node is
    held between its channel lookup and its attach."""

    def __init__(self) -> None:
        super().__init__()
        self.latest_gate: asyncio.Event | None = None
        self.latest_waiting = asyncio.Event()

    async def latest_seqs(self, channels: list[str]) -> dict[str, int]:
        if self.latest_gate is not None:
            self.latest_waiting.set()
            await self.latest_gate.wait()
        return await super().latest_seqs(channels)


async def test_a_resume_ahead_of_the_node_is_not_attached_to_a_channel_being_left() -> None:
    """A client resumes with a ``since`` this node has not reached yet, on a channel
    whose linger is over and which waits its turn to be left. While the hub reads the
    channel's latest seq, the leaver takes the channel (it has no subscriber yet): the
    subscription must still end up on the channel that is joined, and receive what is
    published next."""
    leave_gate = asyncio.Event()

    class GatedMembership(Membership):
        async def leave(self, channel: str) -> None:
            if channel == "first":
                await leave_gate.wait()
            await super().leave(channel)

    history = GatedLatest()
    hub, membership = await make_hub(history, membership=GatedMembership(), linger_secs=0.01)
    client = FakeClient()
    first = await hub.subscribe(client, "first", since=None, reply=client.reply)
    second = await hub.subscribe(client, "news", since=None, reply=client.reply)
    hub.unsubscribe(first)
    hub.unsubscribe(second)
    # "first" is being left (its leave waits at the gate); "news" waits its turn.
    await wait_until(lambda: hub.channels["first"].state is ChannelState.LEAVING, "first leaving")
    # Meanwhile 1..5 were published (this node did not see them yet) and a client that
    # saw them elsewhere resumes here from 5.
    for seq in range(1, 6):
        history.store("news", seq)
    history.latest_gate = asyncio.Event()
    back = FakeClient()
    resume = asyncio.ensure_future(hub.subscribe(back, "news", since=5, reply=back.reply))
    await asyncio.wait_for(history.latest_waiting.wait(), 5.0)
    leave_gate.set()  # the leaver goes on, to "news"
    await wait_until(lambda: "first" not in hub.channels, "the first channel left")
    await asyncio.sleep(0.05)
    history.latest_gate.set()
    subscription = await asyncio.wait_for(resume, 5.0)
    assert back.replies == [(5, True)]
    history.store("news", 6)
    hub.deliver(make_message("news", 6))
    await wait_until(lambda: back.seqs() == [6], "the next message", timeout=2.0)
    assert subscription.active and hub.channels["news"] is subscription.channel
    assert membership.joined == ["first", "news", "news"]  # joined again after the leave


@pytest.fixture(autouse=True)
def _no_database() -> None:
    """These tests never touch the database."""
