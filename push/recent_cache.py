"""Each channel's last messages in Redis: a bounded Stream per channel.

A node keeps a channel's recent messages in memory while it serves that channel; this
cache is for the moment it does not yet: after a restart or a deploy, when thousands
of clients come back at once and resume. The first subscribe to a channel on a node
reads the channel's stream (one Redis round trip) instead of PostgreSQL, and later
resumes are served from the node's memory.

PostgreSQL stays the source of truth. The cache only ever holds committed messages
(appended after the commit, in batches, off the request path), and a read trusts only
the contiguous run of seqs that ends at the newest entry. When Redis lost the stream
(it keeps nothing on disk), the read finds nothing and the node reads PostgreSQL.
When the newest messages are missing from the stream (an append failed), the hub sees
the channel move past it and fills the gap from PostgreSQL, as for any lost broadcast.
Streams are trimmed to ``PUSH_RECENT_CACHE_SIZE`` entries (or fewer when retention
keeps fewer) and expire after ``PUSH_RECENT_CACHE_TTL`` without a publish.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from push import metrics
from push.message import ChannelMessage
from push.retention import retention_policy

logger = logging.getLogger(__name__)

# Appends waiting while Redis is away; past this the oldest are dropped (the cache
# then misses them and readers fall back to PostgreSQL).
MAX_QUEUED_APPENDS = 10_000


def recent_key(prefix: str, channel: str) -> str:
    return f"{prefix}:recent:{channel}"


def stream_length(channel: str, size: int) -> int:
    max_messages = retention_policy(channel).max_messages
    return size if max_messages is None else min(size, max_messages)


def stream_fields(message: ChannelMessage) -> dict[str, str]:
    return {
        "s": str(message.seq),
        "m": message.message_id,
        "d": message.data_json,
        "t": repr(message.timestamp),
    }


def message_from_entry(channel: str, fields: dict[bytes, bytes]) -> ChannelMessage:
    return ChannelMessage(
        channel=channel,
        seq=int(fields[b"s"]),
        message_id=fields[b"m"].decode(),
        data_json=fields[b"d"].decode(),
        timestamp=float(fields[b"t"]),
    )


def contiguous_tail(messages: list[ChannelMessage]) -> list[ChannelMessage]:
    """The run of consecutive seqs that ends at the newest message, oldest first.

    Nodes append concurrently, so entries may sit out of seq order in the stream, and
    an append may have failed: only a gapless run ending at the top can be trusted."""
    by_seq = {m.seq: m for m in messages}
    if not by_seq:
        return []
    seq = max(by_seq)
    tail = []
    while seq in by_seq:
        tail.append(by_seq[seq])
        seq -= 1
    tail.reverse()
    return tail


def add_to_pipeline(
    pipe: Any, prefix: str, messages: list[ChannelMessage], size: int, ttl: int
) -> None:
    """Append ``messages`` to their channels' streams; one EXPIRE per channel, since a
    write pipeline's batch brings many messages of few channels."""
    lengths: dict[str, int] = {}
    for message in messages:
        channel = message.channel
        if channel not in lengths:
            lengths[channel] = stream_length(channel, size)
        pipe.xadd(
            recent_key(prefix, channel),
            stream_fields(message),  # type: ignore[arg-type]
            maxlen=lengths[channel],
            approximate=True,
        )
    for channel in lengths:
        pipe.expire(recent_key(prefix, channel), ttl)


class RecentCache:
    """A node's side of the cache: appends in batches, reads on channel join."""

    def __init__(self, redis: Any, prefix: str, *, size: int, ttl_secs: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.size = size
        self.ttl_secs = ttl_secs
        # Bounded: while Redis is away the oldest appends give way (see above).
        self._queue: collections.deque[ChannelMessage] = collections.deque(
            maxlen=MAX_QUEUED_APPENDS
        )
        self._wakeup = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.redis is not None and self.size > 0

    def append_soon(self, message: ChannelMessage) -> None:
        if not self.enabled:
            return
        self._queue.append(message)
        self._wakeup.set()

    async def run(self) -> None:
        """Write queued messages, one pipelined round trip per batch."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch = list(self._queue)
            self._queue.clear()
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("recent-history cache append failed: %s", exc)

    async def _write(self, batch: list[ChannelMessage]) -> None:
        if not batch:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            add_to_pipeline(pipe, self.prefix, batch, self.size, self.ttl_secs)
            await pipe.execute()

    async def read(self, channel: str, count: int) -> list[ChannelMessage]:
        """The channel's cached recent messages (at most ``count``), or [] on a miss."""
        if not self.enabled or count <= 0:
            return []
        entries = await self.redis.xrevrange(
            recent_key(self.prefix, channel), count=min(count, self.size)
        )
        messages = contiguous_tail([message_from_entry(channel, f) for _, f in entries])
        metrics.RECENT_CACHE_READS.labels("hit" if messages else "miss").inc()
        return messages
