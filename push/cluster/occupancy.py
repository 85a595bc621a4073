"""How many subscribers a channel has across the cluster, for ``occupancy`` events and
the channel info over REST.

Each node counts its own subscribers per channel in its hub and publishes the counts
that changed, once a second, to a Redis hash of its own (``<prefix>:subscribers:<node>``,
channel -> count). The hash expires ``COUNTS_TTL_SECS`` after the node last refreshed
it, so a node that died takes its counts with it within seconds, before the directory
reaps it. A channel's total is the sum of its field over the nodes of the directory.

Nothing of this is on the fan-out path: the hub notes which channels gained or lost a
subscription (``Hub.counts_changed``), and the once-a-second loop publishes those. A
node that has ``occupancy`` subscribers reads the totals of their channels on the same
loop and sends each subscriber the new total when it changed: at most one event a
second per channel. Without Redis (one process) the totals are this node's counts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings

from common.redis_client import redis_prefix, redis_sync
from push.cluster.directory import nodes_key
from push.fanout.hub import Hub, Subscription
from push.fanout.outbox import OutFrame
from push.wire import protocol

logger = logging.getLogger(__name__)

# The contract's rate: at most one occupancy event a second per channel.
INTERVAL_SECS = 1.0
# A node's counts outlive its last refresh by this much: a dead node's vanish then.
COUNTS_TTL_SECS = 5


def counts_key(prefix: str, server_id: str) -> str:
    return f"{prefix}:subscribers:{server_id}"


class Occupancy:
    """This node's side: publish its counts, and tell its occupancy subscribers."""

    def __init__(self, redis: Any, prefix: str, server_id: str, *, hub: Hub) -> None:
        self.redis = redis
        self.prefix = prefix
        self.server_id = server_id
        self.hub = hub
        # The counts last written to Redis (what our hash holds).
        self._published: dict[str, int] = {}
        # No round written yet: a hash under this node's name is what a previous run
        # of it (a fixed NODE_ID, restarted within COUNTS_TTL_SECS) left.
        self._first_round = True
        # channel -> {subscription: the total it was last told}
        self._watchers: dict[str, dict[Subscription, int | None]] = {}

    def local_count(self, channel: str) -> int:
        hub_channel = self.hub.channels.get(channel)
        return hub_channel.subscriber_count() if hub_channel is not None else 0

    async def watch(self, subscription: Subscription) -> None:
        """``subscription`` asked for occupancy: tell it the total now, and whenever it
        changes after. Ends by itself with the subscription (``active`` false)."""
        channel = subscription.channel.name
        watchers = self._watchers.setdefault(channel, {})
        if subscription in watchers:
            return
        watchers[subscription] = None
        try:
            totals = await self._totals([channel])
        except Exception as exc:  # the next round tells it; the subscription stands
            logger.warning("occupancy of %s not read: %s", channel, exc)
            return
        self._tell({channel: totals[channel]})

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_SECS)
            try:
                await self.tick()
            except Exception as exc:
                logger.warning("occupancy round failed: %s", exc)

    async def tick(self) -> None:
        await self.publish()
        for channel in [c for c, w in self._watchers.items() if not _prune(w)]:
            del self._watchers[channel]
        if self._watchers:
            self._tell(await self._totals(list(self._watchers)))

    async def publish(self) -> None:
        """Write the counts that changed since the last round, and refresh the hash's
        expiry (writing everything again if Redis lost it)."""
        changed = self.hub.counts_changed
        self.hub.counts_changed = set()
        updates = {channel: self.local_count(channel) for channel in changed}
        updates = {c: n for c, n in updates.items() if n != self._published.get(c, 0)}
        if self.redis is None:
            self._apply(updates)
            return
        key = counts_key(self.prefix, self.server_id)
        published_before = bool(self._published)
        first_round = self._first_round
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if first_round:
                    pipe.delete(key)
                # Before the writes: false when the hash is gone, before this round's
                # writes make it exist again with only what changed.
                pipe.expire(key, COUNTS_TTL_SECS)
                removed = [c for c, n in updates.items() if n == 0]
                kept = {c: n for c, n in updates.items() if n}
                if removed:
                    pipe.hdel(key, *removed)
                if kept:
                    pipe.hset(key, mapping=kept)
                    pipe.expire(key, COUNTS_TTL_SECS)
                results = await pipe.execute()
        except Exception:
            self.hub.counts_changed |= changed  # written on a later round
            raise
        self._first_round = False
        self._apply(updates)
        if not results[int(first_round)] and published_before and self._published:
            # The hash was gone (Redis restarted): write every count again.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=self._published)
                pipe.expire(key, COUNTS_TTL_SECS)
                await pipe.execute()

    def _apply(self, updates: dict[str, int]) -> None:
        for channel, count in updates.items():
            if count:
                self._published[channel] = count
            else:
                self._published.pop(channel, None)

    async def withdraw(self) -> None:
        """A draining node's counts go at once rather than when the hash expires."""
        if self.redis is not None:
            await self.redis.delete(counts_key(self.prefix, self.server_id))

    async def _totals(self, channels: list[str]) -> dict[str, int]:
        """Each channel's subscribers on every node: this node's counted now, the others'
        as they last published them."""
        totals = {channel: self.local_count(channel) for channel in channels}
        if self.redis is None:
            return totals
        nodes = [n for n in await _nodes(self.redis) if n != self.server_id]
        if not nodes:
            return totals
        async with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.hmget(counts_key(self.prefix, node), channels)
            answers = await pipe.execute()
        for counts in answers:
            for channel, count in zip(channels, counts, strict=True):
                if count is not None:
                    totals[channel] += int(count)
        return totals

    def _tell(self, totals: dict[str, int]) -> None:
        """Send each watcher its channel's total when it differs from what it was told,
        encoded once per wire format."""
        for channel, total in totals.items():
            watchers = self._watchers.get(channel)
            if not watchers:
                continue
            envelope = protocol.occupancy(channel=channel, subscribers=total)
            frames: dict[str, OutFrame] = {}
            for subscription, told in watchers.items():
                if told == total or not subscription.active:
                    continue
                codec = subscription.subscriber.codec
                frame = frames.get(codec.name)
                if frame is None:
                    payload = codec.encode(envelope)
                    frame = frames[codec.name] = OutFrame(codec.send_event(payload), len(payload))
                subscription.subscriber.outbox.push(frame)
                watchers[subscription] = total


def _prune(watchers: dict[Subscription, int | None]) -> bool:
    """Forget the subscriptions that ended; True while some are left."""
    for subscription in [s for s in watchers if not s.active]:
        del watchers[subscription]
    return bool(watchers)


async def _nodes(redis: Any) -> list[str]:
    """The directory's nodes, dead ones too until reaped: their counts expire first."""
    members = await redis.zrange(nodes_key(), 0, -1)
    return [m.decode() if isinstance(m, bytes) else m for m in members]


# ----- reading the totals outside a node (REST views) --------------------------------


def subscriber_totals(
    channels: Iterable[str], *, local: Callable[[str], int] | None
) -> dict[str, int]:
    """Each channel's subscribers across the cluster, from Redis (sync, for views);
    without Redis the cluster is this process, whose node ``local`` counts (if any)."""
    channels = list(channels)
    if not getattr(settings, "REDIS_URL", None):
        return {channel: local(channel) if local else 0 for channel in channels}
    totals = dict.fromkeys(channels, 0)
    if not channels:
        return totals
    client = redis_sync(socket_connect_timeout=2, socket_timeout=5)
    prefix = redis_prefix()
    try:
        nodes = [m.decode() for m in client.zrange(nodes_key(), 0, -1)]  # type: ignore[union-attr]  # redis-py types sync and asyncio commands alike
        pipe = client.pipeline(transaction=False)
        for node in nodes:
            pipe.hmget(counts_key(prefix, node), channels)
        for counts in pipe.execute():
            for channel, count in zip(channels, counts, strict=True):
                if count is not None:
                    totals[channel] += int(count)
    finally:
        client.close()
    return totals


def occupied_channels(prefix_filter: str, *, local: Hub | None) -> dict[str, int]:
    """Every channel with a subscriber on some node whose name starts with
    ``prefix_filter``, with its total (sync, for views); without Redis, those of
    ``local``, this process's hub (if any)."""
    if not getattr(settings, "REDIS_URL", None):
        channels = list(local.channels.values()) if local is not None else []
        counts = {
            c.name: c.subscriber_count() for c in channels if c.name.startswith(prefix_filter)
        }
        return {channel: count for channel, count in counts.items() if count}
    totals = _cluster_totals()
    return {
        channel: total for channel, total in totals.items() if channel.startswith(prefix_filter)
    }


# Listing the occupied channels reads every node's whole hash, however few names the
# request asks for: one anonymous client asking many times a second would make the node
# read the cluster's every channel as often. So a process reads it at most once per
# ``LIST_SNAPSHOT_SECS``: requests meanwhile share that read (one at a time, the others
# wait for it). The counts are a second or two behind anyway (they are published once a
# second).
LIST_SNAPSHOT_SECS = 1.0
_snapshot_lock = threading.Lock()
_snapshot: tuple[float, dict[str, int]] | None = None


def _cluster_totals() -> dict[str, int]:
    global _snapshot
    with _snapshot_lock:
        if _snapshot is not None and time.monotonic() - _snapshot[0] < LIST_SNAPSHOT_SECS:
            return _snapshot[1]
        totals = _read_cluster_totals()
        _snapshot = (time.monotonic(), totals)
        return totals


def _read_cluster_totals() -> dict[str, int]:
    client = redis_sync(socket_connect_timeout=2, socket_timeout=5)
    prefix = redis_prefix()
    totals: dict[str, int] = {}
    try:
        nodes = [m.decode() for m in client.zrange(nodes_key(), 0, -1)]  # type: ignore[union-attr]  # as above
        for node in nodes:
            for field, count in client.hscan_iter(counts_key(prefix, node)):
                channel = field.decode() if isinstance(field, bytes) else field
                totals[channel] = totals.get(channel, 0) + int(count)
    finally:
        client.close()
    return {channel: total for channel, total in totals.items() if total > 0}
