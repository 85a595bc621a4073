"""This server process as a node of the cluster: its hub, broker and registry.

Started on the event loop by the first connection (daphne runs no ASGI lifespan), one
per process, through ``push.services.runtime.get_node``; ``running_node()`` is the one
handle to it. ``broadcast`` is the single entry of a committed message into fan-out:
the local hub delivers it at once and the broker carries it to the other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection as database
from django.utils import timezone

from accounts.permissions import is_presence_channel
from accounts.principals import principals_refresh
from common import metrics
from common.addresses import address_block
from common.background import cancel_and_wait, loop_runs_here, spawn
from common.conf import push_settings
from common.db import db_call
from common.errors import CloseCode
from push.cluster.address_budgets import AddressBudgets, Budget
from push.cluster.admission import (
    ConnectionCounter,
    connection_capacity,
    raise_open_file_limit,
)
from push.cluster.broker import (
    CLIENT_EVENT,
    PRESENCE_EVENT,
    Broker,
    channel_group,
    presence_event,
)
from push.cluster.directory import CONTROL_GROUP, DISCONNECT_EVENT, TOP_CHANNELS, NodeDirectory
from push.cluster.live import LiveConnection, channels_held
from push.cluster.occupancy import Occupancy
from push.cluster.overload import LoopLag
from push.cluster.presence import PresenceStore, leave_presence
from push.cluster.presence_views import PresenceViews
from push.cluster.registry import ClosedConnection, ConnectionRegistry, close_node_connections
from push.fanout.hub import Hub
from push.fanout.message import ChannelMessage
from push.fanout.replay_slots import ReplaySlots
from push.ops.events import DISCONNECT, EventLog
from push.storage import recent_store, relay
from push.storage.history import CachedHistory, DatabaseHistory, ModeHistory, RecentHistory
from push.storage.history_modes import is_recent
from push.storage.recent_cache import RecentCache
from push.storage.retention import retention_policy
from push.storage.write_pipeline import WritePipeline, pipeline_conninfo
from push.wire.protocol import presence_change
from push.wire.pusher import PUSHER_CODEC

logger = logging.getLogger(__name__)

# How long a stopping node waits for its background loops to end.
STOP_TASKS_SECS = 5.0
# A stopping node sends what it queued for Redis (the recent-history cache's appends,
# which relay committed messages to the other nodes, and the broker's messages) within
# what is left of its drain's deadline (``PUSH_DRAIN_DEADLINE_SECS``), or within this
# when less is left or it stops without a drain: a healthy Redis takes milliseconds, and
# one that does not answer holds the stop no longer than that.
STOP_FLUSH_MIN_SECS = 1.0

_principals_refresh = db_call(principals_refresh)
_close_all = db_call(close_node_connections)


# Ends the subscriptions a connection's principal may no longer hold (node, connection,
# now): the services' rule, which the node applies on its revocation loop.
RevokeSubscriptions = Callable[["Node", LiveConnection, float], Awaitable[int]]


class Node:
    def __init__(self, *, server_id: str, revoke_subscriptions: RevokeSubscriptions) -> None:
        self.server_id = server_id
        self._revoke_subscriptions = revoke_subscriptions
        self.loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self.is_running = False
        self.draining = False
        self.broker = Broker(
            get_channel_layer(),
            on_message=self._on_broker_message,
            on_event=self._on_control,
            on_resubscribed=self._on_resubscribed,
        )
        self.directory = NodeDirectory(
            settings.REDIS_URL,
            server_id,
            announce_secs=push_settings.CLUSTER_ANNOUNCE_SECS,
            dead_after_secs=push_settings.NODE_DEAD_AFTER_SECS,
        )
        self.presence = PresenceStore(self.directory.redis, self.directory.prefix, server_id)
        self.presence_views = PresenceViews(self.presence, deliver=self._pass_on_presence)
        self.events = EventLog(
            self.directory.redis if push_settings.EVENTS else None,
            self.directory.prefix,
            server_id,
            maxlen=push_settings.EVENT_STREAM_MAXLEN,
            max_stream_bytes=push_settings.EVENT_STREAM_MAX_BYTES,
        )
        if self.events.enabled:
            self.presence.events = self.events
        self.started_at = time.time()
        self._rate_marks: tuple[float, dict[str, int]] = (time.monotonic(), {})
        self.recent_cache = RecentCache(
            self.directory.redis,
            self.directory.prefix,
            size=push_settings.RECENT_CACHE_SIZE,
            ttl_secs=push_settings.RECENT_CACHE_TTL_SECS,
            max_bytes=push_settings.RECENT_CACHE_MAX_BYTES,
        )
        self.hub = Hub(
            history=ModeHistory(
                durable=CachedHistory(self.recent_cache)
                if self.recent_cache.enabled
                else DatabaseHistory(),
                recent=RecentHistory(),
            ),
            join=self._join_channel,
            leave=self._leave_channel,
            drop_oldest_patterns=list(push_settings.DROP_OLDEST_CHANNELS),
            gap_wait_secs=push_settings.GAP_WAIT_SECS,
            recent_size=push_settings.RECENT_PER_CHANNEL,
            recent_bytes=push_settings.RECENT_MAX_BYTES,
            replay_batch_bytes=push_settings.REPLAY_BATCH_MAX_BYTES,
            pending_bytes=push_settings.PENDING_MAX_BYTES,
            delta_max_bytes=push_settings.DELTA_MAX_BYTES,
            replay_slots=ReplaySlots(
                per_node=push_settings.MAX_REPLAYS_PER_NODE,
                per_ip=push_settings.MAX_REPLAYS_PER_IP,
                wait_secs=push_settings.REPLAY_SLOT_WAIT_SECS,
            ),
            retention=retention_policy,
        )
        self.occupancy = Occupancy(
            self.directory.redis, self.directory.prefix, server_id, hub=self.hub
        )
        self.write_pipeline = _write_pipeline(self.broadcast)
        self._tasks: list[asyncio.Task[None]] = []
        # Dead nodes being reaped now, each by a task of its own (``_reap``).
        self._reaping: dict[str, asyncio.Task[None]] = {}
        self._cache_task: asyncio.Task[None] | None = None
        # Live connections of this node, for revocation checks, admin actions and drain.
        self.connections: dict[uuid.UUID, LiveConnection] = {}
        self.registry = ConnectionRegistry(
            server_id,
            flush_secs=push_settings.REGISTRY_FLUSH_SECS,
            heartbeat_secs=push_settings.REGISTRY_HEARTBEAT_SECS,
            live=self.connections,
            max_buffered=push_settings.REGISTRY_MAX_BUFFERED,
            on_previous_run_closed=self._announce_previous_run,
        )
        self.max_connections = push_settings.MAX_CONNECTIONS or connection_capacity(
            raise_open_file_limit()
        )
        self._per_user = ConnectionCounter(push_settings.MAX_CONNECTIONS_PER_USER)
        self._per_ip = ConnectionCounter(push_settings.MAX_CONNECTIONS_PER_IP)
        self._anonymous_per_ip = ConnectionCounter(push_settings.MAX_ANONYMOUS_CONNECTIONS_PER_IP)
        self.addresses = address_budgets_from_settings()
        self.overload = LoopLag(
            limit_secs=push_settings.OVERLOAD_LAG_MS / 1000,
            hold_secs=push_settings.OVERLOAD_HOLD_SECS,
            admit_per_sec=push_settings.OVERLOAD_ADMIT_PER_SEC,
        )
        # Every connection's on_closing: one bound method shared by all of them, where
        # a fresh one (or a closure) per connection would cost each ~100 bytes.
        self.on_connection_closing = self.release_subscriptions

    def admit(self, connection: LiveConnection) -> bool:
        """Count a new connection against this node's limits: its own, per user, per IP."""
        if len(self.connections) >= self.max_connections:
            metrics.CONNECTIONS_REFUSED.labels("node").inc()
            return False
        user_key = connection.principal.key if connection.principal.is_authenticated else None
        if not self._per_user.try_add(user_key):
            metrics.CONNECTIONS_REFUSED.labels("user").inc()
            return False
        ip_key = _ip_key(connection.ip)
        if not self._per_ip.try_add(ip_key):
            self._per_user.remove(user_key)
            metrics.CONNECTIONS_REFUSED.labels("address").inc()
            return False
        if not self._anonymous_per_ip.try_add(_anonymous_ip_key(connection)):
            self._per_user.remove(user_key)
            self._per_ip.remove(ip_key)
            metrics.CONNECTIONS_REFUSED.labels("address").inc()
            return False
        self.connections[connection.connection_id] = connection
        # A back-end's service token is not held to its address's budgets.
        if connection.principal.kind != "service":
            budget = self.addresses.acquire(connection.ip)
            if budget is not None:
                connection.bind_address_budget(budget)
        return True

    def release_subscriptions(self, connection: LiveConnection) -> None:
        """Unsubscribe a closing connection everywhere; presence members leave."""
        presence_channels = [c for c in connection.subscriptions if is_presence_channel(c)]
        if connection.subscriptions:
            connection.released_channels = tuple(connection.subscriptions)
        for subscription in connection.subscriptions.values():
            self.hub.unsubscribe(subscription)
        connection.subscriptions.clear()
        if presence_channels:
            spawn(
                leave_presence(
                    self.presence,
                    self.announce_presence,
                    str(connection.connection_id),
                    presence_channels,
                ),
                name="push-presence-leave",
                loop=self.loop,
            )

    def release(self, connection: LiveConnection) -> None:
        if self.connections.pop(connection.connection_id, None) is None:
            return
        principal = connection.principal
        self._per_user.remove(principal.key if principal.is_authenticated else None)
        self._per_ip.remove(_ip_key(connection.ip))
        self._anonymous_per_ip.remove(_anonymous_ip_key(connection))
        if connection.address_budget is not None:
            self.addresses.release(connection.address_budget)

    async def start(self) -> None:
        await self.broker.start()
        await self.broker.join_group(CONTROL_GROUP)
        self._cache_task = spawn(self.recent_cache.run(), name="push-recent-cache", loop=self.loop)
        self._tasks = [
            spawn(self.registry.run(), name="push-registry", loop=self.loop),
            spawn(self._sync_loop(), name="push-history-sync", loop=self.loop),
            spawn(self._revocation_loop(), name="push-revocation", loop=self.loop),
            spawn(self._heartbeat_loop(), name="push-heartbeats", loop=self.loop),
            spawn(self._cluster_loop(), name="push-cluster", loop=self.loop),
            spawn(self._repair_loop(), name="push-repair", loop=self.loop),
            spawn(self.events.run(), name="push-events", loop=self.loop),
            self._cache_task,
            spawn(self.occupancy.run(), name="push-occupancy", loop=self.loop),
            spawn(self.overload.run(), name="push-loop-lag", loop=self.loop),
        ]
        if self.write_pipeline is not None:
            self.write_pipeline.start()
        self.is_running = True
        recent_store.serve_on(self.loop)
        relay.relay_with(self.broker.storage_relay())
        if self.presence.redis is not None:
            self.presence.relay = self.broker.presence_relay()
        if self.presence.relay is not None and self.broker.hears_in_order:
            self.presence_views.hear_with(self.broker.heard_all_before)
            self._tasks.append(
                spawn(self.presence_views.run(), name="push-presence-views", loop=self.loop)
            )
        global _running
        _running = self
        logger.info(
            "node %s started, accepting at most %d connections",
            self.server_id,
            self.max_connections,
        )

    async def stop(self, *, flush_secs: float = STOP_FLUSH_MIN_SECS) -> None:
        """Stop: the write pipeline first (what it commits meanwhile is broadcast, so
        queued), then what is queued for Redis goes out, for ``flush_secs`` at most,
        while the storage relay is still on (``broadcast`` counted on it for those
        marked ``relayed``), and then the background loops end. A node stopped after a
        drain stays ``draining``: its process is going away, and new clients that reach
        it before the server stops listening are sent elsewhere, not greeted."""
        self.is_running = False
        global _running
        running = _running is self
        if running:
            _running = None
            recent_store.serve_on(None)
        if self.write_pipeline is not None:
            await self.write_pipeline.stop()
        await self._flush_queued(flush_secs)
        if running:
            relay.relay_with(None)
        await cancel_and_wait([*self._tasks, *self._reaping.values()], timeout=STOP_TASKS_SECS)
        await self._flush_events(flush_secs)
        await self.broker.stop()
        await recent_store.store_close()

    async def _flush_queued(self, timeout_secs: float) -> None:
        """The recent-history cache's appends and the broker's messages, sent at once.
        (Only on the node's own loop: tests may stop a node from another one.)"""
        if self.loop is not asyncio.get_running_loop():
            return
        self.recent_cache.close()
        flushing: list[Awaitable[Any]] = [self.broker.flush(timeout_secs)]
        if self._cache_task is not None:
            flushing.append(asyncio.wait({self._cache_task}, timeout=timeout_secs))
        await asyncio.gather(*flushing)

    async def _flush_events(self, timeout_secs: float) -> None:
        """The lifecycle events still buffered, the batch the cancelled loop was writing
        among them, written for ``timeout_secs`` at most: after the loops that emit them
        have ended, or the last of them were lost with the process."""
        if self.loop is not asyncio.get_running_loop():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.events.flush(), timeout_secs)

    def serves_here(self) -> bool:
        """Whether the node is running and the caller runs on its loop (cheaply:
        ``loop_runs_here``)."""
        return self.is_running and loop_runs_here(self.loop, self._loop_thread_id)

    def broadcast(self, message: ChannelMessage) -> None:
        """A message committed on this node: to local subscribers, the other nodes
        and the recent-history cache (a recent channel's window is its history
        already). The other nodes get it from a storage script where one sends it
        (``relayed``: a recent channel's numbering call, or the cache's append),
        else from the broker."""
        self.hub.deliver(message)
        if is_recent(message.channel):
            if not message.relayed:
                self.broker.publish_soon(message)
            return
        # The cache's call sends it to the other nodes where it can.
        message.relayed = self.recent_cache.relays(message)
        if not message.relayed:
            self.broker.publish_soon(message)
        self.recent_cache.append_soon(message)

    def _on_broker_message(self, message: ChannelMessage) -> None:
        self.hub.deliver(message)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(push_settings.SYNC_INTERVAL_SECS)
            try:
                await self.hub.sync_with_history()
            except Exception as exc:
                logger.warning("history sync failed: %s", exc)

    async def _join_channel(self, channel: str) -> None:
        await self.broker.join(channel)
        self.events.occupied(channel)
        if is_presence_channel(channel):
            self.presence_views.track(channel)

    async def _leave_channel(self, channel: str) -> None:
        self.presence_views.untrack(channel)
        try:
            await self.broker.leave(channel)
        finally:
            # Vacated here whatever Redis answered: the hub forgets the channel either
            # way, and a leave that failed left the group all the same (its reader
            # connection is given up, and opened again with only the groups still
            # joined). Unrecorded, the channel stayed occupied for good: no repair
            # finds a channel this node still holds in its sets.
            self.events.vacated(channel)

    def _on_resubscribed(self) -> None:
        spawn(self._reconcile_presence(), name="push-presence-reconcile", loop=self.loop)

    async def _reconcile_presence(self) -> None:
        """Once the node hears Redis again: its own members back first where Redis lost
        them (restarted without its data), as the repair loop would put them soon, so
        that its subscribers are not told that members still here left (themselves
        among them); then every channel it serves is put right."""
        try:
            await self.presence.repair(self.announce_presence)
        except Exception as exc:  # the repair loop tries again
            logger.warning("presence repair failed: %s", exc)
        finally:
            self.presence_views.resubscribed()

    async def announce_presence(self, kind: str, channel: str, member: dict[str, Any]) -> None:
        """Tell every node serving ``channel`` (this one too) that a member joined/left.
        Called exactly once per join or leave cluster-wide (the presence scripts decide,
        the dead-node reaper included). Where the presence store relays
        (``PresenceStore.relay``), the change was sent to the nodes already, in Redis'
        order; its ``member_added`` / ``member_removed`` the script wrote to the event
        stream (``PresenceStore.events``)."""
        if self.presence.relay is None:
            await self.broker.send_event(
                channel_group(channel), presence_event(kind, channel, member)
            )
        elif self.presence_views.enabled and not self.broker.hears(channel):
            # Sent to the other nodes, but this one cannot hear it: its subscribers get
            # it now, not at the next reconciliation (a Pusher member's own list must
            # hold it). Heard after all (the connection came back as it was sent), it
            # changes nothing in the view, and is not passed on twice.
            self._pass_on_presence(channel, kind, member)

    async def relay_client_event(self, channel: str, frame: dict[str, Any], sender: str) -> None:
        """A Pusher client event: to the channel's Pusher subscribers on every node but
        its sender (socket id ``sender``). Not stored, not numbered, as in Pusher."""
        event = {"type": CLIENT_EVENT, "channel": channel, "frame": frame, "sender": sender}
        await self.broker.send_event(channel_group(channel), event)

    def _on_control(self, event: dict[str, Any]) -> None:
        if event.get("type") == CLIENT_EVENT:
            self.hub.deliver_event(
                event["channel"],
                event["frame"],
                codec_name=PUSHER_CODEC.name,
                exclude=event["sender"],
            )
            return
        if event.get("type") == PRESENCE_EVENT:
            self._pass_on_presence(event["channel"], event["kind"], event["member"])
            return
        if event.get("type") != DISCONNECT_EVENT:
            return
        connection_ids = set(event.get("connection_ids") or ())
        user_ids = set(event.get("user_ids") or ())
        pusher_user_ids = set(event.get("pusher_user_ids") or ())
        code = int(event.get("code") or CloseCode.POLICY)
        for connection in list(self.connections.values()):
            if (
                str(connection.connection_id) in connection_ids
                or connection.principal.user_id in user_ids
                or getattr(connection, "pusher_user_id", None) in pusher_user_ids
            ):
                connection.close(code)

    def _pass_on_presence(self, channel: str, kind: str, member: dict[str, Any]) -> None:
        """A join or leave to this node's subscribers of ``channel``: one heard from
        Redis, or one it missed (``PresenceViews``)."""
        if not self.presence_views.heard(channel, kind, member):
            return  # they were told already (``PresenceViews.heard``)
        # Before the subscribers hear of it: a member list they ask for next is read
        # anew, and one being read meanwhile is told.
        self.presence.heard(channel, kind, member)
        self.hub.deliver_event(channel, presence_change(kind=kind, channel=channel, member=member))

    def stats(self) -> dict[str, Any]:
        """What this node serves, with per-channel message rates since the last call."""
        now = time.monotonic()
        then, previous = self._rate_marks
        elapsed = max(now - then, 1e-6)
        counts = {name: c.fanned_out for name, c in self.hub.channels.items()}
        self._rate_marks = (now, counts)
        channels = sorted(
            (
                (name, c.subscriber_count(), (counts[name] - previous.get(name, 0)) / elapsed)
                for name, c in self.hub.channels.items()
            ),
            key=lambda item: -item[1],
        )[:TOP_CHANNELS]
        return {
            "server_id": self.server_id,
            "connections": len(self.connections),
            "channels": [
                {"name": n, "subscribers": s, "messages_per_sec": round(r, 2)}
                for n, s, r in channels
            ],
            "channel_count": len(self.hub.channels),
            "draining": self.draining,
            "started_at": self.started_at,
            "updated_at": time.time(),
        }

    async def _cluster_loop(self) -> None:
        announced_at: float | None = None  # when this node's last announcement began
        judging_from = 0.0  # no node is judged dead before this (monotonic)
        while True:
            started = time.monotonic()
            try:
                listed_anew = await self.directory.announce(self.stats())
                if listed_anew and announced_at is not None:
                    # Forgotten since the last turn: another node took this one for dead
                    # (it could not reach Redis for a while) and marked its connections
                    # closed in the registry, or Redis lost its data. They are alive.
                    self.registry.rewrite_soon()
                if announced_at is not None and _paused(started - announced_at):
                    # This node's own announcements stopped for a while: the machine
                    # (or virtual machine) or this process paused, or Redis was out of
                    # reach. The others' may be as old for the same reason, and a node
                    # paused with this one may take a while to run again (a loaded
                    # machine resumes processes one by one): a silence counts only once
                    # this node has itself run for a whole dead-node age since.
                    judging_from = started + push_settings.NODE_DEAD_AFTER_SECS
                    logger.warning(
                        "no announcement for %.1f s; dead nodes judged again in %.1f s",
                        started - announced_at,
                        push_settings.NODE_DEAD_AFTER_SECS,
                    )
                announced_at = started
                if started < judging_from:
                    continue
                dead = await self.directory.dead_nodes()
                if _paused(time.monotonic() - started):
                    # Paused since this turn began (after its time was read, before
                    # Redis judged the ages): those ages may hold this node's own
                    # pause. The next turn sees the gap and waits as above.
                    continue
                for server_id in dead:
                    if server_id != self.server_id and server_id not in self._reaping:
                        self._reaping[server_id] = spawn(
                            self._reap(server_id), name="push-reap", loop=self.loop
                        )
            except Exception as exc:
                logger.warning("cluster announce failed: %s", exc)
            finally:
                await asyncio.sleep(push_settings.CLUSTER_ANNOUNCE_SECS)

    async def _reap(self, server_id: str) -> None:
        """What a dead node left: its connections closed (with the disconnect events it
        never sent), its presence members gone, its channels vacated; then it is
        forgotten. A task apart from the announcements: a node with tens of thousands
        of presence members takes seconds to reap (a leave and its announcement each),
        and this node's own announcements must not wait that long, or the others take
        it for dead as well. What fails is tried again at the next verdict."""
        try:
            closed = await _close_all(server_id, CloseCode.SERVER_ERROR)
            self._announce_disconnects(server_id, closed)
            await self._reap_presence(server_id)
            await self.events.vacate_all_of(server_id)
            await self.directory.forget(server_id)
            logger.warning("node %s is gone: %d connections closed", server_id, len(closed))
        except Exception as exc:
            logger.warning("reaping node %s failed: %s", server_id, exc)
        finally:
            self._reaping.pop(server_id, None)

    async def _repair_loop(self) -> None:
        """This node's presence members and occupied channels back in Redis if it lost
        them (``PresenceStore.repair``, ``EventLog.repair``), every announcement
        interval. A loop of its own: putting back thousands of members takes a while,
        which must not hold this node's announcements (the others would take it for
        dead)."""
        while True:
            await asyncio.sleep(push_settings.CLUSTER_ANNOUNCE_SECS)
            try:
                await self.presence.repair(self.announce_presence)
                await self.events.repair()
            except Exception as exc:  # the next round tries again
                logger.warning("presence or occupancy repair failed: %s", exc)

    def _announce_disconnects(self, server_id: str, closed: list[ClosedConnection]) -> None:
        """The disconnect events a dead node never sent, one per connection its rows
        held open: ``node`` is the dead one; no ``principal`` (the rows keep none)."""
        now = timezone.now()
        for connection in closed:
            self.events.emit(
                DISCONNECT,
                node=server_id,
                connection_id=str(connection.connection_id),
                close_code=CloseCode.SERVER_ERROR,
                duration_secs=round((now - connection.connected_at).total_seconds(), 3),
                channels=connection.subscriptions,
            )

    def _announce_previous_run(self, closed: list[ClosedConnection]) -> None:
        """The disconnect events a previous run of this node (same ``NODE_ID``, killed)
        never sent, as for a dead node: its presence members and channels are put
        right by the repair loop, which finds them in Redis but not in this run."""
        self._announce_disconnects(self.server_id, closed)

    async def _reap_presence(self, server_id: str) -> None:
        """A dead node's members leave, announced as if their connections had closed."""
        for channel, connection_id in await self.presence.entries_of(server_id):
            left = await self.presence.leave(channel, connection_id, server_id=server_id)
            if left is not None:
                await self.announce_presence("leave", channel, left)

    async def _heartbeat_loop(self) -> None:
        timeout = push_settings.HEARTBEAT_TIMEOUT_SECS
        while True:
            await asyncio.sleep(min(5.0, timeout / 3))
            self.close_silent(timeout)

    def close_silent(self, timeout_secs: float) -> int:
        """Close (4001) connections that sent nothing for ``timeout_secs``; a protocol
        with its own rule (Pusher pings an idle client first) applies that instead."""
        now = time.monotonic()
        cutoff = now - timeout_secs
        earliest = now - min(timeout_secs, push_settings.PUSHER_ACTIVITY_TIMEOUT_SECS)
        silent = [c for c in self.connections.values() if c.last_seen < earliest and c.is_open]
        return sum(connection.check_silence(now, cutoff) for connection in silent)

    async def drain(self, *, code: int, deadline_secs: float) -> None:
        """Tell every client to go, let queued frames out, record the closes, stop."""
        self.draining = True
        deadline = self.loop.time() + deadline_secs
        logger.info("node %s draining %d connections", self.server_id, len(self.connections))
        for connection in list(self.connections.values()):
            connection.close(code)
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections.values()):
            connection.abort(code)
            connection.drop()
            connection.mark_closed(code)
            # Its session may end after the node stopped (daphne), its event with it:
            # announced here, and not again by its session (which finds it let go).
            self.events.emit(
                DISCONNECT,
                connection_id=str(connection.connection_id),
                principal=connection.principal.key,
                close_code=code,
                duration_secs=round(time.monotonic() - connection.opened_at, 3),
                channels=channels_held(connection),
            )
            self.release(connection)
        try:
            # Within the deadline as well (the stop's least when less is left): a Redis
            # or database that does not answer must not hold the exit past it.
            async with asyncio.timeout(max(deadline - self.loop.time(), STOP_FLUSH_MIN_SECS)):
                await self.registry.close_all(code)
                # The channels occupied since the last batch are in Redis' sets first:
                # read from there, a channel joined just before the drain (its change
                # still buffered) was never announced vacated.
                await self.events.flush()
                await self.events.vacate_all_of(self.server_id)
                await self.events.flush()
                await self.directory.withdraw()
                await self.occupancy.withdraw()
        except Exception as exc:
            logger.warning("could not mark connections closed: %s", exc or type(exc).__name__)
        await self.stop(flush_secs=max(deadline - self.loop.time(), STOP_FLUSH_MIN_SECS))

    async def _revocation_loop(self) -> None:
        while True:
            await asyncio.sleep(push_settings.REVOCATION_CHECK_SECS)
            try:
                await self.close_revoked()
            except Exception as exc:
                logger.warning("revocation check failed: %s", exc)

    async def close_revoked(self) -> int:
        """Hold every live connection to what its credential allows now: a credential
        that is gone (token deleted, service token revoked, user deactivated, session
        logged out) closes the connection (1008); a subscription that is no longer
        allowed (grant removed or narrowed, signed token expired) ends with a FORBIDDEN
        error naming the channel, and the connection stays open. Returns the closes."""
        # Only the connections open before the queries: one that opened meanwhile holds
        # a credential they did not look at, and was checked at its handshake anyway.
        checked = list(self.connections.values())
        credentials = {c.principal.credential for c in checked if c.principal.credential}
        # One round of queries for the whole node, whatever its connection count.
        fresh = await _principals_refresh(credentials) if credentials else {}
        now = time.time()
        closed = 0
        for connection in checked:
            credential = connection.principal.credential
            if not connection.is_open:
                continue
            changed = False
            if credential is not None:
                principal = fresh.get(credential)
                if principal is None:
                    connection.close(CloseCode.POLICY)
                    closed += 1
                    continue
                changed = principal != connection.principal
                # Later publishes and subscribes are decided on the grants as they are now.
                connection.principal = principal
            # The decider's answers change only with the principal (or a token's clock):
            # most connections cost nothing more here.
            if connection.subscriptions and (changed or connection.token_expiry):
                await self._revoke_subscriptions(self, connection, now)
        return closed


def _anonymous_ip_key(connection: LiveConnection) -> str | None:
    """What ``PUSH_MAX_ANONYMOUS_CONNECTIONS_PER_IP`` counts under: an anonymous
    connection's address (as ``_ip_key``); others are not counted (None)."""
    return _ip_key(connection.ip) if connection.principal.kind == "anonymous" else None


def _ip_key(ip: str | None) -> str | None:
    """What ``PUSH_MAX_CONNECTIONS_PER_IP`` counts under: an IPv6 address's /64, as the
    address budgets, or a host could open its connections from as many addresses."""
    return address_block(ip) if ip else None


def address_budgets_from_settings() -> AddressBudgets:
    """This node's per-address budgets, as ``PUSH_ADDRESS_*`` set them."""
    settings = push_settings
    return AddressBudgets(
        handshakes=Budget(settings.ADDRESS_HANDSHAKE_BURST, settings.ADDRESS_HANDSHAKE_PER_SEC),
        frames=Budget(settings.ADDRESS_FRAME_BURST, settings.ADDRESS_FRAME_PER_SEC),
        subscribes=Budget(settings.ADDRESS_SUBSCRIBE_BURST, settings.ADDRESS_SUBSCRIBE_PER_SEC),
        rest=Budget(settings.ADDRESS_REST_BURST, settings.ADDRESS_REST_PER_SEC),
        history_bytes=Budget(
            settings.ADDRESS_HISTORY_BURST_BYTES, settings.ADDRESS_HISTORY_BYTES_PER_SEC
        ),
        frame_bytes=Budget(
            settings.ADDRESS_FRAME_BURST_BYTES, settings.ADDRESS_FRAME_BYTES_PER_SEC
        ),
        max_entries=settings.ADDRESS_BUDGETS_MAX,
    )


def _write_pipeline(on_committed: Callable[[ChannelMessage], None]) -> WritePipeline | None:
    """The node's group-commit writer, on PostgreSQL (SQLite, a file for development,
    is written through Django's connection on the database threads instead)."""
    if database.vendor != "postgresql":
        return None
    return WritePipeline(
        conninfo=pipeline_conninfo(database.get_connection_params()),
        on_committed=on_committed,
        window_secs=push_settings.IDEMPOTENCY_WINDOW_SECS,
        max_batch_messages=push_settings.WRITE_BATCH_MAX_MESSAGES,
        max_batch_bytes=push_settings.WRITE_BATCH_MAX_BYTES,
        max_queue_messages=push_settings.WRITE_QUEUE_MAX_MESSAGES,
        max_queue_bytes=push_settings.WRITE_QUEUE_MAX_BYTES,
        connect_timeout_secs=push_settings.WRITE_CONNECT_TIMEOUT_SECS,
        write_timeout_secs=push_settings.WRITE_TIMEOUT_SECS,
        prepared=push_settings.WRITE_PREPARED,
    )


# The running node of this process: the one handle every part reads (set when a node
# has started, cleared when it stops). ``push.services.runtime`` starts it.
_running: Node | None = None


def running_node() -> Node | None:
    """The node running in this process, if one has started (on whatever loop)."""
    return _running


def _paused(gap_secs: float) -> bool:
    """Whether a gap between two of this node's announcements (normally about
    ``PUSH_CLUSTER_ANNOUNCE_SECS``, at most a third of ``PUSH_NODE_DEAD_AFTER_SECS``)
    means it could not announce itself (it did not run, or Redis was out of reach):
    past half the age at which a node counts as dead."""
    return gap_secs > push_settings.NODE_DEAD_AFTER_SECS / 2


def tune_garbage_collector(*, gen0_threshold: int, freeze: bool) -> None:
    """Make the cyclic GC rare and keep start-up objects out of it.

    At thousands of connections the default gen-0 threshold (700) ran a collection
    every few hundred deliveries and doubled the cost of each; the fan-out path makes
    few cycles, so collecting rarely costs little memory. ``gc.freeze`` moves
    everything allocated during start-up (Django, the URLconf, models) to a permanent
    generation that no collection walks again.
    """
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    if freeze:
        gc.collect()
        gc.freeze()
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)


_collection_started = 0.0
# Labelled once: the hook runs wherever a collection starts, however little stack is left.
_GC_PAUSES = [metrics.GC_PAUSE_SECONDS.labels(str(generation)) for generation in range(3)]


def _time_collection(phase: str, info: dict[str, int]) -> None:
    """``gc.callbacks`` hook: each collection's pause, by generation (the GIL is held
    throughout, so it is the event loop's pause too)."""
    global _collection_started
    if phase == "start":
        _collection_started = time.perf_counter()
        return
    # Not contextlib.suppress: its __enter__ is one more Python call, which may be the
    # one over the limit.
    try:  # noqa: SIM105
        _GC_PAUSES[info["generation"]].observe(time.perf_counter() - _collection_started)
    except RecursionError:
        # A collection that starts deep in a recursion (a parser refusing a body nested
        # 100,000 deep) leaves the hook no stack to record on: that one goes uncounted,
        # instead of a traceback in the log ("Exception ignored in" the hook).
        pass
