"""Node-local fan-out: the hub that turns one message into frames for every local
subscriber, in ``seq`` order, each seq once.

Messages reach the hub from the broker (other nodes) and from local publishers, in
any order. Per channel the hub remembers the last seq it fanned out; a message that
arrives early waits in a small reorder buffer, and a gap that does not fill within
``gap_wait_secs`` is read back from history. A periodic sync compares each channel's
last seq with the database, so a message whose broadcast was lost (Redis restart)
still arrives, late but in order.

Each message is encoded once per wire format in use and the same frame object goes
into every subscriber's outbox. Live subscribers are kept per format in plain dicts,
so the inner loop is one call per subscriber and nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from common import metrics
from common.background import spawn
from common.errors import ErrorCode, PushError
from push.fanout.delta import (
    DELTA_MAX_BYTES,
    ChannelDeltas,
    encode_delta_frame,
    fossil_delta_text,
)
from push.fanout.message import ChannelMessage, HistoryPage, data_bytes
from push.fanout.outbox import OutFrame

if TYPE_CHECKING:
    from push.fanout.outbox import Outbox
    from push.fanout.replay_slots import ReplaySlots
    from push.wire.codecs import Codec

logger = logging.getLogger(__name__)

# Messages read per history query when replaying or repairing a gap; a query also
# stops at a byte budget (``replay_batch_bytes``), so a page of large messages is never
# read whole into memory.
HISTORY_BATCH = 500
REPLAY_BATCH_MAX_BYTES = 4 * 1_048_576
# A reorder buffer this long means the gap will not fill by itself: repair at once.
# The same bounds (count and bytes) hold a replay's buffer of live messages.
MAX_PENDING_PER_CHANNEL = 1000
PENDING_MAX_BYTES = 4 * 1_048_576
# Recent messages kept per channel in memory, so clients that resume after a short
# drop (or all at once, after a node restart) are served without a database read;
# bounded in bytes too, or 256 messages of 1 MB would hold 256 MB per channel.
RECENT_PER_CHANNEL = 256
RECENT_MAX_BYTES = 1_048_576
# A replay hands its client's outbox at most this many frames (and this much message
# data) at a time, then lets the event loop run everything else that is ready: pushed
# whole, a page of 500 held the loop for tens of ms, and every message the node handled
# meanwhile (a publish takes several loop turns) waited behind each page. Measured: four
# clients resuming 6,000 messages at once delayed the node's live messages by 300-600 ms.
REPLAY_SLICE_FRAMES = 50
REPLAY_SLICE_BYTES = 256 * 1024
# How often a replay looks at its client's send queue (and whether the client left).
OUTBOX_POLL_SECS = 0.005
# A gap repair of many pages waits this long at most for its channel's live subscribers
# to read their send queues down to half before it hands them the next page: readers
# keep up however far behind the node fell, and one that stalled cannot hold the
# channel back (the next page overflows its queue: it is a slow consumer, closed 4002).
REPAIR_ROOM_WAIT_SECS = 1.0
# How often a replay waiting for its address's history budget looks whether its client
# left.
BUDGET_POLL_SECS = 0.5
# A replay whose history read failed after ``subscribed`` went out reads the page again
# this long after, while its client stays.
REPLAY_RETRY_SECS = 1.0
# A replay's page stays shareable this long after its read, while the channel delivers
# nothing (``Hub._shared_page``): a storm of rewinds or resumes that outlasts the read.
PAGE_REUSE_SECS = 1.0
# The pages kept for sharing after their reads hold at most this much message data in
# all; past it a page is shared only while its read runs.
PAGE_REUSE_MAX_BYTES = 32 * 1_048_576
# (channel, since, limit, max_bytes, the channel's delivered_seq when the read began)
PageKey = tuple[str, int, int, int, int]
# An empty channel stays joined this long, so clients that reconnect or flap between
# subscribe and unsubscribe do not cost a broker round trip each time.
LINGER_SECS = 10.0


class HistoryBudget(Protocol):
    """The bytes of history a client's address may still read (its address budget's
    ``history_bytes``): a replay charges each page it sends, and waits while the
    address is in debt."""

    def allowed(self) -> bool: ...

    def charge(self, nbytes: int) -> None: ...

    def wait_secs(self) -> float: ...


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    codec: Codec
    outbox: Outbox
    # The client's address, for the per-address bound on replays (None: unknown).
    ip: str | None

    @property
    def history_budget(self) -> HistoryBudget: ...

    @property
    def gone(self) -> bool:
        """True once the client left or the connection is closing: replays stop."""
        ...


class History(Protocol):
    async def latest_seqs(self, channels: list[str]) -> dict[str, int]: ...

    async def page(self, channel: str, since: int, limit: int, max_bytes: int) -> HistoryPage: ...

    async def stored_page(
        self, channel: str, since: int, limit: int, max_bytes: int
    ) -> HistoryPage:
        """``page`` without the retention rules: every message still stored after
        ``since`` (a gap repair's read; only deleted rows are missing from it)."""
        ...

    async def recent(self, channel: str, count: int, max_bytes: int) -> HistoryPage: ...


class Retention(Protocol):
    """A channel's retention rule (``push.storage.retention.RetentionPolicy``): a resume
    from memory replays only what history would still hold."""

    def kept(self, messages: Iterable[ChannelMessage], latest_seq: int) -> list[ChannelMessage]: ...

    @property
    def exact(self) -> bool:
        """False when ``kept`` may drop what history still holds (a bound this node
        can only estimate): a resume it would answer ``recovered: false`` reads."""
        ...


class KeepAll:
    """The retention of a hub given no rules: every message is kept."""

    exact = True

    def kept(self, messages: Iterable[ChannelMessage], latest_seq: int) -> list[ChannelMessage]:
        return list(messages)


def keep_all(channel: str) -> Retention:
    return KeepAll()


class ChannelState(enum.Enum):
    JOINING = "joining"
    LIVE = "live"
    LEAVING = "leaving"


class Subscription:
    """One connection's subscription to one channel on this node."""

    __slots__ = (
        "active",
        "buffer",
        "buffer_bytes",
        "buffer_dropped",
        "channel",
        "delta",
        "last_seq",
        "sent_seq",
        "subscriber",
    )

    def __init__(
        self, subscriber: Subscriber, channel: HubChannel, last_seq: int, *, delta: bool = False
    ) -> None:
        self.subscriber = subscriber
        self.channel = channel
        # Delta compression agreed (push.fanout.delta): live, it sits in channel.deltas.
        self.delta = delta
        # The last seq a replay sent it: a delta subscription that goes live having been
        # sent the channel's last message can take a delta of the next one.
        self.sent_seq = 0
        # Live subscriptions are always at the channel's delivered_seq; this is read
        # only while the subscription catches up (replay) or sits ahead of the hub.
        self.last_seq = last_seq
        # Live messages that arrive while the replay is read are held here.
        self.buffer: list[ChannelMessage] | None = None
        self.buffer_bytes = 0
        # Set when the buffer outgrew its bound and was emptied: the replay then reads
        # history once more, and that read (begun after the drop) holds all it dropped.
        self.buffer_dropped = False
        self.active = True


class RecentMessages:
    """A channel's last messages, contiguous and ending at its delivered seq, bounded by
    count and by bytes: the oldest go first when either bound is passed (a message
    larger than the byte bound by itself is not kept; resumes before it read history)."""

    __slots__ = ("_messages", "bytes", "max_bytes")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self._messages: collections.deque[ChannelMessage] = collections.deque(maxlen=max_count)
        self.bytes = 0
        self.max_bytes = max_bytes

    def append(self, message: ChannelMessage) -> None:
        messages = self._messages
        if not messages.maxlen:
            return
        if len(messages) == messages.maxlen:
            self.bytes -= data_bytes(messages[0])
        messages.append(message)
        self.bytes += data_bytes(message)
        while self.bytes > self.max_bytes and messages:
            self.bytes -= data_bytes(messages.popleft())

    def extend(self, messages: Iterable[ChannelMessage]) -> None:
        for message in messages:
            self.append(message)

    def clear(self) -> None:
        self._messages.clear()
        self.bytes = 0

    def __getitem__(self, index: int) -> ChannelMessage:
        return self._messages[index]

    def __iter__(self) -> Iterator[ChannelMessage]:
        return iter(self._messages)

    def __len__(self) -> int:
        return len(self._messages)


class HubChannel:
    __slots__ = (
        "catching_up",
        "delivered_seq",
        "deltas",
        "droppable",
        "fanned_out",
        "held_dropped",
        "history_lost",
        "linger_handle",
        "live",
        "name",
        "pending",
        "pending_bytes",
        "ready",
        "recent",
        "repair_handle",
        "repairing",
        "retention",
        "state",
        "sync_mark",
    )

    def __init__(
        self,
        name: str,
        droppable: bool,
        loop: asyncio.AbstractEventLoop,
        recent_size: int,
        recent_bytes: int = RECENT_MAX_BYTES,
        retention: Retention | None = None,
    ) -> None:
        self.name = name
        self.state = ChannelState.JOINING
        # codec name -> {outbox.push: subscription}: the fan-out loop calls the keys.
        self.live: dict[str, dict[Callable[[OutFrame], bool], Subscription]] = {}
        self.catching_up: dict[Subscription, None] = {}
        # The live subscribers that asked for deltas; None while there is none, so a
        # channel without one pays nothing for the feature.
        self.deltas: ChannelDeltas | None = None
        self.delivered_seq = 0
        self.fanned_out = 0  # messages fanned out here, for the admin's rates
        self.pending: dict[int, ChannelMessage] = {}
        self.pending_bytes = 0
        # An early message was let go (its buffer was full): a repair must read it back.
        self.held_dropped = False
        # History had lost the channel when the node joined it (``HistoryPage.lost``):
        # until a message comes, ``delivered_seq`` 0 says nothing of what was lost.
        self.history_lost = False
        self.droppable = droppable
        self.retention = retention if retention is not None else KeepAll()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.repair_handle: asyncio.TimerHandle | None = None
        self.repairing = False
        # The database's last seq at the previous sync: if the hub is still behind it
        # a whole sync interval later, the broadcast was lost and history fills in.
        self.sync_mark = 0
        self.linger_handle: asyncio.TimerHandle | None = None
        # The last messages fanned out, contiguous and ending at delivered_seq.
        self.recent = RecentMessages(recent_size, recent_bytes)

    def covers_since(self, since: int) -> bool:
        """True when every message after ``since`` is in ``recent``."""
        recent = self.recent
        return bool(recent) and recent[0].seq <= since + 1

    def subscriber_count(self) -> int:
        deltas = len(self.deltas) if self.deltas is not None else 0
        return sum(len(subs) for subs in self.live.values()) + len(self.catching_up) + deltas


def encode_frame(codec: Codec, message: ChannelMessage, droppable: bool) -> OutFrame:
    frame = message.frames.get(codec.name)
    if frame is None:
        payload = codec.encode_message(message)
        frame = OutFrame(
            codec.send_event(payload),
            len(payload),
            droppable,
            channel=message.channel,
            seq=message.seq,
        )
        message.frames[codec.name] = frame
    return frame


def _page_bytes(read: asyncio.Task[HistoryPage]) -> int:
    """The message data of a finished read's page (0 if it failed)."""
    if read.cancelled() or read.exception() is not None:
        return 0
    return sum(len(message.data_json) for message in read.result().messages)


def _slices(messages: list[ChannelMessage]) -> Iterator[list[ChannelMessage]]:
    """``messages`` in runs of at most ``REPLAY_SLICE_FRAMES`` and about
    ``REPLAY_SLICE_BYTES`` of data (a larger message is a run by itself)."""
    start = size = 0
    for index, message in enumerate(messages):
        weight = data_bytes(message)
        if index > start and (
            index - start >= REPLAY_SLICE_FRAMES or size + weight > REPLAY_SLICE_BYTES
        ):
            yield messages[start:index]
            start = index
            size = 0
        size += weight
    if start < len(messages):
        yield messages[start:]


def _push_each(by_codec: dict[Callable[[OutFrame], bool], Subscription], frame: OutFrame) -> None:
    """``push(frame)`` for every subscriber of one format. The channel's delivered_seq
    has moved on already, so a push that raises (a bug, a server that broke under us)
    must not keep the message from the subscribers after it: that one subscriber is
    failed, and the loop resumes on the same iterator after it. One ``try`` around the
    loop costs nothing until something raises (Python 3.11), unlike one per push."""
    pushes = iter(by_codec)
    push = failed = None
    while True:
        try:
            for push in pushes:
                push(frame)
            return
        except Exception as exc:
            if push is failed:  # raised by the iteration itself: nothing to resume
                raise
            failed = push
            _subscriber_failed(by_codec[push], exc)  # type: ignore[index]  # push is set: the loop ran


def _push_each_except(
    by_codec: dict[Callable[[OutFrame], bool], Subscription], frame: OutFrame, exclude: str
) -> None:
    """``_push_each`` skipping the subscriber whose Pusher socket id is ``exclude`` (a
    Pusher trigger's ``socket_id``): the slow path, taken only for such messages."""
    _push_each(
        {
            push: subscription
            for push, subscription in by_codec.items()
            if getattr(subscription.subscriber, "socket_id", None) != exclude
        },
        frame,
    )


def _subscribers_by_codec(
    hub_channel: HubChannel,
) -> Iterator[dict[Callable[[OutFrame], bool], Subscription]]:
    """Every live subscriber of the channel, in groups of one wire format: the plain
    ones, then those that take deltas."""
    yield from hub_channel.live.values()
    if hub_channel.deltas is not None:
        yield from hub_channel.deltas.in_step.values()
        yield from hub_channel.deltas.fresh.values()


def _subscriber_failed(subscription: Subscription, exc: Exception) -> None:
    metrics.FAN_OUT_FAILURES.inc()
    logger.error("fan-out to a subscriber of %s failed", subscription.channel.name, exc_info=exc)
    # The outbox refuses everything from now on and has the connection closed (1011).
    subscription.subscriber.outbox.fail(exc)


class Hub:
    def __init__(
        self,
        *,
        history: History,
        join: Callable[[str], Awaitable[None]],
        leave: Callable[[str], Awaitable[None]],
        drop_oldest_patterns: list[str],
        gap_wait_secs: float,
        linger_secs: float = LINGER_SECS,
        recent_size: int = RECENT_PER_CHANNEL,
        recent_bytes: int = RECENT_MAX_BYTES,
        replay_batch_bytes: int = REPLAY_BATCH_MAX_BYTES,
        max_pending: int = MAX_PENDING_PER_CHANNEL,
        pending_bytes: int = PENDING_MAX_BYTES,
        replay_slots: ReplaySlots | None = None,
        retention: Callable[[str], Retention] = keep_all,
        delta_max_bytes: int = DELTA_MAX_BYTES,
    ) -> None:
        self.history = history
        # Each channel's rule, looked up once when the hub first serves the channel.
        self._retention = retention
        self._join = join
        self._leave = leave
        self._drop_oldest_patterns = drop_oldest_patterns
        self.gap_wait_secs = gap_wait_secs
        self.linger_secs = linger_secs
        self.recent_size = recent_size
        self.recent_bytes = recent_bytes
        self.replay_batch_bytes = replay_batch_bytes
        self.max_pending = max_pending
        self.pending_bytes = pending_bytes
        self.replay_slots = replay_slots
        self.delta_max_bytes = delta_max_bytes
        self.channels: dict[str, HubChannel] = {}
        self.loop = asyncio.get_running_loop()
        # Channels that gained or lost a subscription since ``push.cluster.occupancy``
        # last took the set: it publishes their counts (nothing per message).
        self.counts_changed: set[str] = set()
        # History reads in flight that replays starting now may share (``_shared_page``).
        self._page_reads: dict[PageKey, asyncio.Task[HistoryPage]] = {}
        self._kept_page_bytes = 0  # message data of the finished reads kept in it
        # Channels whose linger is over, oldest first, and the task leaving them in turn.
        self._to_leave: dict[HubChannel, None] = {}
        self._leaver: asyncio.Task[None] | None = None

    # ----- subscribing ---------------------------------------------------------------

    async def subscribe(
        self,
        subscriber: Subscriber,
        channel: str,
        *,
        since: int | None,
        reply: Callable[[int, bool | None], None],
        rewind: int | None = None,
        delta: bool = False,
    ) -> Subscription:
        """Attach a subscriber; ``reply(seq, recovered)`` is called before any message
        reaches it. With ``since``, every stored message after it is replayed first,
        then the live stream follows with nothing missing and nothing twice. With
        ``rewind``, the channel's last ``rewind`` messages come first instead. With
        ``delta``, live messages may come as deltas (push.fanout.delta)."""
        hub_channel = await self._channel_for_subscribe(channel)
        if rewind is not None:
            return await self._attach_rewound(subscriber, hub_channel, rewind, reply, delta)
        if since is not None and since > hub_channel.delivered_seq:
            latest = await self._latest_seq_or_none(hub_channel)
            if self.channels.get(channel) is not hub_channel or (
                hub_channel.state is not ChannelState.LIVE
            ):
                # The channel had no subscriber during the read (its linger was over and
                # it waited its turn to be left) and was left meanwhile: attached to it,
                # the client would never receive another message. Join it again.
                return await self.subscribe(
                    subscriber, channel, since=since, reply=reply, delta=delta
                )
            if latest is not None and since > latest:
                # A cursor past anything the channel ever had (its history was reset,
                # or the client made it up): say the real latest seq with recovered
                # false, so the client refetches state, and go on from there.
                ahead = latest if latest > hub_channel.delivered_seq else None
                return self._attach_live(subscriber, hub_channel, ahead, reply, False, delta)
        if since is None or since >= hub_channel.delivered_seq:
            # Messages held for reordering are past delivered_seq: they reach this
            # subscriber through the normal path, in order.
            recovered = None if since is None else not self._lost_before_delivery(hub_channel)
            return self._attach_live(subscriber, hub_channel, since, reply, recovered, delta)
        kept = self._kept_in_memory(hub_channel, since)
        if kept is not None:
            return self._attach_from_recent(subscriber, hub_channel, since, kept, reply, delta)
        return await self._attach_with_replay(subscriber, hub_channel, since, reply, delta)

    @staticmethod
    def _lost_before_delivery(hub_channel: HubChannel) -> bool:
        """Whether messages may be gone that this node never delivered: it joined the
        channel while history had lost it (Redis lost a recent channel's lease) and no
        message came since, so its ``delivered_seq`` of 0 is no latest seq, and a
        resume from 0 is not recovered."""
        return hub_channel.history_lost and hub_channel.delivered_seq == 0

    async def _attach_rewound(
        self,
        subscriber: Subscriber,
        hub_channel: HubChannel,
        rewind: int,
        reply: Callable[[int, bool | None], None],
        delta: bool = False,
    ) -> Subscription:
        """The last ``rewind`` messages this node delivered, then live: a resume from
        ``delivered_seq - rewind`` taken now, with no await before it, so the seam is
        the one ``since`` has. The channel's recent messages (read once when the node
        joined it) serve it without a read; else one history read that concurrent
        subscribers share (``_shared_page``). ``recovered`` is not said: the request
        had no ``since``."""

        def reply_rewound(seq: int, recovered: bool | None) -> None:
            reply(seq, None)

        since = max(0, hub_channel.delivered_seq - rewind)
        if since >= hub_channel.delivered_seq:
            return self._attach_live(subscriber, hub_channel, None, reply, None, delta)
        kept = self._kept_in_memory(hub_channel, since)
        if kept is not None:
            return self._attach_from_recent(
                subscriber, hub_channel, since, kept, reply_rewound, delta
            )
        return await self._attach_with_replay(
            subscriber, hub_channel, since, reply_rewound, delta, rewind=rewind
        )

    def _kept_in_memory(self, hub_channel: HubChannel, since: int) -> list[ChannelMessage] | None:
        """The recent messages history still holds, for a resume from ``since`` that
        memory can answer; None when it cannot (memory starts after ``since``, or the
        retention cannot tell whether what it drops is gone): history is read then."""
        if not hub_channel.covers_since(since):
            return None
        retention = hub_channel.retention
        kept = retention.kept(hub_channel.recent, hub_channel.delivered_seq)
        if not retention.exact and not (kept and kept[0].seq <= since + 1):
            return None
        return kept

    def _attach_from_recent(
        self,
        subscriber: Subscriber,
        hub_channel: HubChannel,
        since: int,
        kept: list[ChannelMessage],
        reply: Callable[[int, bool | None], None],
        delta: bool = False,
    ) -> Subscription:
        """Resume from memory: no await between the replay and going live, so nothing
        can slip in between, and the frames are the ones already encoded for others.
        Retention applies here as in the database (``kept``): what it no longer keeps
        is not replayed, and the client learns it from ``recovered: false``."""
        subscription = Subscription(subscriber, hub_channel, since, delta=delta)
        recovered = bool(kept) and kept[0].seq <= since + 1
        reply(hub_channel.delivered_seq, recovered)
        self._replay(subscription, kept)
        self._make_live(subscription)
        metrics.SUBSCRIPTIONS.inc()
        self.counts_changed.add(hub_channel.name)
        return subscription

    async def _latest_seq_or_none(self, hub_channel: HubChannel) -> int | None:
        """The channel's latest stored seq, read only for a client that has seen more
        than this node; None when the database cannot say (the client is trusted)."""
        try:
            latest = await self.history.latest_seqs([hub_channel.name])
        except Exception as exc:
            logger.warning("latest seq of %s not read: %s", hub_channel.name, exc)
            return None
        return latest.get(hub_channel.name, 0)

    def _attach_live(
        self,
        subscriber: Subscriber,
        hub_channel: HubChannel,
        since: int | None,
        reply: Callable[[int, bool | None], None],
        recovered: bool | None,
        delta: bool = False,
    ) -> Subscription:
        subscription = Subscription(subscriber, hub_channel, hub_channel.delivered_seq, delta=delta)
        reply(max(hub_channel.delivered_seq, since or 0), recovered)
        if since is not None and since > hub_channel.delivered_seq:
            # The client has seen further than this node (it came from a node ahead of
            # us): hold back until the hub catches up to what it already has.
            subscription.last_seq = since
            hub_channel.catching_up[subscription] = None
        else:
            self._make_live(subscription)
        metrics.SUBSCRIPTIONS.inc()
        self.counts_changed.add(hub_channel.name)
        return subscription

    async def _attach_with_replay(
        self,
        subscriber: Subscriber,
        hub_channel: HubChannel,
        since: int,
        reply: Callable[[int, bool | None], None],
        delta: bool = False,
        *,
        rewind: int | None = None,
    ) -> Subscription:
        """Replay from history, then go live. The replay holds a slot of the client
        address's bound, and one of the node's while it reads (``_ReplaySlot``), and
        stops as soon as its client leaves (before each page and while it waits for the
        client to read): the subscription comes back inactive then, and nothing more is
        read for it. With ``rewind``, only the last ``rewind`` before the latest seq the
        read saw are replayed."""
        subscription = Subscription(subscriber, hub_channel, since, delta=delta)
        subscription.buffer = []
        hub_channel.catching_up[subscription] = None
        metrics.SUBSCRIPTIONS.inc()
        self.counts_changed.add(hub_channel.name)
        slots = self.replay_slots
        # A rewind (at most 100 messages) whose read another replay has made already
        # costs the database nothing: it takes no slot, so a storm of them is not refused.
        key = self._page_key(hub_channel, since, subscriber)
        shared = rewind is not None and key in self._page_reads
        slot = _ReplaySlot(None if shared else slots, subscriber)
        try:
            if await slot.take() and not subscriber.gone:
                await self._replay_history(subscription, since, reply, rewind, slot)
        except BaseException:
            self.unsubscribe(subscription)
            raise
        finally:
            slot.give_back()
        if subscriber.gone:
            self.unsubscribe(subscription)
        if subscription.active:
            self._finish_replay(subscription)
        return subscription

    async def _replay_history(
        self,
        subscription: Subscription,
        since: int,
        reply: Callable[[int, bool | None], None],
        rewind: int | None,
        slot: _ReplaySlot,
    ) -> None:
        hub_channel = subscription.channel
        subscriber = subscription.subscriber
        limit, _ = self._page_size(subscriber)
        delivered = hub_channel.delivered_seq
        page = await self._shared_page(self._page_key(hub_channel, since, subscriber))
        # History that knows less than this node had delivered before the read lost it
        # (a recent channel's window went with Redis): the replay is not complete.
        recovered = page.complete_from_since and page.latest_seq >= delivered
        latest = max(page.latest_seq, hub_channel.delivered_seq)
        reply(latest, recovered)
        if not page.complete_from_since and page.messages:
            # Retention trimmed part of the range: replay from the oldest kept one.
            subscription.last_seq = page.messages[0].seq - 1
        if rewind is not None:
            # The channel moved on during the read (or history was ahead of this node):
            # the last ``rewind`` end at the seq ``reply`` named; older ones are skipped.
            subscription.last_seq = max(subscription.last_seq, latest - rewind)
        while subscription.active and not subscriber.gone:
            if not await self._replay_in_slices(subscription, page.messages):
                return
            subscriber.history_budget.charge(sum(m.data_bytes for m in page.messages))
            more = len(page.messages) >= limit or page.truncated
            if not more and not subscription.buffer_dropped:
                return
            subscription.buffer_dropped = False
            # Nothing is read while the client reads its queue down: a reader that
            # stopped would hold the node's slot as long as its queue has room (hours).
            slot.pause()
            if not await self._wait_for_room(subscriber):
                return
            if not await self._wait_for_budget(subscriber):
                return
            if not await slot.resume():
                return
            next_page = await self._page_after_reply(subscription)
            if next_page is None:
                return
            lost = not next_page.complete_from_since or next_page.latest_seq < max(
                delivered, subscription.last_seq
            )
            # A rewind promised a run with no gap up to the seam: it may not go on
            # past one either, however its first page started.
            promised = recovered or rewind is not None
            if lost and not self._go_on_past_trim(subscription, next_page, promised):
                return
            page = next_page

    def _go_on_past_trim(
        self, subscription: Subscription, page: HistoryPage, promised: bool
    ) -> bool:
        """History was trimmed between two pages of a replay (a recent channel's window
        slid on, retention deleted rows): the page starts past ``last_seq + 1``, or
        knows less than was delivered (Redis lost the window: an empty page). A
        client told ``recovered: false`` expects that, and the replay goes on from the
        oldest kept message, as it does after a first page that was trimmed. One
        ``promised`` every message from its first on (told ``recovered: true``, or a
        ``rewind``: its last N, fewer if the channel keeps fewer, with no gap up to the
        seam) is never sent a silent gap: its connection is closed as a slow
        consumer's is (4002), and its resume from the last seq it received is answered
        ``recovered: false``. False then: stop."""
        if not promised:
            if page.messages:
                subscription.last_seq = page.messages[0].seq - 1
            return True
        logger.warning(
            "%s: history after seq %d was trimmed during a replay; closing its client",
            subscription.channel.name,
            subscription.last_seq,
        )
        self.unsubscribe(subscription)
        subscription.subscriber.outbox.fell_behind()
        return False

    async def _page_after_reply(self, subscription: Subscription) -> HistoryPage | None:
        """The replay's next page, read again until it comes (None: the client left).

        ``subscribed`` went out with the first page, and the client holds the
        subscription as made: failing now would drop it behind the client's back (an
        error under a request id the client had settled, then nothing more on the
        channel). Live messages wait meanwhile in the bounded buffer, as during any read."""
        subscriber = subscription.subscriber
        while subscription.active and not subscriber.gone:
            key = self._page_key(subscription.channel, subscription.last_seq, subscriber)
            try:
                return await self._shared_page(key)
            except Exception as exc:
                logger.warning(
                    "history read for a replay of %s failed: %s", subscription.channel.name, exc
                )
            await asyncio.sleep(REPLAY_RETRY_SECS)
        return None

    def _page_size(self, subscriber: Subscriber) -> tuple[int, int]:
        """Pages sized to half the client's send queue (count, bytes): the replay waits
        until the client has read down to half, so one page never overflows the queue."""
        outbox = subscriber.outbox
        limit = max(1, min(HISTORY_BATCH, outbox.max_frames // 2))
        return limit, max(1, min(self.replay_batch_bytes, outbox.max_bytes // 2))

    def _page_key(self, hub_channel: HubChannel, since: int, subscriber: Subscriber) -> PageKey:
        limit, max_bytes = self._page_size(subscriber)
        return (hub_channel.name, since, limit, max_bytes, hub_channel.delivered_seq)

    async def _shared_page(self, key: PageKey) -> HistoryPage:
        """A page of a replay, read once for every replay of the same range that
        reaches it while the read runs or up to ``PAGE_REUSE_SECS`` after (a thousand
        dashboards opening at once cost one read per page, and so do clients that
        resume from 0 again and again). Sharing a read begun earlier is exact only
        while the channel has delivered nothing since it began: a message fanned out
        in between would be in neither the page nor the sharer's buffer. So the key
        holds ``delivered_seq``: a read goes stale for sharers as soon as the channel
        moves on."""
        read = self._page_reads.get(key)
        if read is None:
            channel, since, limit, max_bytes, _ = key
            read = self.loop.create_task(self.history.page(channel, since, limit, max_bytes))
            self._page_reads[key] = read
            read.add_done_callback(lambda done: self._keep_page_read(key, done))
        # Shielded: a replay whose client left must not cancel the others' read.
        return await asyncio.shield(read)

    def _keep_page_read(self, key: PageKey, read: asyncio.Task[HistoryPage]) -> None:
        """Keep a finished read for ``PAGE_REUSE_SECS``, within ``PAGE_REUSE_MAX_BYTES``
        for all kept reads: pages of large messages, read fast, would otherwise stay
        in memory long after their replays sent them."""
        nbytes = _page_bytes(read)
        failed = read.cancelled() or read.exception() is not None
        # A failed read is shared only while it runs: a replay that reads again after
        # it (``_page_after_reply``) must not be handed the same failure.
        if failed or self._kept_page_bytes + nbytes > PAGE_REUSE_MAX_BYTES:
            self._forget_page_read(key, read, 0)
            return
        self._kept_page_bytes += nbytes
        self.loop.call_later(PAGE_REUSE_SECS, self._forget_page_read, key, read, nbytes)

    def _forget_page_read(self, key: PageKey, read: asyncio.Task[HistoryPage], nbytes: int) -> None:
        self._kept_page_bytes -= nbytes
        if self._page_reads.get(key) is read:
            del self._page_reads[key]
        if not read.cancelled():
            read.exception()  # retrieved: every waiter got it, or none was left

    async def _wait_for_room(self, subscriber: Subscriber) -> bool:
        """Wait until the client has read its send queue down to half (frames and
        bytes): a replay paces itself by the client's reading. False if it left."""
        outbox = subscriber.outbox
        delay = OUTBOX_POLL_SECS
        while len(outbox) > outbox.max_frames // 2 or outbox.queued_bytes > outbox.max_bytes // 2:
            if subscriber.gone or outbox.closed:
                return False
            # A client that reads is looked at every 5 ms; one that stopped reading
            # ever less often (up to 10 times a second), so the replays the node's
            # slots allow cost little while their clients stall.
            before = outbox.queued_bytes
            await asyncio.sleep(delay)
            delay = OUTBOX_POLL_SECS if outbox.queued_bytes < before else min(delay * 2, 0.1)
        return not subscriber.gone

    async def _wait_for_budget(self, subscriber: Subscriber) -> bool:
        """Wait while the client's address has read more history than its budget (the
        REST pages it read count too): a replay then goes on at the budget's rate
        instead of as fast as the client reads. False if it left meanwhile."""
        budget = subscriber.history_budget
        while not budget.allowed():
            if subscriber.gone:
                return False
            await asyncio.sleep(min(budget.wait_secs(), BUDGET_POLL_SECS))
        return not subscriber.gone

    async def _replay_in_slices(
        self, subscription: Subscription, messages: list[ChannelMessage]
    ) -> bool:
        """A page of history to the client a slice at a time, the loop free for others
        between slices; False when the client left (or unsubscribed) meanwhile."""
        for index, part in enumerate(_slices(messages)):
            if index:
                await asyncio.sleep(0)
                if not subscription.active or subscription.subscriber.gone:
                    return False
            self._replay(subscription, part)
        return True

    def _replay(self, subscription: Subscription, messages: list[ChannelMessage]) -> None:
        """``messages`` the client has not had, in runs of a slice, each written at once
        while the socket takes them (one write is at most a slice over the server's
        backlog bound; past it, the rest queue frame by frame in the bounded outbox). A
        message that excludes the subscriber's Pusher socket (live ones held while a
        Pusher cache channel's rewind read history) is passed over, as live."""
        codec = subscription.subscriber.codec
        droppable = subscription.channel.droppable
        push_many = subscription.subscriber.outbox.push_many
        socket_id = getattr(subscription.subscriber, "socket_id", None)
        for part in _slices(messages):
            frames = []
            for message in part:
                if message.seq > subscription.last_seq:
                    subscription.last_seq = subscription.sent_seq = message.seq
                    if message.exclude is not None and message.exclude == socket_id:
                        continue
                    frames.append(encode_frame(codec, message, droppable))
            if frames:
                push_many(frames)

    def _finish_replay(self, subscription: Subscription) -> None:
        buffered = subscription.buffer or []
        subscription.buffer = None
        subscription.buffer_bytes = 0
        self._replay(subscription, buffered)
        hub_channel = subscription.channel
        if subscription.last_seq <= hub_channel.delivered_seq:
            del hub_channel.catching_up[subscription]
            self._make_live(subscription)
        # else: ahead of the hub; _feed_catching_up promotes it when the hub arrives.

    def _make_live(self, subscription: Subscription) -> None:
        if subscription.delta:
            self._make_live_delta(subscription)
            return
        subscriber = subscription.subscriber
        subscription.last_seq = subscription.channel.delivered_seq
        by_codec = subscription.channel.live.setdefault(subscriber.codec.name, {})
        by_codec[subscriber.outbox.push] = subscription

    def _make_live_delta(self, subscription: Subscription) -> None:
        """Live among the channel's delta subscribers: in step when a replay sent it the
        channel's last message (the next may come as a delta), fresh otherwise."""
        hub_channel = subscription.channel
        delivered = hub_channel.delivered_seq
        subscription.last_seq = delivered
        deltas = hub_channel.deltas
        if deltas is None:
            recent = hub_channel.recent
            base = recent[-1] if recent and recent[-1].seq == delivered else None
            deltas = hub_channel.deltas = ChannelDeltas(base)
        subscriber = subscription.subscriber
        in_step = 0 < subscription.sent_seq == delivered
        deltas.add(subscriber.codec.name, subscriber.outbox.push, subscription, in_step=in_step)

    def unsubscribe(self, subscription: Subscription) -> None:
        if not subscription.active:
            return
        subscription.active = False
        metrics.SUBSCRIPTIONS.dec()
        hub_channel = subscription.channel
        self.counts_changed.add(hub_channel.name)
        hub_channel.catching_up.pop(subscription, None)
        by_codec = hub_channel.live.get(subscription.subscriber.codec.name)
        if by_codec is not None:
            by_codec.pop(subscription.subscriber.outbox.push, None)
            if not by_codec:
                del hub_channel.live[subscription.subscriber.codec.name]
        deltas = hub_channel.deltas
        if deltas is not None and subscription.delta:
            deltas.remove(subscription.subscriber.codec.name, subscription.subscriber.outbox.push)
            if not deltas:
                hub_channel.deltas = None
        if hub_channel.subscriber_count() == 0 and hub_channel.linger_handle is None:
            hub_channel.linger_handle = self.loop.call_later(
                self.linger_secs, self._leave_if_empty, hub_channel
            )

    # ----- channel membership on the broker ------------------------------------------

    async def _channel_for_subscribe(self, name: str) -> HubChannel:
        while True:
            hub_channel = self.channels.get(name)
            if hub_channel is None:
                hub_channel = await self._join_channel(name)
            elif not hub_channel.ready.done():
                try:
                    await asyncio.shield(hub_channel.ready)
                except _JoinCancelled:
                    continue  # its subscribe went away mid-join: this one joins afresh
            if hub_channel.state is ChannelState.LEAVING:
                await asyncio.shield(hub_channel.ready)
                continue
            if hub_channel.linger_handle is not None:
                hub_channel.linger_handle.cancel()
                hub_channel.linger_handle = None
            return hub_channel

    async def _join_channel(self, name: str) -> HubChannel:
        droppable = self.drops_oldest(name)
        hub_channel = HubChannel(
            name,
            droppable,
            self.loop,
            self.recent_size,
            self.recent_bytes,
            retention=self._retention(name),
        )
        self.channels[name] = hub_channel
        joined = False
        try:
            # Join first, then read the last seq: anything committed after the read is
            # broadcast after the join, so it reaches us; anything before is <= seq.
            await self._join(name)
            joined = True
            window = await self.history.recent(name, self.recent_size, self.recent_bytes)
            hub_channel.delivered_seq = window.latest_seq
            hub_channel.history_lost = window.lost
        except BaseException as exc:
            # The subscribes waiting for this join get its refusal, or, when the
            # subscribe that joins was cancelled (its client went), join afresh.
            refusal = _join_refusal(exc, joined)
            try:
                if joined:
                    # The channel is forgotten here, so no linger would ever leave it:
                    # the node would read its group, and count it occupied, for good.
                    # Left while it is still listed, so a subscribe meanwhile waits for
                    # the leave.
                    await self._leave_channel_group(name)
            finally:
                self.channels.pop(name, None)
                hub_channel.ready.set_exception(refusal or _JoinCancelled())
                hub_channel.ready.exception()  # retrieved: waiters have it, or none wait
            if refusal is None or refusal is exc:
                raise
            raise refusal from exc
        hub_channel.recent.extend(m for m in window.messages if m.seq <= window.latest_seq)
        hub_channel.sync_mark = hub_channel.delivered_seq
        hub_channel.state = ChannelState.LIVE
        hub_channel.ready.set_result(None)
        metrics.HUB_CHANNELS.set(len(self.channels))
        self._drain_pending(hub_channel)
        return hub_channel

    def live_channel(self, name: str) -> HubChannel | None:
        """The channel as this node serves it now (its group joined on the broker), or
        None. A subscription to the same object later was served all along between."""
        hub_channel = self.channels.get(name)
        if hub_channel is None or hub_channel.state is not ChannelState.LIVE:
            return None
        return hub_channel

    def drops_oldest(self, name: str) -> bool:
        """True for a drop-oldest channel (tickers): a slow reader loses old frames."""
        return any(fnmatch.fnmatchcase(name, p) for p in self._drop_oldest_patterns)

    def _leave_if_empty(self, hub_channel: HubChannel) -> None:
        """Its linger is over: the channel waits its turn to be left, still joined.

        Channels are left one at a time, one per loop turn. Channels emptied together
        (a client that held a thousand subscriptions left) end their linger in the
        same turn, and a task each, all starting in the next, held the loop for
        hundreds of ms (measured: 3,000 channels, 0.2-0.5 s) and every message with it."""
        hub_channel.linger_handle = None
        self._to_leave[hub_channel] = None
        if self._leaver is None:
            self._leaver = spawn(self._leave_in_turn(), name="push-hub-leave", loop=self.loop)

    async def _leave_in_turn(self) -> None:
        try:
            while self._to_leave:
                hub_channel = next(iter(self._to_leave))
                del self._to_leave[hub_channel]
                # A subscriber came back while it waited (it found the channel joined),
                # or came and went again (a new linger runs).
                if (
                    hub_channel.subscriber_count()
                    or hub_channel.state is not ChannelState.LIVE
                    or hub_channel.linger_handle is not None
                ):
                    continue
                hub_channel.state = ChannelState.LEAVING
                hub_channel.ready = self.loop.create_future()
                await self._leave_channel(hub_channel)
                await asyncio.sleep(0)  # a leave need not suspend: the loop's turn ends here
        finally:
            self._leaver = None

    async def _leave_channel_group(self, name: str) -> None:
        try:
            await self._leave(name)
        except Exception as exc:
            logger.warning("leaving %s on the broker failed: %s", name, exc)

    async def _leave_channel(self, hub_channel: HubChannel) -> None:
        try:
            await self._leave_channel_group(hub_channel.name)
        finally:
            if self.channels.get(hub_channel.name) is hub_channel:
                del self.channels[hub_channel.name]
            if hub_channel.repair_handle is not None:
                hub_channel.repair_handle.cancel()
            hub_channel.ready.set_result(None)
            metrics.HUB_CHANNELS.set(len(self.channels))

    # ----- ordering and fan-out --------------------------------------------------------

    def deliver(self, message: ChannelMessage) -> None:
        """Take a message from the broker or a local publisher, in any order."""
        hub_channel = self.channels.get(message.channel)
        if hub_channel is None or hub_channel.state is ChannelState.LEAVING:
            return
        if hub_channel.state is ChannelState.JOINING:
            self._hold(hub_channel, message)
            return
        next_seq = hub_channel.delivered_seq + 1
        if message.seq == next_seq:
            self._fan_out(hub_channel, message)
            if hub_channel.pending:
                self._drain_pending(hub_channel)
        elif message.seq > next_seq:
            if not self._hold(hub_channel, message) or len(hub_channel.pending) >= self.max_pending:
                self._start_repair(hub_channel)
            else:
                self._schedule_repair(hub_channel)
        # else: seen already (our own publish echoed by the broker, or a repair).

    def _hold(self, hub_channel: HubChannel, message: ChannelMessage) -> bool:
        """Keep a message that came early until the ones before it arrive. Past the
        buffer's bounds (count and bytes) it is let go instead, and read back from
        history by the repair; False then."""
        pending = hub_channel.pending
        if message.seq in pending:
            return True
        size = data_bytes(message)
        if pending and (
            len(pending) >= self.max_pending
            or hub_channel.pending_bytes + size > self.pending_bytes
        ):
            hub_channel.held_dropped = True
            metrics.HUB_BUFFER_DROPS.labels("pending").inc()
            return False
        pending[message.seq] = message
        hub_channel.pending_bytes += size
        return True

    def _unhold(self, hub_channel: HubChannel, seq: int) -> ChannelMessage | None:
        message = hub_channel.pending.pop(seq, None)
        if message is not None:
            hub_channel.pending_bytes -= data_bytes(message)
        return message

    def _drain_pending(self, hub_channel: HubChannel) -> None:
        pending = hub_channel.pending
        for seq in [seq for seq in pending if seq <= hub_channel.delivered_seq]:
            self._unhold(hub_channel, seq)
        while (message := self._unhold(hub_channel, hub_channel.delivered_seq + 1)) is not None:
            self._fan_out(hub_channel, message)
        if pending or hub_channel.held_dropped:
            self._schedule_repair(hub_channel)
        elif hub_channel.repair_handle is not None:
            # The gap filled by itself: no history read needed.
            hub_channel.repair_handle.cancel()
            hub_channel.repair_handle = None

    def _fan_out(self, hub_channel: HubChannel, message: ChannelMessage) -> None:
        hub_channel.delivered_seq = message.seq
        hub_channel.fanned_out += 1
        hub_channel.recent.append(message)
        delivered = 0
        droppable = hub_channel.droppable
        for codec_name, by_codec in hub_channel.live.items():
            frame = message.frames.get(codec_name)
            if frame is None:
                codec = next(iter(by_codec.values())).subscriber.codec
                frame = encode_frame(codec, message, droppable)
            if message.exclude is None:
                _push_each(by_codec, frame)
            else:
                _push_each_except(by_codec, frame, message.exclude)
            delivered += len(by_codec)
        if hub_channel.deltas is not None:
            # Before the catching-up ones: one that goes live now must find the deltas'
            # base at this message.
            delivered += self._fan_out_deltas(hub_channel.deltas, message, droppable)
        if hub_channel.catching_up:
            self._feed_catching_up(hub_channel, message)
        metrics.MESSAGES_FANNED_OUT.value += 1
        metrics.DELIVERIES.value += delivered
        metrics.PUBLISH_TO_DELIVERY.observe(max(0.0, time.time() - message.timestamp))

    def _fan_out_deltas(
        self, deltas: ChannelDeltas, message: ChannelMessage, droppable: bool
    ) -> int:
        """The message to the channel's delta subscribers: one delta against the message
        before it for all in step (computed once, framed once per format), or the full
        frame everyone else gets when there is no base, the delta is not smaller, or
        either data is over ``delta_max_bytes`` (the delta's cost on the loop)."""
        base = deltas.base
        deltas.base = message
        delivered = 0
        if deltas.in_step:
            data_delta = None
            if (
                base is not None
                and base.seq == message.seq - 1
                and max(base.data_bytes, message.data_bytes) <= self.delta_max_bytes
            ):
                data_delta = fossil_delta_text(base.data_json, message.data_json)
            for by_codec in deltas.in_step.values():
                codec = next(iter(by_codec.values())).subscriber.codec
                if data_delta is None:
                    frame = encode_frame(codec, message, droppable)
                else:
                    frame = encode_delta_frame(codec, message, data_delta)
                _push_each(by_codec, frame)
                delivered += len(by_codec)
        if deltas.fresh:
            for by_codec in deltas.fresh.values():
                codec = next(iter(by_codec.values())).subscriber.codec
                _push_each(by_codec, encode_frame(codec, message, droppable))
                delivered += len(by_codec)
            deltas.settle_fresh()
        return delivered

    def deliver_event(
        self,
        channel: str,
        envelope: dict[str, Any],
        *,
        codec_name: str | None = None,
        exclude: str | None = None,
    ) -> None:
        """Push an envelope that is not a numbered message (presence join and leave, a
        Pusher client event) to the channel's subscribers on this node, encoded once
        per format; only to those of ``codec_name`` when given, and never to the
        subscriber whose Pusher socket id is ``exclude``."""
        hub_channel = self.channels.get(channel)
        if hub_channel is None:
            return
        frames: dict[str, OutFrame] = {}
        for by_codec in _subscribers_by_codec(hub_channel):
            codec = next(iter(by_codec.values())).subscriber.codec
            if codec_name is not None and codec.name != codec_name:
                continue
            frame = frames.get(codec.name)
            if frame is None:
                payload = codec.encode(envelope)
                frame = frames[codec.name] = OutFrame(codec.send_event(payload), len(payload))
            if exclude is None:
                _push_each(by_codec, frame)
            else:
                _push_each_except(by_codec, frame, exclude)

    def _feed_catching_up(self, hub_channel: HubChannel, message: ChannelMessage) -> None:
        for subscription in list(hub_channel.catching_up):
            buffer = subscription.buffer
            if buffer is not None:
                size = data_bytes(message)
                if buffer and (
                    len(buffer) >= self.max_pending
                    or subscription.buffer_bytes + size > self.pending_bytes
                ):
                    # A replay slower than the channel: forget what is held (it is
                    # stored) instead of holding an unbounded list.
                    buffer.clear()
                    subscription.buffer_bytes = 0
                    subscription.buffer_dropped = True
                    metrics.HUB_BUFFER_DROPS.labels("replay").inc()
                buffer.append(message)
                subscription.buffer_bytes += size
                continue
            self._replay(subscription, [message])
            if subscription.last_seq <= hub_channel.delivered_seq:
                del hub_channel.catching_up[subscription]
                self._make_live(subscription)

    # ----- filling gaps from history ---------------------------------------------------

    def _schedule_repair(self, hub_channel: HubChannel, delay: float | None = None) -> None:
        if hub_channel.repair_handle is not None or hub_channel.repairing:
            return
        hub_channel.repair_handle = self.loop.call_later(
            self.gap_wait_secs if delay is None else delay, self._start_repair, hub_channel
        )

    def _start_repair(self, hub_channel: HubChannel) -> None:
        if hub_channel.repair_handle is not None:
            hub_channel.repair_handle.cancel()
            hub_channel.repair_handle = None
        if hub_channel.repairing or hub_channel.state is not ChannelState.LIVE:
            return
        hub_channel.repairing = True
        spawn(self._repair(hub_channel), name="push-hub-repair", loop=self.loop)

    async def _repair(self, hub_channel: HubChannel) -> None:
        metrics.GAP_REPAIRS.inc()
        # What was let go before this read is read back by it.
        hub_channel.held_dropped = False
        retry = False
        try:
            while hub_channel.state is ChannelState.LIVE:
                # The seq the page is read from, taken before the read: live messages
                # keep arriving while it runs, and only the page can prove a trim.
                since = hub_channel.delivered_seq
                limit, max_bytes = self._repair_page_size(hub_channel)
                # Every row still stored, whatever retention would let a resume replay:
                # a live subscriber misses only what is really gone.
                page = await self.history.stored_page(hub_channel.name, since, limit, max_bytes)
                if not page.complete_from_since:
                    self._skip_trimmed_gap(hub_channel, page)
                for message in page.messages:
                    self.deliver(message)
                more = len(page.messages) >= limit or page.truncated
                if not more or hub_channel.delivered_seq == since:
                    break
                await self._wait_for_live_room(hub_channel)
        except Exception as exc:
            logger.warning("history read for %s failed: %s", hub_channel.name, exc)
            retry = True
        finally:
            hub_channel.repairing = False
        if retry or hub_channel.pending or hub_channel.held_dropped:
            self._schedule_repair(hub_channel, delay=max(self.gap_wait_secs, 1.0))

    def _repair_page_size(self, hub_channel: HubChannel) -> tuple[int, int]:
        """A repair's pages, like a replay's, sized to half the smallest send queue of
        the channel's live subscribers (count, bytes), so one page never overflows a
        queue that ``_wait_for_live_room`` saw at most half full."""
        limit, max_bytes = HISTORY_BATCH, self.replay_batch_bytes
        for by_codec in _subscribers_by_codec(hub_channel):
            for subscription in by_codec.values():
                outbox = subscription.subscriber.outbox
                limit = min(limit, max(1, outbox.max_frames // 2))
                max_bytes = min(max_bytes, max(1, outbox.max_bytes // 2))
        return limit, max_bytes

    async def _wait_for_live_room(self, hub_channel: HubChannel) -> None:
        """Before a repair's next page: wait, at most ``REPAIR_ROOM_WAIT_SECS``, until
        every live subscriber of the channel has read its send queue down to half. A
        drop-oldest channel does not wait: its slow readers lose old frames instead."""
        if hub_channel.droppable:
            return
        deadline = self.loop.time() + REPAIR_ROOM_WAIT_SECS
        while hub_channel.state is ChannelState.LIVE and self.loop.time() < deadline:
            if not any(
                not outbox.closed
                and (
                    len(outbox) > outbox.max_frames // 2
                    or outbox.queued_bytes > outbox.max_bytes // 2
                )
                for by_codec in _subscribers_by_codec(hub_channel)
                for outbox in (s.subscriber.outbox for s in by_codec.values())
            ):
                return
            await asyncio.sleep(OUTBOX_POLL_SECS)

    def _skip_trimmed_gap(self, hub_channel: HubChannel, page: HistoryPage) -> None:
        """History lacks seqs after the page's ``since`` although later ones were
        committed (``trim_history`` deleted them, a recent channel's window slid past
        them): go on from the oldest stored message; subscribers see the gap in seq,
        as the contract says.

        Only the page is evidence of a trim. Commits are in seq order, so a page whose
        latest seq is past ``since`` holds ``since + 1`` unless it was deleted; a
        message that is merely late on the broker never looks like this."""
        first_kept = page.messages[0].seq if page.messages else page.latest_seq + 1
        if hub_channel.delivered_seq >= first_kept - 1:
            return  # the gap filled while the page was read
        logger.warning(
            "%s: seqs %d..%d are not in history; skipping",
            hub_channel.name,
            hub_channel.delivered_seq + 1,
            first_kept - 1,
        )
        hub_channel.delivered_seq = first_kept - 1
        hub_channel.recent.clear()  # it must stay contiguous
        self._drain_pending(hub_channel)

    async def sync_with_history(self) -> None:
        """Catch up channels whose broadcast was lost: compare with the database."""
        live = [c for c in self.channels.values() if c.state is ChannelState.LIVE]
        if not live:
            return
        latest = await self.history.latest_seqs([c.name for c in live])
        for hub_channel in live:
            if hub_channel.delivered_seq < hub_channel.sync_mark:
                self._start_repair(hub_channel)
            hub_channel.sync_mark = latest.get(hub_channel.name, 0)


class _ReplaySlot:
    """A replay's share of the node's replay slots (``ReplaySlots``, None: unbounded):
    its address's slot held throughout, the node's while it reads, given back while it
    waits for its client to read and taken again before its next page."""

    __slots__ = ("held", "reading", "slots", "subscriber")

    def __init__(self, slots: ReplaySlots | None, subscriber: Subscriber) -> None:
        self.slots = slots
        self.subscriber = subscriber
        self.held = False
        self.reading = False

    async def take(self) -> bool:
        """The replay's slots; False when the client left while waiting. Raises
        PushError when none freed in time: the subscribe is refused."""
        if self.slots is None:
            return True
        subscriber = self.subscriber
        self.held = self.reading = await self.slots.acquire(subscriber.ip, lambda: subscriber.gone)
        return self.held

    def pause(self) -> None:
        """Nothing is read while the client reads its queue down: the node's slot goes
        back meanwhile."""
        if self.slots is not None and self.reading:
            self.reading = False
            self.slots.pause()

    async def resume(self) -> bool:
        """The node's slot again, before the next page; False when the client left."""
        if self.slots is not None and self.held and not self.reading:
            subscriber = self.subscriber
            if not await self.slots.resume(lambda: subscriber.gone):
                return False
            self.reading = True
        return not self.subscriber.gone

    def give_back(self) -> None:
        if self.slots is not None and self.held:
            self.held = False
            self.slots.release(self.subscriber.ip, reading=self.reading)
            self.reading = False


class _JoinCancelled(Exception):
    """Raised when the subscribe joining a channel was cancelled (its client went), to
    the subscribes waiting for that join: nothing failed, and they join afresh."""


def _join_refusal(exc: BaseException, joined: bool) -> PushError | None:
    """What a subscribe whose channel could not be joined is told, naming what failed:
    the broker's join (Redis, across nodes), or the read of the channel's latest seq
    (history: PostgreSQL's ``database unavailable`` or the recent store's ``Redis
    unavailable`` as they raised it). None for a cancellation, which stays one."""
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, PushError):
        return exc
    failed = "history" if joined else "message broker"
    return PushError(ErrorCode.UNAVAILABLE, f"{failed} unavailable: {type(exc).__name__}")
