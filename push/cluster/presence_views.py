"""Presence as this node's subscribers know it, and put right after the node could not
hear for a while (its Redis pub/sub connection broke: Redis restarted, a network blip).

The joins and leaves of a channel reach a node on its pub/sub connection, in Redis'
order (``push.cluster.presence.PresenceRelay``). Those published while that connection
was being opened again never arrive: a member who left stayed listed by every
subscriber here for as long as it stayed, one who joined was never shown. So, for each
presence channel it serves, the node keeps the members its subscribers were told of (the
channel's *view*: read once when it starts serving it, then every join and leave it
passes on), answers member lists from it, and once its groups are subscribed again
reads every view's channel and passes on, as joins and leaves, each difference: every
subscriber then lists what Redis does, and is never told of a join of a member it lists
or of a leave of one it does not.

A read is made consistent with the events as ``PresenceStore.members`` answers are
(``members_after``), and more: the node asks its pub/sub connection for a PING before
and after it (``Broker.heard_all_before``), whose answer Redis queues behind every
event published before. So the read follows the groups' subscriptions, and every event
it already shows has been heard by the time it is compared, never passed on twice.
Every event heard during the read counts in it, those the view had already (and so did
not pass on) too: a repair putting a member back just after the read is one.

While it cannot hear, the node passes on its own members' joins and leaves at once
(``Node.announce_presence``), so a member's own list holds it. A join of a member the
view lists as it is, or a leave of one it does not list, is not passed on: only an
event heard twice makes one (such an own event heard after all, a repair's
announcement of a member put back in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from push.cluster.presence import Listeners, Member, PresenceStore, member_key, members_after

logger = logging.getLogger(__name__)

# Channels read per round trip, one round trip at a time: a node with thousands of
# presence channels puts them right after an outage without a burst of reads, and with
# one reply of a size Redis sends at once (estimated: 50 channels of 100 members of
# ~100 bytes are ~0.5 MB).
RECONCILE_BATCH_CHANNELS = 50
# After a failed batch (Redis away again), before it is read again.
RECONCILE_RETRY_SECS = 1.0

# Pass a join or leave on to the channel's subscribers here, as one heard from Redis:
# (channel, kind, member).
Deliver = Callable[[str, str, Member], None]
# Return once every event of these channels published before now was heard.
HeardAllBefore = Callable[[list[str]], Awaitable[None]]


class _View:
    """One channel's members as its subscribers here were told (None until read)."""

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members: dict[str, Member] | None = None


class PresenceViews:
    """The views of the presence channels this node serves, once ``heard_all_before``
    is set."""

    def __init__(
        self,
        store: PresenceStore,
        *,
        deliver: Deliver,
        batch_channels: int = RECONCILE_BATCH_CHANNELS,
    ) -> None:
        self._store = store
        # Set by the running node where its events come in Redis' order on groups it
        # reads itself (``Broker.hears_in_order`` and ``PresenceStore.relay``); else
        # (no Redis, groups read by the layer, which tells no reconnection) no view is
        # kept, and member lists are read from Redis.
        self._heard_all_before: HeardAllBefore | None = None
        self._deliver = deliver
        self.batch_channels = batch_channels
        self._views: dict[str, _View] = {}
        # Channels whose view is to be read (again), in the order they became due.
        self._due: dict[str, None] = {}
        # The records of the reads under way (``_reconcile``): every join and leave
        # heard, those not passed on included.
        self._reading = Listeners()
        self._wake = asyncio.Event()

    def hear_with(self, heard_all_before: HeardAllBefore) -> None:
        self._heard_all_before = heard_all_before

    @property
    def enabled(self) -> bool:
        return self._heard_all_before is not None

    def track(self, channel: str) -> None:
        """The node serves ``channel`` now (it subscribed to its group): read its view."""
        if not self.enabled:
            return
        self._views[channel] = _View()
        self._make_due([channel])

    def untrack(self, channel: str) -> None:
        self._views.pop(channel, None)
        self._due.pop(channel, None)

    def heard(self, channel: str, kind: str, changed: Member) -> bool:
        """A join or leave to pass on to the channel's subscribers here: False when
        their view has it already (a join of a member listed as it is, a leave of one
        not listed), which only an event heard twice makes (this node passed on what
        it sent while it could not hear, or put right what a repair sends again)."""
        # Recorded whether passed on or not: a join a view already has may be one the
        # read under way does not show yet (its member put back in Redis by a repair
        # just after the read), and missing from the record the read would be taken
        # to say that the member left.
        self._reading.record(channel, kind, changed)
        view = self._views.get(channel)
        if view is None or view.members is None:
            return True
        key = member_key(changed)
        if kind == "join":
            if view.members.get(key) == changed:
                return False
            view.members[key] = changed
            return True
        return view.members.pop(key, None) is not None

    def resubscribed(self) -> None:
        """The node's groups are subscribed again after a break: what was published
        meanwhile was not heard, and every view is read again."""
        self._make_due(list(self._views))

    async def members(self, channel: str) -> list[Member] | None:
        """The channel's members as its subscribers here know them, with every event
        published before now heard; None when not known (not served, not read yet):
        the caller reads Redis instead. While the node cannot hear, the view as it is:
        Redis may know better, but a list from Redis would be put right at the next
        reconciliation as if it were the view, with joins it holds and leaves it lacks."""
        view = self._views.get(channel)
        if view is None or view.members is None or self._heard_all_before is None:
            return None
        # Not subscribed now: the view is behind Redis until reconciled. Not logged: a
        # member list may be asked many times a second.
        with contextlib.suppress(Exception):
            await self._heard_all_before([channel])
        if self._views.get(channel) is not view or view.members is None:
            return None
        return list(view.members.values())

    def _make_due(self, channels: list[str]) -> None:
        for channel in channels:
            self._due[channel] = None
        if self._due:
            self._wake.set()

    async def run(self) -> None:
        """Read the views that are due, a batch at a time, for as long as the node runs."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._due:
                batch = list(self._due)[: self.batch_channels]
                for channel in batch:
                    del self._due[channel]
                try:
                    await self._reconcile(batch)
                except Exception as exc:  # Redis away again: read when it answers
                    logger.warning("presence views of %d channels not read: %s", len(batch), exc)
                    self._make_due([c for c in batch if c in self._views])
                    await asyncio.sleep(RECONCILE_RETRY_SECS)

    async def _reconcile(self, channels: list[str]) -> None:
        heard_all_before = self._heard_all_before
        if heard_all_before is None:
            return
        views = {c: self._views[c] for c in channels if c in self._views}
        heard = {c: self._reading.listen(c) for c in views}
        try:
            # After the groups' subscriptions took: nothing published after the read
            # goes unheard.
            await heard_all_before(list(views))
            listed = await self._store.members_of(list(views))
            # Every event the read shows has been heard: it is in ``heard``, and is
            # neither missed nor passed on a second time.
            await heard_all_before(list(views))
        finally:
            for channel, record in heard.items():
                self._reading.unlisten(channel, record)
        for channel, view in views.items():
            if self._views.get(channel) is not view:
                continue  # no longer served, or served anew (and read anew)
            now = {member_key(m): m for m in members_after(listed[channel], heard[channel])}
            if view.members is None:
                view.members = now
                continue
            self._pass_on_differences(channel, view.members, now)

    def _pass_on_differences(
        self, channel: str, known: dict[str, Member], now: dict[str, Member]
    ) -> None:
        """Each member that ``known`` lacks joins, each it lists in vain leaves (the
        members an event was heard of since the read are alike in both)."""
        gone = [m for key, m in known.items() if key not in now]
        came = [m for key, m in now.items() if key not in known]
        for one in gone:
            self._deliver(channel, "leave", one)
        for one in came:
            self._deliver(channel, "join", one)
