"""Connection registry: every connection recorded in the database, written in batches.

Recording a connection must not cost a synchronous database write on the event loop
(10,000 clients connecting at once would queue 10,000 writes): opens and closes are
collected in memory and written every ``flush_secs`` in a few statements, on the
database threads. Subscription changes are written the same way: each connection
whose channels changed since the last flush gets one UPDATE (folded into its INSERT
when it opened in the same batch), never a write per ``subscribe``. Every
``heartbeat_secs`` the connections that sent anything since the previous stamp (a
heartbeat or any other frame, what ``last_seen`` tracks) get ``last_heartbeat``
stamped in one UPDATE; a silent connection keeps its older value, so the row says
when the node last heard from the client.

While the database is down the records wait in memory, at most ``max_buffered`` of
them; past that they are dropped (counted in ``push_registry_records_dropped_total``)
and, once a write goes through again, the node rewrites its live connections' rows
once and closes its rows that are open but no longer live, so the table is right
again. Closed rows are deleted ``PUSH_REGISTRY_CLOSED_RETENTION`` after their close
(``registry_trim_closed``, run by ``trim_history``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from django.db import transaction

from common import metrics
from common.db import db_call
from common.errors import CloseCode
from push.models import Connection
from push.storage.retention import delete_bounded

logger = logging.getLogger(__name__)

# Past this many unwritten records (the database has been down a while) the oldest
# are dropped: the registry is for operators; it must never exhaust a node's memory.
MAX_BUFFERED_RECORDS = 200_000
# Rows per statement: keeps each IN (...) list well under PostgreSQL's parameter limit.
WRITE_CHUNK = 1000


class RegisteredConnection(Protocol):
    """What the registry reads of a live connection (``push.cluster.live.RegisteredConnection``
    is one); read-only, so any connection whose fields are narrower types fits."""

    @property
    def connection_id(self) -> uuid.UUID: ...

    @property
    def last_seen(self) -> float: ...

    @property
    def opened_at(self) -> float: ...

    @property
    def subscriptions(self) -> Mapping[str, object]: ...

    @property
    def ip(self) -> str | None: ...

    @property
    def principal(self) -> Any: ...

    @property
    def codec(self) -> Any: ...

    @property
    def is_open(self) -> bool: ...


@dataclass(slots=True)
class ConnectionRecord:
    connection_id: uuid.UUID
    user_id: int | None
    ip: str | None
    wire_format: str
    connected_at: datetime
    disconnected_at: datetime | None = None
    close_code: int | None = None
    subscriptions: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Batch:
    """One flush's writes: opens, subscription changes, closes, heartbeat stamps."""

    opened: list[ConnectionRecord]
    closed: list[ConnectionRecord]
    subscriptions: dict[uuid.UUID, list[str]]
    heard_from: list[uuid.UUID]

    def __bool__(self) -> bool:
        return bool(self.opened or self.closed or self.subscriptions or self.heard_from)


def _chunks(ids: list[uuid.UUID]) -> list[list[uuid.UUID]]:
    return [ids[start : start + WRITE_CHUNK] for start in range(0, len(ids), WRITE_CHUNK)]


def _now() -> datetime:
    return datetime.now(tz=UTC)


def _write_batch(server_id: str, batch: Batch) -> None:
    with transaction.atomic():
        _insert_opened(server_id, batch.opened)
        _update_subscriptions(batch.subscriptions)
        _mark_closed(batch.closed)
        now = _now()
        for ids in _chunks(batch.heard_from):
            Connection.objects.filter(connection_id__in=ids, disconnected_at__isnull=True).update(
                last_heartbeat=now
            )


def _update_subscriptions(changed: dict[uuid.UUID, list[str]]) -> None:
    """One UPDATE per distinct channel list, not per connection: thousands of clients
    that subscribe to the same channels cost a statement per chunk of them."""
    by_channels: dict[tuple[str, ...], list[uuid.UUID]] = {}
    for connection_id, channels in changed.items():
        by_channels.setdefault(tuple(channels), []).append(connection_id)
    for channel_list, ids in by_channels.items():
        for chunk in _chunks(ids):
            Connection.objects.filter(connection_id__in=chunk, disconnected_at__isnull=True).update(
                subscriptions=list(channel_list)
            )


def _insert_opened(server_id: str, opened: list[ConnectionRecord]) -> None:
    if not opened:
        return
    Connection.objects.bulk_create(
        [
            Connection(
                connection_id=r.connection_id,
                user_id=r.user_id,
                ip=r.ip,
                server_id=server_id,
                wire_format=r.wire_format,
                connected_at=r.connected_at,
                last_heartbeat=r.connected_at,
                disconnected_at=r.disconnected_at,
                close_code=r.close_code,
                subscriptions=r.subscriptions,
            )
            for r in opened
        ],
        ignore_conflicts=True,
        batch_size=WRITE_CHUNK,
    )


def _mark_closed(closed: list[ConnectionRecord]) -> None:
    # A closed connection holds no channel: its subscriptions are cleared with the close.
    by_code: dict[int | None, list[uuid.UUID]] = {}
    for record in closed:
        by_code.setdefault(record.close_code, []).append(record.connection_id)
    now = _now()
    for close_code, ids in by_code.items():
        for chunk in _chunks(ids):
            Connection.objects.filter(connection_id__in=chunk, disconnected_at__isnull=True).update(
                disconnected_at=now, close_code=close_code, subscriptions=[]
            )


def _rewrite_live(server_id: str, live: list[ConnectionRecord]) -> None:
    """Make the table say what the node holds after records were dropped, or after
    another node took it for dead: an open row for every live connection with its
    channels, and no open row for one that is not."""
    with transaction.atomic():
        _insert_opened(server_id, live)
        for chunk in _chunks([r.connection_id for r in live]):
            Connection.objects.filter(
                connection_id__in=chunk, disconnected_at__isnull=False
            ).update(disconnected_at=None, close_code=None)
        _update_subscriptions({r.connection_id: r.subscriptions for r in live})
        live_ids = {r.connection_id for r in live}
        open_ids = Connection.objects.filter(
            server_id=server_id, disconnected_at__isnull=True
        ).values_list("connection_id", flat=True)
        gone = [ConnectionRecord(i, None, None, "", _now()) for i in open_ids if i not in live_ids]
        _mark_closed(gone)


def registry_trim_closed(retention_secs: int) -> int:
    """Delete the rows of connections closed more than ``retention_secs`` ago; returns
    how many. Without it every connection ever made stays in the table."""
    cutoff = _now() - timedelta(seconds=retention_secs)
    return delete_bounded(Connection.objects.filter(disconnected_at__lt=cutoff))


@dataclass(frozen=True)
class ClosedConnection:
    """A connection ``close_node_connections`` marked closed, as its row had it."""

    connection_id: uuid.UUID
    connected_at: datetime
    subscriptions: list[str]


def close_node_connections(server_id: str, close_code: int) -> list[ClosedConnection]:
    """Mark every still-open connection of ``server_id`` closed; returns them. Two nodes
    reaping one dead node at once each get their own (the rows are locked, and the
    second's reading of them sees them closed)."""
    still_open = Connection.objects.filter(server_id=server_id, disconnected_at__isnull=True)
    with transaction.atomic():
        rows = list(
            still_open.select_for_update().values_list(
                "connection_id", "connected_at", "subscriptions"
            )
        )
        still_open.update(disconnected_at=_now(), close_code=close_code, subscriptions=[])
    return [ClosedConnection(i, at, list(subs or [])) for i, at, subs in rows]


_write_batch_async = db_call(_write_batch)
_rewrite_live_async = db_call(_rewrite_live)
_close_all_async = db_call(close_node_connections)


class ConnectionRegistry:
    def __init__(
        self,
        server_id: str,
        *,
        flush_secs: float,
        heartbeat_secs: float,
        live: Mapping[uuid.UUID, RegisteredConnection],
        max_buffered: int = MAX_BUFFERED_RECORDS,
        on_previous_run_closed: Callable[[list[ClosedConnection]], None] | None = None,
    ) -> None:
        self.server_id = server_id
        # Told of the rows a previous run of this node left open, once they are closed
        # (``_close_previous_run``); None once that is done.
        self._previous_run_closed = on_previous_run_closed
        self.max_buffered = max_buffered
        # Records were dropped: rewrite the live rows once the database is back.
        self._rewrite_due = False
        self.flush_secs = flush_secs
        self.heartbeat_secs = heartbeat_secs
        # The node's live connections, read when heartbeats are stamped.
        self._live = live
        self._opened: dict[uuid.UUID, ConnectionRecord] = {}
        self._closed: list[ConnectionRecord] = []
        self._changed: dict[uuid.UUID, RegisteredConnection] = {}
        self._last_touch = time.monotonic()

    def _full(self) -> bool:
        return len(self._opened) + len(self._closed) >= self.max_buffered

    def _dropped(self, count: int = 1) -> None:
        if not self._rewrite_due:
            logger.warning("connection registry backlog full; records are dropped")
        metrics.REGISTRY_RECORDS_DROPPED.inc(count)
        self._rewrite_due = True

    def rewrite_soon(self) -> None:
        """Rewrite the live rows with the next flush: another node marked them closed."""
        self._rewrite_due = True

    def opened(self, record: ConnectionRecord) -> None:
        if self._full():
            self._dropped()
            return
        self._opened[record.connection_id] = record

    def subscriptions_changed(self, connection: RegisteredConnection) -> None:
        """Write ``connection``'s channels with the next batch (once, however many
        subscribes and unsubscribes happen before it)."""
        self._changed[connection.connection_id] = connection

    def closed(self, connection_id: uuid.UUID, close_code: int | None) -> None:
        self._changed.pop(connection_id, None)
        record = self._opened.get(connection_id)
        if record is not None:
            # Opened and closed within one batch: write it once, already closed.
            record.disconnected_at = _now()
            record.close_code = close_code
            return
        if self._full():
            self._dropped()
            return
        self._closed.append(
            ConnectionRecord(connection_id, None, None, "", _now(), close_code=close_code)
        )

    def _take_batch(
        self, touch_since: float | None
    ) -> tuple[Batch, dict[uuid.UUID, RegisteredConnection]]:
        opened, self._opened = self._opened, {}
        closed, self._closed = self._closed, []
        changed, self._changed = self._changed, {}
        subscriptions: dict[uuid.UUID, list[str]] = {}
        for connection_id, connection in changed.items():
            channels = list(connection.subscriptions)
            record = opened.get(connection_id)
            if record is not None:
                record.subscriptions = channels
            elif connection.is_open:
                subscriptions[connection_id] = channels
        heard_from = [] if touch_since is None else self._heard_from(touch_since)
        batch = Batch(list(opened.values()), closed, subscriptions, heard_from)
        return batch, changed

    def _heard_from(self, since: float) -> list[uuid.UUID]:
        """Connections that sent a frame since ``since`` (their open is not a frame)."""
        return [
            c.connection_id
            for c in self._live.values()
            if c.last_seen >= since and c.last_seen > c.opened_at
        ]

    async def flush(self) -> None:
        started = time.monotonic()
        due = started - self._last_touch >= self.heartbeat_secs
        batch, changed = self._take_batch(self._last_touch if due else None)
        if not batch and not self._rewrite_due and self._previous_run_closed is None:
            if due:
                self._last_touch = started
            return
        try:
            if self._previous_run_closed is not None:
                await self._close_previous_run(self._previous_run_closed)
            if batch:
                await _write_batch_async(self.server_id, batch)
            if self._rewrite_due:
                await self._rewrite_live()
        except Exception as exc:
            logger.warning("connection registry write failed, will retry: %s", exc)
            self._put_back(batch, changed)
            return
        if due:
            self._last_touch = started

    async def _close_previous_run(self, announce: Callable[[list[ClosedConnection]], None]) -> None:
        """Close the rows a previous process of this node's name left open, before this
        one writes its first: killed and started again (a fixed ``NODE_ID``) before
        another node took it for dead, it is never taken for dead, so nobody else
        ever closes them. Retried with every flush until the database answers."""
        closed = await _close_all_async(self.server_id, CloseCode.SERVER_ERROR)
        self._previous_run_closed = None
        if closed:
            logger.warning(
                "%d connections of a previous run of node %s marked closed",
                len(closed),
                self.server_id,
            )
            announce(closed)

    async def _rewrite_live(self) -> None:
        now = time.monotonic()
        live = [
            ConnectionRecord(
                connection_id=c.connection_id,
                user_id=c.principal.user_id,
                ip=c.ip,
                wire_format=c.codec.name,
                connected_at=_now() - timedelta(seconds=now - c.opened_at),
                subscriptions=list(c.subscriptions),
            )
            for c in list(self._live.values())
            if c.is_open
        ]
        await _rewrite_live_async(self.server_id, live)
        self._rewrite_due = False
        logger.info("connection registry rewritten: %d live connections", len(live))

    def _put_back(self, batch: Batch, changed: dict[uuid.UUID, RegisteredConnection]) -> None:
        for record in batch.opened:
            self._opened.setdefault(record.connection_id, record)
        self._closed[:0] = batch.closed
        excess = len(self._opened) + len(self._closed) - self.max_buffered
        if excess > 0:
            # The oldest go first, closes before opens: the rewrite that follows the
            # outage writes every live connection's row and closes the others.
            closes = min(excess, len(self._closed))
            del self._closed[:closes]
            for connection_id in list(self._opened)[: excess - closes]:
                del self._opened[connection_id]
            self._dropped(excess)
        for connection_id, connection in changed.items():
            if connection.is_open:
                self._changed.setdefault(connection_id, connection)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_secs)
            await self.flush()

    async def close_all(self, close_code: int) -> None:
        await self.flush()
        await _close_all_async(self.server_id, close_code)
