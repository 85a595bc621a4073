"""A node's view of the presence channels it serves (push.cluster.presence_views): the
joins and leaves it did not hear while its pub/sub connection was down reach its
subscribers once it is subscribed again, a batch of channels at a time.

"Not heard" is made here by a second presence store with no relay: its joins and
leaves change Redis and are sent to no node, as those published while a node's
connection was down never reached it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from push.cluster.presence import Member, PresenceStore, member
from push.cluster.presence_views import PresenceViews
from push.services.runtime import get_node
from push.tests.test_presence import ROOM, _join, _member_token
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


def _unheard_store(node: Any) -> PresenceStore:
    """Another node's store whose changes no node hears."""
    return PresenceStore(node.presence.redis, node.presence.prefix, "presence-unheard-node")


async def _listed(client: Any, request_id: str) -> list[Any]:
    listing = await client.request({"type": "presence", "channel": ROOM, "id": request_id})
    return sorted(str(m["user_id"]) for m in listing["members"])


async def test_the_changes_a_node_did_not_hear_reach_its_subscribers_once_it_hears_again(
    wire_format: str,
) -> None:
    node = await get_node()
    ann_id, ann = await sync_to_async(_member_token)("ann")
    watcher = await _join(ann, wire_format)
    await watcher.recv_type("join")
    await wait_until(lambda: node.presence_views.members(ROOM), "the node's view of the room")
    unheard = _unheard_store(node)
    zed = member("zed", {"name": "Zed"})
    try:
        assert await unheard.join(ROOM, "c-zed", zed)
        # Its list is what it was told: no zed yet, as no join of zed came.
        assert await _listed(watcher, "before") == [str(ann_id)]

        node._on_resubscribed()
        joined = await watcher.recv_type("join")
        assert joined["member"] == zed
        assert await _listed(watcher, "joined") == sorted([str(ann_id), "zed"])

        assert await unheard.leave(ROOM, "c-zed") == zed
        node._on_resubscribed()
        left = await watcher.recv_type("leave")
        assert left["member"] == zed
        # Nothing missed since: nothing is sent.
        node._on_resubscribed()
        await watcher.expect_nothing(0.5)
        assert await _listed(watcher, "left") == [str(ann_id)]
    finally:
        await unheard.leave(ROOM, "c-zed")
        await watcher.close()


async def test_thousands_of_channels_are_read_in_bounded_batches_one_at_a_time() -> None:
    """A node serving many presence channels reads them after an outage a batch per
    round trip, never two batches at once, and passes on only what changed."""
    node = await get_node()
    store = node.presence
    delivered: list[tuple[str, str, Member]] = []
    views = PresenceViews(store, deliver=lambda *event: delivered.append(event), batch_channels=40)
    batches: list[int] = []
    reading = 0

    async def heard_all_before(channels: list[str]) -> None:
        return None  # nothing is published to these channels but by this test

    read_many = store.members_of

    async def counted(channels: list[str]) -> dict[str, list[Member]]:
        nonlocal reading
        reading += 1
        assert reading == 1, "two batches read at once"
        batches.append(len(channels))
        try:
            return await read_many(channels)
        finally:
            reading -= 1

    store.members_of = counted  # type: ignore[method-assign]  # counts this store's reads
    views.hear_with(heard_all_before)
    channels = [f"presence-many-{n}" for n in range(1000)]
    unheard = _unheard_store(node)
    runner = asyncio.ensure_future(views.run())
    try:
        for channel in channels:
            views.track(channel)
        await wait_until(lambda: sum(batches) == len(channels), "every view read", timeout=30)
        assert max(batches) == 40
        for channel in channels[::100]:
            assert await unheard.join(channel, "c-amy", member("amy", {}))
        batches.clear()
        views.resubscribed()
        await wait_until(lambda: sum(batches) == len(channels), "every view read again", timeout=30)
        assert max(batches) == 40
        assert sorted(delivered) == sorted(
            (channel, "join", member("amy", {})) for channel in channels[::100]
        )
    finally:
        runner.cancel()
        for channel in channels[::100]:
            await unheard.leave(channel, "c-amy")


async def test_a_member_put_back_in_redis_during_a_read_is_not_passed_on_as_gone() -> None:
    """Redis lost a member its node still holds; the node's repair puts it back just
    after the view's read, and the join is heard before the read is compared. The
    view lists it already, so the join is not passed on, and the read does not show
    it: the member is there all along, and its subscribers hear nothing of it."""
    node = await get_node()
    channel = "presence-put-back"
    amy = member("amy", {})
    delivered: list[tuple[str, str, Member]] = []

    def pass_on(channel: str, kind: str, changed: Member) -> None:  # as the node's
        if views.heard(channel, kind, changed):
            node.presence.heard(channel, kind, changed)
            delivered.append((channel, kind, changed))

    views = PresenceViews(node.presence, deliver=pass_on)
    unheard = _unheard_store(node)
    # Set to 0 to make the repair's join: when the read, between the two calls, is made.
    calls: int | None = None

    async def heard_all_before(channels: list[str]) -> None:
        nonlocal calls
        if calls is None:
            return
        calls += 1
        if calls == 2:
            assert await unheard.join(channel, "c-amy", amy)  # the repair's join...
            pass_on(channel, "join", amy)  # ...heard: the view has amy already

    views.hear_with(heard_all_before)
    runner = asyncio.ensure_future(views.run())
    try:
        assert await unheard.join(channel, "c-amy", amy)
        views.track(channel)
        await wait_until(lambda: views._views[channel].members, "the view read")
        await unheard.leave(channel, "c-amy")  # Redis lost it, its node did not
        calls = 0
        views.resubscribed()
        await wait_until(lambda: calls == 2 and not views._due, "read again")
        await asyncio.sleep(0.2)
        assert delivered == []
        assert [m["user_id"] for m in await views.members(channel) or []] == ["amy"]
    finally:
        runner.cancel()
        await unheard.leave(channel, "c-amy")
