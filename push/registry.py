"""Connection registry: every connection recorded in the database, written in batches.

Recording a connection must not cost a synchronous database write on the event loop
(10,000 clients connecting at once would queue 10,000 writes): opens and closes are
collected in memory and written every ``flush_secs`` in a few statements, on the
database threads. Heartbeats refresh ``last_heartbeat`` for all of the node's live
connections in one UPDATE, not one write per heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from push.db import db_call
from push.models import Connection

logger = logging.getLogger(__name__)

# Past this many unwritten records (the database has been down a while) the oldest
# are dropped: the registry is for operators; it must never exhaust a node's memory.
MAX_BUFFERED_RECORDS = 200_000
HEARTBEAT_TOUCH_SECS = 10.0


@dataclass(slots=True)
class ConnectionRecord:
    connection_id: uuid.UUID
    user_id: int | None
    ip: str | None
    wire_format: str
    connected_at: datetime
    disconnected_at: datetime | None = None
    close_code: int | None = None


def _now() -> datetime:
    return datetime.now(tz=UTC)


def _write_batch(
    server_id: str,
    opened: list[ConnectionRecord],
    closed: list[ConnectionRecord],
    touch_heartbeats: bool,
) -> None:
    if opened:
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
                )
                for r in opened
            ],
            ignore_conflicts=True,
            batch_size=1000,
        )
    by_code: dict[int | None, list[uuid.UUID]] = {}
    for record in closed:
        by_code.setdefault(record.close_code, []).append(record.connection_id)
    now = _now()
    for close_code, ids in by_code.items():
        for start in range(0, len(ids), 1000):
            Connection.objects.filter(
                connection_id__in=ids[start : start + 1000], disconnected_at__isnull=True
            ).update(disconnected_at=now, close_code=close_code)
    if touch_heartbeats:
        Connection.objects.filter(server_id=server_id, disconnected_at__isnull=True).update(
            last_heartbeat=now
        )


def close_node_connections(server_id: str, close_code: int) -> int:
    """Mark every still-open connection of ``server_id`` closed; returns how many."""
    return Connection.objects.filter(server_id=server_id, disconnected_at__isnull=True).update(
        disconnected_at=_now(), close_code=close_code
    )


_write_batch_async = db_call(_write_batch)
_close_all_async = db_call(close_node_connections)


class ConnectionRegistry:
    def __init__(self, server_id: str, *, flush_secs: float) -> None:
        self.server_id = server_id
        self.flush_secs = flush_secs
        self._opened: dict[uuid.UUID, ConnectionRecord] = {}
        self._closed: list[ConnectionRecord] = []
        self._last_touch = time.monotonic()

    def opened(self, record: ConnectionRecord) -> None:
        if len(self._opened) + len(self._closed) >= MAX_BUFFERED_RECORDS:
            logger.warning("connection registry backlog full; a record is not written")
            return
        self._opened[record.connection_id] = record

    def closed(self, connection_id: uuid.UUID, close_code: int | None) -> None:
        record = self._opened.get(connection_id)
        if record is not None:
            # Opened and closed within one batch: write it once, already closed.
            record.disconnected_at = _now()
            record.close_code = close_code
            return
        self._closed.append(
            ConnectionRecord(connection_id, None, None, "", _now(), close_code=close_code)
        )

    async def flush(self) -> None:
        opened, self._opened = list(self._opened.values()), {}
        closed, self._closed = self._closed, []
        touch = time.monotonic() - self._last_touch >= HEARTBEAT_TOUCH_SECS
        if not (opened or closed or touch):
            return
        try:
            await _write_batch_async(self.server_id, opened, closed, touch)
        except Exception as exc:
            logger.warning("connection registry write failed, will retry: %s", exc)
            for record in opened:
                self._opened.setdefault(record.connection_id, record)
            self._closed[:0] = closed
            return
        if touch:
            self._last_touch = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_secs)
            await self.flush()

    async def close_all(self, close_code: int) -> None:
        await self.flush()
        await _close_all_async(self.server_id, close_code)
