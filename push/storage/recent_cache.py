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
keeps fewer) and expire after ``PUSH_RECENT_CACHE_TTL`` without a publish (up to a
64th of it later: a node sets a stream's TTL a 64th longer, and sets it again only once
that much time has passed). Large messages trim the stream further, to about
``PUSH_RECENT_CACHE_MAX_BYTES`` of data: each append keeps as many entries as messages
of its size fit in that budget. A read takes at most that budget too (in small chunks,
newest first), so a channel of large messages costs neither Redis nor the node more
than the budget per channel.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Container, Iterable
from typing import Any

from common import metrics
from common.background import Wakeup
from common.conf import push_settings
from common.redis_client import HeldConnection, LuaScript, script_argument
from push.fanout.message import ChannelMessage, data_bytes
from push.storage.relay import CACHED_ENTRIES, RELAY_LUA, Relay
from push.storage.relay import current as relay_now
from push.storage.retention import retention_policy

logger = logging.getLogger(__name__)

# Appends waiting while Redis is away; past this the oldest are dropped (the cache
# then misses them and readers fall back to PostgreSQL).
MAX_QUEUED_APPENDS = 10_000
# Messages appended by one script call, at most (a write batch holds up to 1,000).
APPENDS_PER_CALL = 1000
# A node sets a stream's TTL again at most once per this part of the TTL, and as much
# longer (``RecentCache._fresh_streams``). Setting it on every append was an EXPIRE per
# stream per call: with batches of 8-40 messages over 64 channels, 0.8 of them per
# message, and 1.2-1.6 us of Redis' CPU each in the script.
TTL_REFRESH_PARTS = 64
# Streams whose TTL a node remembers having set lately, at most: past this it forgets
# them all, and sets their TTL again on their next append.
MAX_FRESH_STREAMS = 10_000
# Entries per XREVRANGE when reading: a read overshoots its byte budget by fewer than
# this many messages before it stops.
READ_CHUNK = 8


def recent_key(prefix: str, channel: str) -> str:
    return f"{prefix}:recent:{channel}"


def stream_length(channel: str, size: int) -> int:
    max_messages = retention_policy(channel).max_messages
    return size if max_messages is None else min(size, max_messages)


def message_from_entry(channel: str, fields: dict[bytes, bytes]) -> ChannelMessage:
    """A stream entry back as a message. An entry has one field, ``p``: the message's
    seq, timestamp, id and data, each after a space (the first three hold none: digits,
    a float's ``repr``, a UUID's text), so the data is cut out as it was stored. Nodes
    before it wrote four fields, ``s``, ``m``, ``d`` and ``t``, which a stream may still
    hold (Redis keeps them until trimmed, and a cluster upgrades node by node)."""
    packed = fields.get(b"p")
    if packed is None:
        return ChannelMessage(
            channel=channel,
            seq=int(fields[b"s"]),
            message_id=fields[b"m"].decode(),
            data_json=fields[b"d"].decode(),
            timestamp=float(fields[b"t"]),
        )
    return message_from_packed(channel, packed.decode())


def message_from_packed(channel: str, packed: str) -> ChannelMessage:
    """A message from its entry's one field (``message_from_entry``)."""
    seq, timestamp, message_id, data_json = packed.split(" ", 3)
    return ChannelMessage(
        channel=channel,
        seq=int(seq),
        message_id=message_id,
        data_json=data_json,
        timestamp=float(timestamp),
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


# Appends a batch of messages to their streams in one command: a pipeline of one XADD
# per message cost the node more than storing the batch in PostgreSQL (py-spy: a
# seventh of a node publishing over WebSocket, most of it redis-py building each
# command and reading each reply in Python). KEYS: the batch's streams, each once.
# ARGV[1]: the TTL; ARGV[2]: one array (``common.redis_client.script_argument``) of
# runs, each a stream's consecutive messages that trim alike and are relayed alike:
# the index of the stream in KEYS, the run's count of messages, its trimming ("~"
# approximate or "=" exact) and MAXLEN, 1 when the run is relayed (else 0), then one
# entry per message (``message_from_entry``). ARGV[4], when not empty: each stream's
# group and channel name, in one array, and ARGV[5] the relay's mark and kind: a
# relayed run's entries are published to the channel's group
# (``push.storage.relay``), so the other nodes have them without the broker.
# ARGV[3], when not empty:
# an array of 1 for each stream in KEYS whose TTL the caller set lately, 0 otherwise;
# such a stream gets no EXPIRE, unless it is gone (expired, or lost with Redis): its
# first XADD has NOMKSTREAM, and when that adds nothing the stream is made again and
# given its TTL, so no stream is ever left without one. Approximate trimming is asked
# once per run, with its last entry: it only drops whole stream nodes from the head
# while the rest keep MAXLEN, so the stream ends as if each entry had asked, and an XADD
# without it cost Redis 0.5-0.8 us less (measured in a script of 200 alike).
#
# One field per entry, and the stream and trimming once per run, not once per message:
# with batches of 8-40 messages of 64 bytes over 64 channels (a private Redis 7.0 per
# variant, batches interleaved), EVALSHA took 3.9 us of Redis' CPU per message against
# 4.2 with four fields and seven values per message, and building the arguments 1.2 us
# of the node's against 1.6.
APPEND_SCRIPT = LuaScript(
    """
local ttl = ARGV[1]
local runs = cmsgpack.unpack(ARGV[2])
local fresh = (ARGV[3] and ARGV[3] ~= '') and cmsgpack.unpack(ARGV[3]) or {}
local relay = (ARGV[4] and ARGV[4] ~= '') and cmsgpack.unpack(ARGV[4]) or nil
local relay_prefix = ARGV[5]
"""
    + RELAY_LUA
    + """
local i, size, appended = 1, #runs, 0
while i <= size do
  local k, count, trim, maxlen = runs[i], runs[i + 1], runs[i + 2], runs[i + 3]
  local key, first, last = KEYS[k], i + 5, i + 4 + count
  local relayed_from = first
  if fresh[k] == 1 then
    if redis.call('XADD', key, 'NOMKSTREAM', 'MAXLEN', trim, maxlen, '*', 'p', runs[first]) then
      fresh[k], first = 2, first + 1
    else
      fresh[k] = 0
    end
  end
  for j = first, last do
    if j < last and trim == '~' then
      redis.call('XADD', key, '*', 'p', runs[j])
    else
      redis.call('XADD', key, 'MAXLEN', trim, maxlen, '*', 'p', runs[j])
    end
  end
  if relay and runs[i + 4] == 1 then
    relayed(relay[2 * k - 1], relay[2 * k], runs, relayed_from, last)
  end
  i, appended = last + 1, appended + count
end
for k, key in ipairs(KEYS) do
  if fresh[k] ~= 2 then
    redis.call('EXPIRE', key, ttl)
  end
end
return appended
"""
)


@push_settings.derived  # asked for each channel of every append (0.5 us -> 0.15)
def stream_plan(prefix: str, channel: str, size: int, max_bytes: int) -> tuple[str, int, int]:
    """A channel's stream key, the entries it keeps, and the largest data (``data_bytes``)
    of which that many fit its byte budget."""
    length = stream_length(channel, size)
    return recent_key(prefix, channel), length, max_bytes // max(1, length)


def append_arguments(
    prefix: str,
    messages: list[ChannelMessage],
    size: int,
    ttl: int,
    max_bytes: int,
    fresh: Container[str] = (),
) -> tuple[list[str], list[str | int | bytes]]:
    """The KEYS and ARGV of ``APPEND_SCRIPT`` for ``messages``; the streams of the
    channels in ``fresh`` had their TTL set lately."""
    return _append_call(prefix, messages, size, ttl, max_bytes, fresh, None)[1:]


def _append_call(
    prefix: str,
    messages: list[ChannelMessage],
    size: int,
    ttl: int,
    max_bytes: int,
    fresh: Container[str],
    relay: Relay | None,
) -> tuple[Iterable[str], list[str], list[str | int | bytes]]:
    """The channels of ``messages``, and the KEYS and ARGV of ``APPEND_SCRIPT``; with
    ``relay``, the ``relayed`` messages are sent to their channels' groups too."""
    keys: list[str] = []
    fresh_keys: list[int] = []
    relaying = relay is not None
    streams: dict[str, tuple[int, int, list[list[Any]]]] = {}  # channel: length, small, runs
    timestamp, timestamp_text = None, ""  # a write batch's messages share theirs
    for message in messages:
        if message.timestamp != timestamp:
            timestamp, timestamp_text = message.timestamp, repr(message.timestamp)
        stream = streams.get(message.channel)
        if stream is None:
            key, length, small = stream_plan(prefix, message.channel, size, max_bytes)
            keys.append(key)
            fresh_keys.append(1 if message.channel in fresh else 0)
            stream = streams[message.channel] = (length, small, [["~", length, 0]])
        length, small, runs = stream
        weight = len(message.data_json)  # data_bytes(message), without a call per message
        # Approximate trimming only drops whole stream nodes: fine for the count,
        # useless for a few large messages, which are trimmed exactly.
        maxlen = length if weight <= small else min(length, max(1, max_bytes // weight))
        relayed = 1 if relaying and message.relayed else 0
        run = runs[-1]
        if run[1] != maxlen or run[2] != relayed:
            run = ["~" if maxlen == length else "=", maxlen, relayed]
            runs.append(run)
        run.append(f"{message.seq} {timestamp_text} {message.message_id} {message.data_json}")
    fields: list[str | int] = []
    groups: list[str | bytes] = []
    for index, (channel, (_, _, runs)) in enumerate(streams.items(), 1):
        relayed_stream = False
        for run in runs:
            if len(run) > 3:  # (a stream's first run is empty when it starts otherwise)
                fields += (index, len(run) - 3)
                fields += run
                relayed_stream = relayed_stream or run[2] == 1
        if relay is not None:
            groups += (relay.group_of(channel) if relayed_stream else b"", channel)
    args: list[str | int | bytes] = [ttl, script_argument(fields)]
    if any(fresh_keys) or relay is not None:
        args.append(script_argument(fresh_keys) if any(fresh_keys) else b"")
    if relay is not None:
        args += (script_argument(groups), relay.mark + CACHED_ENTRIES)
    return streams.keys(), keys, args


class RecentCache:
    """A node's side of the cache: appends in batches, reads on channel join."""

    def __init__(
        self, redis: Any, prefix: str, *, size: int, ttl_secs: int, max_bytes: int
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.size = size
        self.ttl_secs = ttl_secs
        self.max_bytes = max_bytes
        # Bounded: while Redis is away the oldest appends give way (see above).
        self._queue: collections.deque[ChannelMessage] = collections.deque(
            maxlen=MAX_QUEUED_APPENDS
        )
        self._wakeup = Wakeup()
        # Set by ``close``: ``run`` writes what is queued, then ends.
        self._closing = False
        # The batch ``run`` is writing now (taken off the queue, not yet in Redis).
        self._writing: list[ChannelMessage] = []
        # The channels whose stream TTL this node set since ``_fresh_since``, within the
        # last ``_refresh_secs``: their appends set it again only if Redis lost them.
        self._refresh_secs = ttl_secs // TTL_REFRESH_PARTS
        self._fresh: set[str] = set()
        self._fresh_since = 0.0
        # The appends' own connection: one call at a time, from ``run``.
        self._appends = HeldConnection(lambda: redis.connection_pool) if redis is not None else None

    @property
    def enabled(self) -> bool:
        return self.redis is not None and self.size > 0

    def relays(self, message: ChannelMessage) -> bool:
        """Whether the call that appends ``message`` will send it to the other nodes
        too (``push.storage.relay``): not one that must skip a Pusher socket
        (``exclude``, which the stream's entries do not hold); the broker sends those."""
        return message.exclude is None and self.enabled and relay_now() is not None

    def append_soon(self, message: ChannelMessage) -> None:
        if not self.enabled:
            return
        if len(self._queue) == self._queue.maxlen:  # the oldest gives way: counted
            metrics.RECENT_CACHE_APPENDS_DROPPED.inc()
        self._queue.append(message)
        self._wakeup.set()

    def appending(self, channel: str) -> bool:
        """Whether a message of ``channel`` this node committed is queued or being
        written here, so not in its stream yet. Looked at when a channel is joined, not
        per message: the queue is empty but while Redis is slow."""
        return any(m.channel == channel for m in self._queue) or any(
            m.channel == channel for m in self._writing
        )

    def close(self) -> None:
        """Let ``run`` end once it has written what is queued (a stopping node): those
        appends also relay their messages to the other nodes."""
        self._closing = True
        self._wakeup.set()

    async def run(self) -> None:
        """Write queued messages, one script call per batch, until ``close``."""
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                batch = self._writing = list(self._queue)
                self._queue.clear()
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.warning("recent-history cache append failed: %s", exc)
                finally:
                    self._writing = []
        finally:
            if self._appends is not None:
                await self._appends.release()

    async def _write(self, batch: list[ChannelMessage]) -> None:
        if self._appends is None:
            return
        # A script holds Redis until it ends: a backlog (Redis was away) goes in slices.
        for start in range(0, len(batch), APPENDS_PER_CALL):
            fresh = self._fresh_streams()
            channels, keys, args = _append_call(
                self.prefix,
                batch[start : start + APPENDS_PER_CALL],
                self.size,
                self.ttl_secs + self._refresh_secs,
                self.max_bytes,
                fresh,
                relay_now(),
            )
            await self._appends.run_script(APPEND_SCRIPT, keys, args)
            fresh.update(channels)  # now or since ``_fresh_since``: within the period

    def _fresh_streams(self) -> set[str]:
        """The channels whose stream TTL this node set less than ``_refresh_secs`` ago
        (it set it that much longer than the TTL). Always empty when that is under a
        second: the TTL is set on every append."""
        now = time.monotonic()
        if now - self._fresh_since >= self._refresh_secs or len(self._fresh) > MAX_FRESH_STREAMS:
            self._fresh = set()
            self._fresh_since = now
        return self._fresh

    async def read(self, channel: str, count: int, max_bytes: int) -> list[ChannelMessage]:
        """The channel's cached recent messages, or [] on a miss: at most ``count`` of
        them and ``max_bytes`` of data (and of the cache's own budget), at least one."""
        if not self.enabled or count <= 0:
            return []
        messages = contiguous_tail(
            await self._read_newest(channel, min(count, self.size), min(max_bytes, self.max_bytes))
        )
        metrics.RECENT_CACHE_READS.labels("hit" if messages else "miss").inc()
        return messages

    async def _read_newest(self, channel: str, count: int, max_bytes: int) -> list[ChannelMessage]:
        """Newest entries first, a few at a time, until ``count`` or ``max_bytes``."""
        key = recent_key(self.prefix, channel)
        newest: list[ChannelMessage] = []
        total = 0
        top = "+"
        while len(newest) < count:
            wanted = min(READ_CHUNK, count - len(newest))
            entries = await self.redis.xrevrange(key, max=top, count=wanted)
            for _, fields in entries:
                message = message_from_entry(channel, fields)
                if newest and total + data_bytes(message) > max_bytes:
                    return newest
                total += data_bytes(message)
                newest.append(message)
            if len(entries) < wanted:
                break
            top = "(" + entries[-1][0].decode()
        return newest
