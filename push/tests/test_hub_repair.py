"""The hub's gap repair against real PostgreSQL rows: a node that lost a run of
broadcasts delivers every row still stored after its last seq, in order, whatever
retention lets a resume replay; only rows really deleted show as a jump in seq."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from push.fanout.hub import Hub
from push.models import Channel, Message
from push.storage.history import DatabaseHistory
from push.storage.retention import channel_trim
from push.storage.write_batch import PublishUnit, run_plan_sync
from push.tests.test_hub import FakeClient, PusherSocket, make_hub, until_seqs
from push.tests.test_replay_bounds import UnreadClient
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MISSED = 60


@pytest.fixture(autouse=True)
def _small_retention() -> Iterator[None]:
    """Far fewer than the node misses: retention must not decide what a live
    subscriber gets while the rows are still there."""
    with override_settings(PUSH={"RETENTION_MAX_MESSAGES": 10}):
        yield


def _store_rows(channel: str, first: int, last: int) -> None:
    stored, _ = Channel.objects.get_or_create(name=channel)
    now = datetime.now(tz=UTC)
    Message.objects.bulk_create(
        Message(channel=stored, seq=seq, message_id=uuid.uuid4(), data=str(seq), created_at=now)
        for seq in range(first, last + 1)
    )
    Channel.objects.filter(pk=stored.pk).update(last_seq=last)


async def _missed_broadcasts(hub: Hub, channel: str) -> None:
    """Seqs 1 to ``MISSED`` committed while the node heard none of their broadcasts
    (its Redis paused): its periodic sync sees the channel ahead, and at the next one,
    still behind, the node repairs from history."""
    await sync_to_async(_store_rows)(channel, 1, MISSED)
    await hub.sync_with_history()
    await hub.sync_with_history()


async def test_a_node_that_missed_more_than_retention_keeps_delivers_every_stored_row() -> None:
    hub, _ = await make_hub(DatabaseHistory(), recent_size=1)
    reader = FakeClient(max_frames=20)  # repair pages of 10, paced by its reading
    await hub.subscribe(reader, "missed", since=None, reply=reader.reply)
    await _missed_broadcasts(hub, "missed")
    await until_seqs(reader, list(range(1, MISSED + 1)))
    assert not reader.overflowed
    # And live goes on from there.
    await sync_to_async(_store_rows)("missed", MISSED + 1, MISSED + 1)
    (stored,) = (await hub.history.page("missed", MISSED, 10, 10**6)).messages
    hub.deliver(stored)
    await until_seqs(reader, list(range(1, MISSED + 2)))


async def test_a_subscriber_that_cannot_take_the_repair_is_a_slow_consumer() -> None:
    """A stalled subscriber neither holds the repair back for good nor costs the reader
    beside it a message: its queue overflows (4002) and the reader gets every row."""
    hub, _ = await make_hub(DatabaseHistory(), recent_size=1)
    stalled = UnreadClient(max_frames=20)
    reader = FakeClient(max_frames=20)
    await hub.subscribe(stalled, "missed", since=None, reply=stalled.reply)
    await hub.subscribe(reader, "missed", since=None, reply=reader.reply)
    await _missed_broadcasts(hub, "missed")
    await until_seqs(reader, list(range(1, MISSED + 1)))
    assert stalled.overflowed and not reader.overflowed


async def test_rows_trimmed_away_are_skipped_as_a_jump_in_seq() -> None:
    hub, _ = await make_hub(DatabaseHistory(), recent_size=1)
    client = FakeClient()
    await hub.subscribe(client, "trimmed", since=None, reply=client.reply)
    await sync_to_async(_store_rows)("trimmed", 1, MISSED)
    channel = await Channel.objects.aget(name="trimmed")
    assert await sync_to_async(channel_trim)(channel) == MISSED - 10
    await hub.sync_with_history()
    await hub.sync_with_history()
    await until_seqs(client, list(range(MISSED - 9, MISSED + 1)))
    await wait_until(lambda: not hub.channels["trimmed"].repairing, "the repair to end")
    assert hub.channels["trimmed"].delivered_seq == MISSED


async def repair_past_exclusion(
    hub: Hub, channel: str, publish: Callable[[str, str | None], Awaitable[None]]
) -> None:
    """Two Pusher sockets on ``channel``; ``publish(data_json, exclude)`` stores "own",
    excluding the first, then "for all", with no broadcast reaching the hub: the
    repair that reads them back keeps "own" from the socket it excluded."""
    sender, other = PusherSocket("11.22"), PusherSocket("33.44")
    for client in (sender, other):
        await hub.subscribe(client, channel, since=None, reply=client.reply)
    await publish('"own"', sender.socket_id)
    await publish('"for all"', None)
    await hub.sync_with_history()
    await hub.sync_with_history()
    await until_seqs(other, [1, 2])
    await wait_until(lambda: 2 in sender.seqs(), "the sender to get the event for all")
    assert [m["data"] for m in other.sent] == ["own", "for all"]
    assert [(m["seq"], m["data"]) for m in sender.sent] == [(2, "for all")]


async def test_a_repair_keeps_a_trigger_from_the_socket_it_excluded() -> None:
    """A Pusher trigger with ``socket_id`` whose broadcast this node missed: read back
    from history, it still reaches every subscriber but the excluded socket."""

    async def publish(data_json: str, exclude: str | None) -> None:
        unit = PublishUnit(items=[("excluding", data_json)], publisher_id=None, exclude=exclude)
        await sync_to_async(run_plan_sync)([unit], window_secs=60)

    hub, _ = await make_hub(DatabaseHistory())
    await repair_past_exclusion(hub, "excluding", publish)
