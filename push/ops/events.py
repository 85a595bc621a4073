"""Lifecycle events: connect, disconnect, subscribe, unsubscribe, a channel becoming
occupied or vacated anywhere in the cluster, a presence member joining or leaving (once
per user, cluster-wide), and the Pusher endpoint's client events and cache misses.

Nodes append events to a Redis Stream (``<prefix>:events``), in batches, off the
connection path; ``manage.py run_event_worker`` processes them with a consumer group
(several workers share the work) and runs the registered handlers (the webhook sender
is one). Occupancy is cluster-wide: a channel is occupied when the first node gets a
subscriber for it and vacated when the last node lets it go, decided in one Lua script
so two nodes never both announce it. A node's occupancy changes go out with its events,
in the same batches and in order: thousands of channels emptied at once (their linger
ending together) once each took a Redis connection of their own, opened at once.
A batch is written at most once: a write whose answer never came (the node stopped
meanwhile, or Redis was slow) is tried again, and what of it Redis had already written
is not written twice (``_WRITE``). Events need Redis; without it they are not kept.

Presence members are the exception: ``member_added`` / ``member_removed`` are written by
the presence scripts that decide them (``push.cluster.presence``, with
``MEMBER_EVENT_LUA``), so they enter the stream in the order Redis decided them, whatever
node made them. Written by a node's batch, a user's join on one node could reach the
stream after its leave on another (the first node's batch being later), and a receiver
took the user for present for good.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any, NamedTuple

from common import metrics

logger = logging.getLogger(__name__)

CONNECT = "connect"
DISCONNECT = "disconnect"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
CHANNEL_OCCUPIED = "channel_occupied"
CHANNEL_VACATED = "channel_vacated"
# channel, user_id (Pusher's string form): announced once per cluster-wide join or leave.
MEMBER_ADDED = "member_added"
MEMBER_REMOVED = "member_removed"
# From the Pusher endpoint: channel, event, data, socket_id (user_id on presence channels).
CLIENT_EVENT = "client_event"
# From the Pusher endpoint: channel, a cache channel subscribed to with nothing cached.
CACHE_MISS = "cache_miss"

FLUSH_SECS = 0.1
# Unwritten events kept while Redis is away; past either bound the oldest are dropped
# (counted). In bytes too: a Pusher client event carries up to 10 KB of data, so the
# count alone let a node hold about 1 GB of them while Redis refused its writes.
MAX_BUFFERED_EVENTS = 100_000
MAX_BUFFERED_BYTES = 32 * 1_048_576
# What an event costs in the buffer besides its data (its fields, dict and strings).
_EVENT_BYTES = 400
# The stream in Redis is bounded in bytes as well as in entries (PUSH_EVENT_STREAM_MAX_BYTES):
# a million Pusher client events of 10 KB each were 10 GB of Redis within the count alone.
# Every this often a node asks Redis what the stream takes (MEMORY USAGE, sampled) and
# trims it to a length that fits, with this much room left.
STREAM_BYTES_CHECK_SECS = 5.0
STREAM_BYTES_HEADROOM = 0.9

# A node's batch, written at once: each of its entries, unless this run of the node
# wrote it already (numbered in emit order, the last written kept in a mark). A batch
# whose answer was lost (the node stopping, Redis slow) is written again: each
# entry once, however many tries reached Redis and in whatever order, and none of them
# half (a pipeline of one command an entry, cut midway, wrote the first again after
# the last: a member added again after it left).
# Each entry names the entry before it of the same connection (or channel), ``after``,
# kept in ``<stream>:last:<connection or channel>``: a worker holds an entry back while
# the one before it is in another worker's hand (``push.ops.event_worker``).
# KEYS: stream, this run's mark, then per entry its connection's (or channel's) last
# key when it has one, and per occupancy change the channel's node set and the node's
# channel index. ARGV: maxlen, the mark's lifetime (ms), the last keys' lifetime (ms),
# the first entry's number, then per entry its op (EVENT, OCCUPY, VACATE or HOLD),
# node, channel, whether it has a last key ("1" or "") and event JSON. An occupancy
# change is announced when the channel went from no node to one (OCCUPY) or from one
# to none (VACATE), decided here, so two nodes never both announce it; HOLD records a
# channel this node holds again in sets Redis lost (restarted without its data),
# announcing nothing: it was announced when it was. Returns the number of the last
# entry written.
_WRITE = """
local written = tonumber(redis.call('GET', KEYS[2]) or '0')
local number = tonumber(ARGV[4]) - 1
local k = 3
for i = 5, #ARGV, 5 do
  number = number + 1
  local op, node, channel, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 4]
  local last = nil
  if ARGV[i + 3] ~= '' then
    last = KEYS[k]
    k = k + 1
  end
  local nodes, index = KEYS[k], KEYS[k + 1]
  if op ~= 'e' then k = k + 2 end
  if number > written then
    local announce = op == 'e'
    if op == 'o' and redis.call('SADD', nodes, node) == 1 then
      redis.call('SADD', index, channel)
      announce = redis.call('SCARD', nodes) == 1
    elseif op == 'v' and redis.call('SREM', nodes, node) == 1 then
      redis.call('SREM', index, channel)
      announce = redis.call('SCARD', nodes) == 0
    elseif op == 'h' then
      redis.call('SADD', nodes, node)
      redis.call('SADD', index, channel)
    end
    if announce then
      local before = last and redis.call('GET', last)
      local id
      if before then
        id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', entry,
          'after', before)
      else
        id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', entry)
      end
      if last then redis.call('SET', last, id, 'PX', ARGV[3]) end
    end
  end
end
if number > written then
  redis.call('SET', KEYS[2], number, 'PX', ARGV[2])
  return number
end
return written
"""
EVENT, OCCUPY, VACATE, HOLD = "e", "o", "v", "h"
# A Lua function for the presence scripts: append a member event to the stream as
# ``_WRITE`` appends an entry (its ``after`` the channel's last entry), at once. ``head``
# is the event's JSON without its user id and closing brace (``member_event_head``);
# ``user`` the member's user field (a JSON string or integer, ``accounts``' member ids),
# whose Pusher form (a string) the event carries, as ``pusher_user_id`` makes it.
MEMBER_EVENT_LUA = """
local function write_member_event(stream, last, head, user, maxlen, kept_ms)
  if string.sub(user, 1, 1) ~= '"' then user = '"' .. user .. '"' end
  local entry = head .. ', "user_id": ' .. user .. '}'
  local before = redis.call('GET', last)
  local id
  if before then
    id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', entry, 'after', before)
  else
    id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', entry)
  end
  redis.call('SET', last, id, 'PX', kept_ms)
end
"""
# Entries in one run of ``_WRITE``: a script holds Redis while it runs, and 100,000
# events kept while Redis was away would hold it for a second.
WRITE_CHUNK = 500
# How long a run's mark outlives its last write: longer than a batch waits for its
# next try (Redis away, the node partitioned from it). A node's restart is a new run.
WRITTEN_MARK_SECS = 86_400
# How long an entry stays the ``after`` of its connection's (or channel's) next: as long
# as a worker may have it in hand (a slow webhook's attempts, ~30 s) with the workers
# that far behind. One key per connection and channel active meanwhile: at a thousand
# new connections a second, ten minutes of them are ~100 MB of Redis.
AFTER_KEPT_SECS = 600


def _entry_bytes(entry: dict[str, Any] | OccupancyChange) -> int:
    """About what ``entry`` holds in the buffer: its data (a client event's, or an
    occupancy change's event JSON) and a fixed share for the rest."""
    data = entry.event_json if isinstance(entry, OccupancyChange) else entry.get("data")
    return _EVENT_BYTES + (len(data) if isinstance(data, str) else 0)


def event_about(entry: dict[str, Any]) -> str | None:
    """The connection (or channel) whose events ``entry`` must follow in order."""
    about = entry.get("connection_id") or entry.get("channel")
    return str(about) if about else None


def _channel_of(entry: dict[str, Any] | OccupancyChange) -> str | None:
    """The channel whose events ``entry`` follows in order, if it is a channel's (not a
    connection's)."""
    if isinstance(entry, OccupancyChange):
        return entry.channel
    if entry.get("connection_id"):
        return None
    channel = entry.get("channel")
    return str(channel) if channel else None


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "type": kind, "timestamp": time.time(), **fields}


class OccupancyChange(NamedTuple):
    """A channel this node (or a dead ``node``) took up, let go of or holds again
    (OCCUPY, VACATE or HOLD), waiting in the event buffer for its batch (``_WRITE``)."""

    op: str
    node: str
    channel: str
    event_json: str


class EventLog:
    """A node's side: buffer events and append them to the stream in batches."""

    def __init__(
        self,
        redis: Any,
        prefix: str,
        server_id: str,
        *,
        maxlen: int,
        max_stream_bytes: int | None = None,
        max_buffered: int = MAX_BUFFERED_EVENTS,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    ) -> None:
        self.redis = redis
        self.server_id = server_id
        self.stream = f"{prefix}:events"
        self.prefix = prefix
        self.maxlen = maxlen
        self.max_stream_bytes = max_stream_bytes
        self.max_buffered = max_buffered
        self.max_buffered_bytes = max_buffered_bytes
        # Bounded (``_drop_oldest``): appending to a full buffer drops the oldest.
        self._buffer: deque[dict[str, Any] | OccupancyChange] = deque()
        self._buffered_bytes = 0
        # Channel -> how many of its events are buffered or being written: a member event
        # of that channel, written by a presence script, waits for them (``write_before``).
        self._unwritten_of: Counter[str] = Counter()
        # The channels this node holds, as its occupancy sets should say (``repair``).
        self._held: set[str] = set()
        self._flushing = asyncio.Lock()
        # This run's entries are numbered as emitted, the newest ``_last_number``: the
        # buffer holds a run of them that ends there (the oldest go first; an unwritten
        # batch goes back before the newer ones), so its first is known by its length.
        # Redis keeps the last written under ``_mark``, so none is written twice.
        self._last_number = 0
        self._mark = f"{prefix}:events:written:{uuid.uuid4().hex}"
        if redis is not None:
            self._write_script = redis.register_script(_WRITE)

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    def emit(self, kind: str, **fields: Any) -> None:
        """Append an event of this node's (or of the ``node`` named in ``fields``)."""
        if self.redis is None:
            return
        self._append(event(kind, **{"node": self.server_id, **fields}))

    def _append(self, entry: dict[str, Any] | OccupancyChange) -> None:
        self._last_number += 1
        self._buffer.append(entry)
        self._buffered_bytes += _entry_bytes(entry)
        self._count_unwritten([entry], 1)
        self._drop_oldest()

    def _count_unwritten(self, entries: Iterable[dict[str, Any] | OccupancyChange], n: int) -> None:
        unwritten = self._unwritten_of
        for entry in entries:
            channel = _channel_of(entry)
            if channel is not None:
                unwritten[channel] += n
                if unwritten[channel] <= 0:
                    del unwritten[channel]

    def _drop_oldest(self) -> None:
        """Drop the oldest events past either bound (counted)."""
        buffer = self._buffer
        dropped = 0
        while len(buffer) > 1 and (
            len(buffer) > self.max_buffered or self._buffered_bytes > self.max_buffered_bytes
        ):
            oldest = buffer.popleft()
            self._buffered_bytes -= _entry_bytes(oldest)
            self._count_unwritten([oldest], -1)
            dropped += 1
        if dropped:
            metrics.EVENTS_DROPPED.inc(dropped)

    async def flush(self) -> None:
        """Write what is buffered. One batch is in flight at a time, so a flush waits for
        the one under way (the loop's, when the node stops) and batches land in order."""
        async with self._flushing:
            await self._write_buffered()

    async def _write_buffered(self) -> None:
        if not self._buffer or self.redis is None:
            return
        batch, self._buffer = self._buffer, deque()
        batch_bytes, self._buffered_bytes = self._buffered_bytes, 0
        first = self._last_number - len(batch) + 1
        try:
            await self._write(list(batch), first)
            self._count_unwritten(batch, -1)
        except BaseException as exc:
            # Cancelled too (a node stopping cancels its loops): the batch goes back, for
            # the stop's last flush, or it was lost with its write under way. What of it
            # reached Redis meanwhile is not written again (``_WRITE``).
            self._restore(batch, batch_bytes)
            if not isinstance(exc, Exception):
                raise
            logger.warning("could not append %d events: %s", len(batch), exc)

    async def write_before(self, channel: str) -> None:
        """Write what this node emitted of ``channel`` so far (its ``channel_occupied``
        first of all), before a presence script writes a member event of it: one
        flush, only when there is any. A flush that fails is logged and the member
        event goes first all the same (Redis is most likely away for that script too)."""
        if self._unwritten_of.get(channel):
            await self.flush()

    def member_event_keys(self, channel: str) -> list[str]:
        """The keys ``MEMBER_EVENT_LUA`` writes: the stream, the channel's last entry."""
        return [self.stream, f"{self.stream}:last:{channel}"]

    def member_event_args(self, kind: str, channel: str) -> list[str | int]:
        """``MEMBER_EVENT_LUA``'s arguments but the user: the event made by this node
        now, without its user id (the script has it), the stream's bound and how long
        the entry stays its channel's ``after``."""
        head = json.dumps(event(kind, node=self.server_id, channel=channel))
        return [head[:-1], self.maxlen, AFTER_KEPT_SECS * 1000]

    async def _write(self, entries: list[dict[str, Any] | OccupancyChange], first: int) -> None:
        """Write ``entries``, the first numbered ``first``, a chunk at a time, in order."""
        for start in range(0, len(entries), WRITE_CHUNK):
            chunk = entries[start : start + WRITE_CHUNK]
            keys = [self.stream, self._mark]
            args: list[Any] = [
                self.maxlen,
                WRITTEN_MARK_SECS * 1000,
                AFTER_KEPT_SECS * 1000,
                first + start,
            ]
            for entry in chunk:
                if isinstance(entry, OccupancyChange):
                    about: str | None = entry.channel
                    op, node, channel, data = entry.op, entry.node, entry.channel, entry.event_json
                else:
                    about = event_about(entry)
                    op, node, channel, data = EVENT, "", "", json.dumps(entry)
                if about is not None:
                    keys.append(f"{self.stream}:last:{about}")
                if op != EVENT:
                    keys += self._occupancy_keys(channel, node)
                args += [op, node, channel, "1" if about is not None else "", data]
            await self._write_script(keys=keys, args=args)

    def _restore(self, batch: deque[dict[str, Any] | OccupancyChange], nbytes: int) -> None:
        """Put an unwritten batch (of ``nbytes``) back before what was emitted since,
        keeping the newest within the bounds (the oldest are dropped, counted)."""
        batch.extend(self._buffer)
        self._buffer = batch
        self._buffered_bytes += nbytes
        self._drop_oldest()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + STREAM_BYTES_CHECK_SECS
        while True:
            await asyncio.sleep(FLUSH_SECS)
            await self.flush()
            if loop.time() >= next_check:
                next_check = loop.time() + STREAM_BYTES_CHECK_SECS
                try:
                    await self.trim_to_bytes()
                except Exception as exc:  # Redis away: the next check tries again
                    logger.warning("could not check the event stream's size: %s", exc)

    async def trim_to_bytes(self) -> int:
        """Trim the stream to what fits in ``max_stream_bytes`` (the oldest go, as with
        its count bound); returns how many entries went."""
        if self.redis is None or self.max_stream_bytes is None:
            return 0
        used = await self.redis.memory_usage(self.stream, samples=5)
        if not used or used <= self.max_stream_bytes:
            return 0
        length = await self.redis.xlen(self.stream)
        keep = max(int(length * self.max_stream_bytes / used * STREAM_BYTES_HEADROOM), 1)
        trimmed: int = await self.redis.xtrim(self.stream, maxlen=keep, approximate=True)
        if trimmed:
            logger.warning(
                "event stream over PUSH_EVENT_STREAM_MAX_BYTES (%d bytes): %d oldest "
                "events trimmed",
                used,
                trimmed,
            )
        return trimmed

    def _occupancy_keys(self, channel: str, server_id: str) -> list[str]:
        return [
            f"{self.prefix}:occupancy:{channel}",
            f"{self.prefix}:occupancy-node:{server_id}",
        ]

    def occupied(self, channel: str) -> None:
        """This node has a subscriber for ``channel`` now (written with the next batch,
        as an unwritten one is retried: the script counts each node once)."""
        if self.redis is None:
            return
        self._held.add(channel)
        self._change(OCCUPY, CHANNEL_OCCUPIED, channel, self.server_id)

    def vacated(self, channel: str, server_id: str | None = None) -> None:
        """This node (or a dead ``server_id``) no longer serves ``channel``."""
        if self.redis is None:
            return
        if server_id in (None, self.server_id):
            self._held.discard(channel)
        self._change(VACATE, CHANNEL_VACATED, channel, server_id or self.server_id)

    def _change(self, op: str, kind: str, channel: str, server_id: str) -> None:
        entry = json.dumps(event(kind, channel=channel, node=server_id))
        self._append(OccupancyChange(op, server_id, channel, entry))

    async def repair(self) -> None:
        """Make this node's occupancy sets say what it holds again where Redis lost them
        (restarted without its data, or reaped this node as dead): else the channel is
        announced occupied again when another node joins it, and vacated when that one
        leaves while this node still serves it, and never when this one leaves last.
        Queued behind the changes not yet written, so it never goes before them. One
        SCARD when nothing is wrong."""
        if self.redis is None:
            return
        index = f"{self.prefix}:occupancy-node:{self.server_id}"
        if await self.redis.scard(index) == len(self._held):
            return
        recorded = {
            c.decode() if isinstance(c, bytes) else c for c in await self.redis.smembers(index)
        }
        for channel in self._held - recorded:
            self._append(OccupancyChange(HOLD, self.server_id, channel, ""))
        for channel in recorded - self._held:
            self.vacated(channel)

    async def vacate_all_of(self, server_id: str) -> None:
        """Release every channel a dead node held (announcing those now empty)."""
        if self.redis is None:
            return
        index = f"{self.prefix}:occupancy-node:{server_id}"
        for channel in await self.redis.smembers(index):
            name = channel.decode() if isinstance(channel, bytes) else channel
            self.vacated(name, server_id)
