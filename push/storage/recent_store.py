"""Recent-only channels: their seq and a window of their last messages live in Redis,
with no PostgreSQL row per message (``PUSH_HISTORY_MODES``, docs/semantics.md "History modes").

Per channel, two keys (one hash tag, so a Redis Cluster keeps them on one shard):

- the lease hash ``<prefix>:rseq:{<channel>}``: ``n`` the last seq handed out, ``c``
  the ceiling of the seqs reserved in PostgreSQL, ``b`` the window's bytes, ``e`` when
  (Redis' clock, ms) a publish last set the window's expiry, and ``p`` a token while a
  new lease is being confirmed (below);
- the window list ``<prefix>:rwin:{<channel>}``: JSON entries in seq order, the last
  one always seq ``n``, trimmed to ``PUSH_RECENT_WINDOW_BYTES`` and (an eighth past it
  at most, never served) ``PUSH_RECENT_WINDOW_MESSAGES``, and expiring
  ``PUSH_RECENT_WINDOW_SECS`` (a sixteenth more at most) after the last publish (older
  entries are not served either).

Publishing is one script: take the next seq unless it would pass the ceiling, append
the entry, trim, return the seq; the message is broadcast only after it returned. A
call numbers every publish that queued while the calls before it were in Redis (as the
write pipeline groups durable publishes), each channel's in queue order. Two calls are
in Redis at a time per node at most, never two with the same channel (``_Lane``), so a
channel's publishes are still numbered one call after another, in queue order.
When the lease is used up (or gone), a block of seqs is reserved in PostgreSQL
(``push_channel.last_seq`` is the ceiling: one write per block) and its top installed
as the new ceiling. So PostgreSQL's ceiling >= Redis' ceiling >= every seq handed out.

Seqs never repeat, even when Redis loses the hash (a restart without persistence,
eviction), or keeps an old one: each lease records the run_id of the Redis server
process that wrote it, and a lease from another process (a snapshot restored at a
restart, a replica promoted before it received the last writes) counts as lost. A
store learns its server's run_id again on every connection it makes, before the
connection carries a command (``RecentStore._connected``).

A lost lease is started again in three steps: a *claim* script creates it as a
pending marker (publishers wait for it, a few ms; it expires by itself if its claimer
dies, and is dropped if the block cannot be reserved), the claimer then reserves a
block, and a *confirm* script sets the counter to the bottom of that block. Every
block installed before the loss was reserved before the claim, so it ends at or below
that bottom. (Starting the counter from a block reserved *before* the loss, as
"counter = top - block when the hash is missing" would, can hand out again seqs that
a later block handed out before it.)

After a loss the next seq is past everything before: a live subscriber sees a jump in
seq (a gap it can see, never a repeated seq), a resume across it answers
``recovered: false``. While the hash is missing the channel's latest seq is unknown;
readers answer as for a channel whose history is gone and never skip a seq that
could still be handed out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from django.db import DatabaseError, connection
from redis.exceptions import RedisError, ResponseError

from common import metrics
from common.background import LoopLocal, spawn
from common.conf import push_settings
from common.db import db_call
from common.errors import ErrorCode, PushError
from common.redis_client import (
    HeldConnection,
    LuaScript,
    redis_async,
    redis_prefix,
    script_argument,
)
from push.fanout.message import ChannelMessage, new_message_ids
from push.fanout.outbox import deliveries_together
from push.models import Channel
from push.storage.relay import RECENT_ENTRIES, RELAY_LUA, Relay
from push.storage.relay import current as relay_now
from push.storage.write_batch import Published

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Redis answers in well under a millisecond; these bound what a client waits while it
# is away, so a publish to a recent channel fails with UNAVAILABLE instead of hanging.
REDIS_CONNECT_TIMEOUT_SECS = 1.0
REDIS_TIMEOUT_SECS = 2.0
PUBLISH_DEADLINE_SECS = 5.0
# A synchronous caller (application code, a sync view) waits at most this for the
# loop its work runs on: past every bound that work has (the publish deadline, a
# block's reservation on the database threads).
SYNC_CALL_TIMEOUT_SECS = 30.0
# How often the store looks for publishes past that deadline (while it has any).
EXPIRY_CHECK_SECS = 0.5
# A pending marker outlives a creator that died before confirming it by this much.
PENDING_TTL_MSECS = 5000
PENDING_RETRY_SECS = 0.005
# A lease hash lasts this long after the publish that last renewed its expiry, so at
# least half as long after the channel's last publish (``Window.lease_renewal``). Past
# it the next publish reserves a new block: subscribers see the seq jump by what was
# left unused.
LEASE_IDLE_SECS = 2 * 86_400

_DATA_MARK = ',"data":'

# The run_id in an ``INFO server`` answer.
_RUN_ID = re.compile(rb"^run_id:(\w+)", re.MULTILINE)

# Answers of the publish script besides a seq.
_NO_LEASE, _EXHAUSTED, _PENDING, _OTHER_SERVER = -1, 0, -2, -3

# Numbers and stores the entries of several channels in one call: every publish of
# the node that waited while the calls before it were in Redis (a call per publish cost
# the node more than a durable publish's share of its PostgreSQL batch: py-spy, most
# of it redis-py building each command and reading each reply in Python).
# KEYS: each channel's lease and window, in pairs. ARGV[1..4]: the window's count and
# bytes, its age in ms, the lease's idle seconds; ARGV[5] the Redis server's run_id as
# the caller knows it (a lease written by another server process, a restart that
# restored a snapshot or a failover to a replica that had not received the last
# writes, may be behind what was handed out); ARGV[6] the number of channels; ARGV[7]
# each channel's entry count, then every entry in order, in one array
# (``common.redis_client.script_argument``: a count as an argument of its own cost the
# node 0.25 us each). ARGV[8], when not empty: each channel's group ("" for one the
# broker sends) and name, in one array, and ARGV[9] the relay's mark and kind
# (``push.storage.relay``): the entries numbered are published to the group then.
# ARGV[10]: every how many seqs the lease's expiry is renewed (``Window.lease_renewal``;
# also by the first publish after the window expired). ARGV[11]: how many entries past
# its count the window may hold before it is trimmed back to its count
# (``Window.trim_slack``); ARGV[12]: how many ms may pass before a publish sets the
# window's expiry again (``Window.expiry_refresh_ms``), which is then ARGV[3] plus that.
# Answers per channel: its first seq, or why none was taken (the caller acts on that
# channel alone).
#
# Per channel, one HMGET, one RPUSH of all its entries (whose answer, the length, tells
# whether the window was there), one HSET and the relay's PUBLISH. Trimming by count
# (one LPOP of what the count bound drops) and the window's PEXPIRE come only every so
# many publishes, and a LPOP each only for what the byte bound drops: Lua's calls into
# Redis are most of the script's time in Redis, and these two were a third of them.
_PUBLISH = (
    """
local max_count, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local channels = tonumber(ARGV[6])
local counts_and_entries = cmsgpack.unpack(ARGV[7])
local relay = nil
if ARGV[8] ~= '' then relay = cmsgpack.unpack(ARGV[8]) end
local relay_prefix = ARGV[9]
local renewal = tonumber(ARGV[10])
local trim_slack, refresh_ms = tonumber(ARGV[11]), tonumber(ARGV[12])
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""
    + RELAY_LUA
    + """
local function publish(lease_key, window_key, first_entry, count)
  local lease = redis.call('HMGET', lease_key, 'n', 'c', 'p', 'r', 'b', 'e')
  if not lease[1] then return -1, nil end
  if lease[4] ~= ARGV[5] then return -3, nil end
  if lease[3] then return -2, nil end
  local n = tonumber(lease[1])
  if n + count > tonumber(lease[2]) then return 0, nil end
  local entries, added = {}, 0
  for i = 1, count do
    local tail = counts_and_entries[first_entry + i - 1]
    local entry = '{"seq":' .. string.format('%d', n + i) .. ',' .. tail
    entries[i] = entry
    added = added + #entry
  end
  local len = redis.call('RPUSH', window_key, unpack(entries))
  local window_was_gone = len == count
  local bytes = added
  if len > count then bytes = bytes + tonumber(lease[5] or '0') end
  local keep = math.max(max_count, 1)
  if len > keep + trim_slack then
    for _, dropped in ipairs(redis.call('LPOP', window_key, len - keep)) do
      bytes = bytes - #dropped
    end
    len = keep
  end
  while len > 1 and bytes > max_bytes do
    bytes = bytes - #redis.call('LPOP', window_key)
    len = len - 1
  end
  n = n + count
  if window_was_gone or now_ms - tonumber(lease[6] or '0') >= refresh_ms then
    redis.call('PEXPIRE', window_key, tonumber(ARGV[3]) + refresh_ms)
    redis.call('HSET', lease_key, 'n', string.format('%d', n), 'b', bytes, 'e', now_ms)
  else
    redis.call('HSET', lease_key, 'n', string.format('%d', n), 'b', bytes)
  end
  if window_was_gone or math.floor(n / renewal) ~= math.floor((n - count) / renewal) then
    redis.call('EXPIRE', lease_key, ARGV[4])
  end
  return n - count + 1, entries
end
local answers = {}
local next_entry = channels + 1
for c = 1, channels do
  local count = counts_and_entries[c]
  local first, entries = publish(KEYS[2 * c - 1], KEYS[2 * c], next_entry, count)
  answers[c] = first
  if entries and relay and relay[2 * c - 1] ~= '' then
    relayed(relay[2 * c - 1], relay[2 * c], entries, 1, count)
  end
  next_entry = next_entry + count
end
return answers
"""
)
_PUBLISH_SCRIPT = LuaScript(_PUBLISH)

# Raise the ceiling of a live lease (a lost one is started by claim and confirm).
_INSTALL = """
local lease = redis.call('HMGET', KEYS[1], 'c', 'r')
if not lease[1] or lease[2] ~= ARGV[2] then return 0 end
if tonumber(ARGV[1]) > tonumber(lease[1]) then redis.call('HSET', KEYS[1], 'c', ARGV[1]) end
return 1
"""

# Start a missing lease, or one another server process wrote, as a pending marker,
# and drop the window that went with the old one (its seqs are of the lost lease).
_CLAIM = """
if redis.call('HGET', KEYS[1], 'r') == ARGV[3] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'n', 0, 'c', 0, 'b', 0, 'p', ARGV[1], 'r', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_CONFIRM = """
if redis.call('HGET', KEYS[1], 'p') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'n', ARGV[2])
if tonumber(ARGV[3]) > tonumber(redis.call('HGET', KEYS[1], 'c')) then
  redis.call('HSET', KEYS[1], 'c', ARGV[3])
end
redis.call('HDEL', KEYS[1], 'p')
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# Drop a pending marker whose block could not be reserved (nothing was handed out).
_RELEASE = """
if redis.call('HGET', KEYS[1], 'p') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# The latest seq and the window entries after ARGV[1] (or the last ARGV[2] when
# ARGV[1] is negative), read at one instant; false while the lease is missing, 0 when
# another server process wrote it (ARGV[3] is the run_id the caller knows). ARGV[4] is
# the window's count: entries before the last that many (kept until the next trim,
# ``Window.trim_slack``) are not served. ARGV[5], when above 0, bounds the entries
# returned by their data's bytes as a durable history page is (at least one): what is
# cut never leaves Redis, however large the window was allowed to grow.
_READ = """
local lease = redis.call('HMGET', KEYS[1], 'n', 'p', 'r')
if not lease[1] or lease[2] then return false end
if lease[3] ~= ARGV[3] then return 0 end
local held = redis.call('LLEN', KEYS[2])
local len = math.min(held, math.max(tonumber(ARGV[4]), 1))
local skip = held - len
local first = tonumber(lease[1]) - len + 1
local since, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local start = math.max(0, len - limit)
if since >= 0 then start = math.max(0, since + 1 - first) end
if start >= len then return {lease[1], {}} end
local last = math.min(start + limit, len) - 1
local entries = redis.call('LRANGE', KEYS[2], skip + start, skip + last)
local budget, total = tonumber(ARGV[5] or '0'), 0
if budget > 0 then
  for i, entry in ipairs(entries) do
    local size = #entry - string.find(entry, ',"data":', 1, true) - 8
    if i > 1 and total + size > budget then
      for j = #entries, i, -1 do entries[j] = nil end
      break
    end
    total = total + size
  end
end
return {lease[1], entries}
"""


def lease_key(prefix: str, channel: str) -> str:
    return f"{prefix}:rseq:{{{channel}}}"


def window_key(prefix: str, channel: str) -> str:
    return f"{prefix}:rwin:{{{channel}}}"


@dataclass(frozen=True)
class Window:
    """A recent channel's bounds: count, age and bytes of its window, and seq block."""

    messages: int
    secs: int
    bytes: int
    seq_block: int

    @property
    def lease_renewal(self) -> int:
        """Every how many seqs a publish renews its lease's expiry, besides the first
        publish after the window expired: a channel that publishes within ``secs`` of
        its last publish keeps its window, and in that many publishes it spends at most
        half of ``LEASE_IDLE_SECS``. An EXPIRE on every publish was a seventh of the
        publish script's time in Redis (most of which is Lua's calls into Redis)."""
        return max(1, LEASE_IDLE_SECS // (2 * max(1, self.secs)))

    @property
    def trim_slack(self) -> int:
        """Entries past ``messages`` the window may hold before a publish trims it back
        to ``messages`` (readers never serve them): a LPOP on every publish was a sixth
        of the publish script's calls into Redis. The byte bound is kept exactly."""
        return max(1, self.messages // 8)

    @property
    def expiry_refresh_ms(self) -> int:
        """How long after a publish set the window's expiry the next one sets it again
        (to ``secs`` plus this): the window expires between ``secs`` and ``secs`` plus a
        sixteenth after the last publish, and entries older than ``secs`` are never
        served (``RecentStore.read``)."""
        return max(1, self.secs * 1000 // 16)

    @classmethod
    @push_settings.derived  # asked for every publish; settings are read once
    def from_settings(cls) -> Window:
        return cls(
            messages=push_settings.RECENT_WINDOW_MESSAGES,
            secs=push_settings.RECENT_WINDOW_SECS,
            bytes=push_settings.RECENT_WINDOW_BYTES,
            seq_block=push_settings.RECENT_SEQ_BLOCK,
        )


def entry_tails(
    message_ids: list[str],
    timestamp: float,
    data_jsons: list[str],
    excluded: list[str | None] | None = None,
) -> list[str]:
    """Window entries after their seqs, which the publish script puts in front: a
    call's at once, its timestamp written once (a function call per entry, each writing
    the float again, cost a recent publish 0.5 us). ``excluded``, given when a publish
    of the call names one: each entry's excluded Pusher socket (``exclude``), written
    into the entries that have one, so a gap repair that reads them back skips it."""
    stamp = f'","timestamp":{timestamp!r}{_DATA_MARK}'
    if excluded is None:
        return [
            f'"message_id":"{i}{stamp}{d}}}' for i, d in zip(message_ids, data_jsons, strict=True)
        ]
    return [
        f'"message_id":"{i}{stamp}{d}}}'
        if x is None
        else f'"message_id":"{i}{_EXCLUDE_MARK}{x}{stamp}{d}}}'
        for i, d, x in zip(message_ids, data_jsons, excluded, strict=True)
    ]


# Between an entry's message id and its excluded socket (a socket id is digits and a
# dot: nothing to escape).
_EXCLUDE_MARK = '","exclude":"'


# What an entry holds besides its seq's digits, message id, timestamp and data.
_ENTRY_FRAME_BYTES = len('{"seq":,' + entry_tails([""], 0.0, [""])[0]) - len(repr(0.0))
# The longest ``repr`` of a float ("-2.2250738585072014e-308").
_TIMESTAMP_MAX_CHARS = 24


def entry_bytes_at_most(message: ChannelMessage) -> int:
    """At least what ``message``'s entry weighs against the window's byte bound (its
    UTF-8 bytes, ``Window.bytes``), however its timestamp was written: a node that
    measures its own messages this way never counts one in the window that Redis
    already dropped for bytes."""
    data = message.data_json
    data_bytes = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
    seq_digits = len(str(message.seq))
    excluded = 0 if message.exclude is None else len(_EXCLUDE_MARK) + len(message.exclude)
    return (
        (_ENTRY_FRAME_BYTES + seq_digits + len(message.message_id) + _TIMESTAMP_MAX_CHARS)
        + data_bytes
        + excluded
    )


def message_from_entry(channel: str, entry: bytes | str) -> ChannelMessage:
    """An entry back as a message; ``data`` is cut out as text, never re-encoded."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    mark = text.index(_DATA_MARK)  # the fields before it never hold this text
    head = json.loads(text[:mark] + "}")
    return ChannelMessage(
        channel=channel,
        seq=int(head["seq"]),
        message_id=head["message_id"],
        data_json=text[mark + len(_DATA_MARK) : -1],
        timestamp=float(head["timestamp"]),
        exclude=head.get("exclude"),
    )


# ----- the seq lease in PostgreSQL -------------------------------------------------------


def seq_block_take(channel: str, amount: int) -> int:
    """Reserve ``amount`` more seqs for ``channel`` in PostgreSQL; the new ceiling.

    Committed at once (autocommit), before any seq of the block is handed out."""
    table = connection.ops.quote_name(Channel._meta.db_table)
    # The table name comes from our own model; every value is a parameter.
    sql = (
        f"INSERT INTO {table} (name, last_seq, created_at) VALUES (%s, %s, %s) "  # noqa: S608
        f"ON CONFLICT (name) DO UPDATE SET last_seq = {table}.last_seq + EXCLUDED.last_seq "
        "RETURNING last_seq"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [channel, amount, datetime.now(UTC)])
        (top,) = cursor.fetchone()
    return int(top)


_seq_block_take = db_call(seq_block_take)


# ----- the store ---------------------------------------------------------------------------

# What one publish call sends at most: the script holds Redis while it runs.
APPENDS_PER_CALL = 1000
BYTES_PER_CALL = 4 * 1024 * 1024
# Channels whose keys a store keeps encoded (~200 bytes each).
PUBLISH_KEYS_KEPT = 4096


# A window entry's characters besides its data, at most (an id, a timestamp of 17
# characters, the field names). A publish counts its entries by this against the
# bounds on what is queued and on a call, before the call makes them.
_ENTRY_CHARS_BESIDES_DATA = len(entry_tails([str(uuid.UUID(int=0))], 1e9 + 1e-6, [""])[0])


class ServerChanged(RedisError):
    """Raised when a connection the store just made reaches another Redis server
    process than the one it knew: the command about to go on it named the old one
    (a lease that process wrote, restored from a snapshot or received by a replica
    before it was promoted, would have been taken for the new one's) and was not sent.
    Not a ``ConnectionError``, so redis-py does not send it again as it was."""

    def __init__(self, known: str, server: str) -> None:
        super().__init__(f"Redis server {known} was replaced by {server}")
        self.server = server


class _Numbering:
    """A publish waiting for the call that numbers it. That call makes its ids,
    timestamp and window entries, for all of its publishes at once, and answers it
    through the subclass (``_Awaited``, ``_Submitted``)."""

    __slots__ = (
        "channel",
        "count",
        "data_jsons",
        "deadline",
        "exclude",
        "first",
        "ids",
        "nbytes",
        "relayed",
        "timestamp",
    )
    # Set by the call that numbers it (``RecentStore._publish_all``).
    ids: list[str]
    timestamp: float
    first: int  # its first seq, or why it has none (the script's answer for its channel)
    relayed: bool  # the call sends its messages to the other nodes (``Relay``)

    def __init__(
        self,
        channel: str,
        data_jsons: list[str],
        exclude: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.channel = channel
        self.data_jsons = data_jsons
        self.exclude = exclude
        self.count = len(data_jsons)
        self.nbytes = sum(map(len, data_jsons)) + self.count * _ENTRY_CHARS_BESIDES_DATA
        if exclude is not None:
            self.nbytes += self.count * (len(_EXCLUDE_MARK) + len(exclude))
        # When its publisher is answered UNAVAILABLE if it has no seq yet (``_expire``).
        self.deadline = loop.time() + PUBLISH_DEADLINE_SECS

    def done(self) -> bool:
        """Answered already, or given up by its publisher: not to be sent or answered."""
        raise NotImplementedError

    def numbered(self) -> None:
        """Answer it with its messages (numbered from ``first``)."""
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """The store is closing."""
        raise NotImplementedError

    def messages(self) -> list[ChannelMessage]:
        """Its messages, numbered from ``first``."""
        seq, timestamp, channel, exclude = self.first, self.timestamp, self.channel, self.exclude
        if self.count == 1:  # most publishes: no loop (a comprehension cost 0.6 us more)
            return [
                ChannelMessage(
                    channel=channel,
                    seq=seq,
                    message_id=self.ids[0],
                    data_json=self.data_jsons[0],
                    timestamp=timestamp,
                    exclude=exclude,
                    relayed=self.relayed,
                )
            ]
        messages = []
        relayed = self.relayed
        for message_id, data_json in zip(self.ids, self.data_jsons, strict=True):
            messages.append(
                ChannelMessage(
                    channel=channel,
                    seq=seq,
                    message_id=message_id,
                    data_json=data_json,
                    timestamp=timestamp,
                    exclude=exclude,
                    relayed=relayed,
                )
            )
            seq += 1
        return messages


async def _numbering_call(connection: HeldConnection, keys: list[bytes], args: list[Any]) -> Any:
    """The publish script's answer to one call. A call that failed after it left may
    have run, and its publishers are told so (``_AnswerLost``): with a plain "retry"
    they would publish again what the window already holds, under another seq."""
    try:
        try:
            return await connection.run_script(_PUBLISH_SCRIPT, keys, args)
        except ServerChanged as changed:  # not sent: again, naming the server it reached
            args[4] = changed.server
            return await connection.run_script(_PUBLISH_SCRIPT, keys, args)
    except ResponseError:
        raise  # an answer
    except (RedisError, OSError, TimeoutError) as exc:
        if not connection.sent:
            raise
        raise _AnswerLost(
            f"Redis unavailable: {type(exc).__name__} before its answer; "
            "the publish may have been stored"
        ) from exc


# A call's publishes by channel, each channel's in queue order (``_take_waiting``).
_Call = dict[str, list[_Numbering]]


def _relayed_groups(relay: Relay, call: _Call) -> list[bytes | str]:
    """Each channel's group and name for the publish script, and whether each publish
    of the call is relayed by it. A channel with a publish that must skip one Pusher
    socket (``exclude``) goes through the broker, as before, with ``b""`` for its
    group: a node of an earlier version reads no ``exclude`` from a window entry."""
    groups: list[bytes | str] = []
    for channel, group in call.items():
        relayed = all(numbering.exclude is None for numbering in group)
        for numbering in group:
            numbering.relayed = relayed
        groups += (relay.group_of(channel) if relayed else b"", channel)
    return groups


class _Lane:
    """Publish calls one at a time on a connection of their own. A store has two, so
    the node answers one call while Redis runs the other: with one call at a time the
    node waited while Redis ran the script (~12 us of Redis' CPU per publish) and Redis
    waited while the node answered, and the node was 0.78-0.83 of a core busy at its
    WebSocket publishing maximum. Measured in-process, fed over sockets by 16
    connections x 8 publishes in flight on 64 channels: +22-30% publishes/s, the
    process 0.65-0.68 busy instead of 0.50, and 1-11% more CPU per publish, as calls
    are half as large (32 publishes instead of 64). Publishes queued all in one tick
    still go as one call: nothing is left for a second.

    The two calls never hold the same channel: a channel is numbered by one call after
    the other, in queue order, as with one lane, and a lease held or recovered for it
    is never in the other call."""

    __slots__ = ("call", "connection", "task")

    def __init__(self, pool: Callable[[], Any]) -> None:
        self.connection = HeldConnection(pool, write_at_once=True)
        self.task: asyncio.Task[None] | None = None
        # The publishes of its call in Redis now; empty between calls.
        self.call: _Call = {}

    def idle(self) -> bool:
        return self.task is None or self.task.done()


class RecentStore:
    """One event loop's access to the recent channels in Redis."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        # Made on the loop it serves (its Redis client belongs to it): what a publish
        # takes its future and deadline from, with no look-up of the running loop.
        self.loop = asyncio.get_running_loop()
        # The numbering calls' senders, each with its own connection.
        self._lanes = (
            _Lane(lambda: redis.connection_pool),
            _Lane(lambda: redis.connection_pool),
        )
        # Every connection the client makes learns which server process it reached
        # before it carries a command (``_connected``).
        redis.connection_pool.connection_kwargs["redis_connect_func"] = self._connected
        self._install = redis.register_script(_INSTALL)
        self._claim = redis.register_script(_CLAIM)
        self._confirm = redis.register_script(_CONFIRM)
        self._release = redis.register_script(_RELEASE)
        self._read = redis.register_script(_READ)
        # Channel -> its publishes kept back, in order, while its lease is recovered.
        self._held: dict[str, list[_Numbering]] = {}
        self._queued_messages = 0
        self._queued_bytes = 0
        self._server_id: str | None = None
        self._waiting: deque[_Numbering] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        # Channel -> its two keys as the publish call sends them (``_publish_keys``).
        self._publish_keys: dict[str, tuple[bytes, bytes]] = {}

    async def close(self) -> None:
        for lane in self._lanes:
            if lane.task is not None:
                lane.task.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for lane in self._lanes:
            await lane.connection.release()
        # Also what a lane started in this very tick never got to (a task cancelled
        # before its first step runs none of its handlers).
        self._cancel_waiting()
        await self.redis.aclose()

    async def server_id(self, *, fresh: bool = False) -> str:
        """The run_id of the Redis server process this store talks to: a lease records
        the one that wrote it (see ``_PUBLISH``)."""
        known = self._server_id
        if fresh or known is None:
            try:
                known = str((await self.redis.info("server"))["run_id"])
            except ServerChanged as changed:  # the connection made for it learned it
                known = changed.server
            self._server_id = known
        return known

    async def _connected(self, connection: Any) -> None:
        """A new connection's set-up (redis-py's ``redis_connect_func``): the usual one,
        then the run_id of the server it reached. A store knew its server's run_id
        from the first time it asked and never again: a Redis restarted from a
        snapshot, or a replica promoted, gave it back leases that the process it knew
        had written, and it went on numbering from their counters, behind what it had
        handed out (seqs 4 and 5 twice after a snapshot taken at 3)."""
        await connection.on_connect()
        await connection.send_command("INFO", "server")
        answer = await connection.read_response()
        found = _RUN_ID.search(answer if isinstance(answer, bytes) else answer.encode())
        if found is None:
            raise RedisError("INFO server gave no run_id")
        known, self._server_id = self._server_id, found.group(1).decode()
        if known is not None and known != self._server_id:
            raise ServerChanged(known, self._server_id)

    async def _server_changed(self) -> bool:
        """After an answer naming another server: was it this store that was behind
        (a failover or restart it had not noticed)?"""
        known = self._server_id
        return await self.server_id(fresh=True) != known

    def _keys(self, channel: str) -> list[str]:
        return [lease_key(self.prefix, channel), window_key(self.prefix, channel)]

    def _publish_keys_of(self, channel: str) -> tuple[bytes, bytes]:
        """``_keys`` encoded, kept for the next calls: a call names each of its channels'
        keys, and making and encoding them each time cost a recent publish ~0.2 us.
        Bounded, as clients choose channel names: past ``PUBLISH_KEYS_KEPT`` channels
        the store starts over."""
        if len(self._publish_keys) >= PUBLISH_KEYS_KEPT:
            self._publish_keys.clear()
        lease, window = self._keys(channel)
        keys = self._publish_keys[channel] = (lease.encode(), window.encode())
        return keys

    def append(self, numbering: _Numbering) -> None:
        """Queue ``numbering`` for the next call, which numbers and stores its entries in
        one step and answers it with the other publishes of the call (their deliveries
        leave together).

        Queued at once (not on first await): publishes get seqs in the order they
        called this, per channel, even across lease renewals, so a publisher may have
        several in flight and keep its order.

        Raises UNAVAILABLE at once when the node holds ``WRITE_QUEUE_MAX_MESSAGES`` or
        ``WRITE_QUEUE_MAX_BYTES`` of publishes not yet sent (Redis slow or away), as
        the write pipeline does for durable ones."""
        if self._queued_messages and (
            self._queued_messages + numbering.count > push_settings.WRITE_QUEUE_MAX_MESSAGES
            or self._queued_bytes + numbering.nbytes > push_settings.WRITE_QUEUE_MAX_BYTES
        ):
            metrics.PUBLISHES_REFUSED.labels("overloaded").inc()
            raise PushError(ErrorCode.UNAVAILABLE, "the node is overloaded; retry later")
        self._waiting.append(numbering)
        self._queued_messages += numbering.count
        self._queued_bytes += numbering.nbytes
        self._wake_sender(numbering.channel)
        if self._expiry is None:
            self._expiry = self.loop.call_later(EXPIRY_CHECK_SECS, self._expire)

    def _expire(self) -> None:
        """Answer UNAVAILABLE (a ``TimeoutError``) every publish still without a seq at
        its deadline, wherever it waits: queued, held while its channel's lease is
        recovered, or in a call Redis has not answered (either lane's). One timer for
        the store, not one per publish (a timer each cost a recent publish a tenth of
        its CPU)."""
        self._expiry = None
        now = self.loop.time()
        pending = False
        sending = [n for lane in self._lanes for group in lane.call.values() for n in group]
        in_call = {id(numbering) for numbering in sending}
        for numbering in itertools.chain(sending, self._waiting, *self._held.values()):
            if numbering.done():
                continue
            if now >= numbering.deadline:
                numbering.fail(
                    # Sent, and Redis may yet run the call: stored, maybe.
                    _AnswerLost("Redis did not answer in time; the publish may have been stored")
                    if id(numbering) in in_call
                    else TimeoutError("the recent-channel store did not answer in time")
                )
            else:
                pending = True
        if pending:
            self._expiry = self.loop.call_later(EXPIRY_CHECK_SECS, self._expire)

    def _count_queued(self, numbering: _Numbering, sign: int) -> None:
        """Publishes waiting or held, not yet in a call: what the bound above counts."""
        self._queued_messages += sign * numbering.count
        self._queued_bytes += sign * numbering.nbytes

    def _wake_sender(self, channel: str) -> None:
        """Start a lane when a publish of ``channel`` is queued (or given back after its
        lease's recovery) and no lane will take it: an idle node sends a lone publish
        at once; the second lane starts only beside a call in Redis that does not hold
        ``channel`` (one that does leaves it to the next call of its own lane)."""
        first, second = self._lanes
        if first.idle():
            if second.idle() or (second.call and channel not in second.call):
                first.task = spawn(
                    self._send_waiting(first, second), name="push-recent-publish", loop=self.loop
                )
        elif second.idle() and first.call and channel not in first.call:
            second.task = spawn(
                self._send_waiting(second, first), name="push-recent-publish", loop=self.loop
            )
        # Else both run, or ``first`` has not taken its first call yet (and will take
        # everything queued).

    async def _send_waiting(self, lane: _Lane, other: _Lane) -> None:
        """``lane``'s calls while something is queued that ``other``'s call in Redis
        does not hold; it ends when nothing is left it may take."""
        while self._waiting:
            call, entries = self._take_waiting(other.call)
            if not call:
                return  # what is left waits for ``other``, which takes it next
            lane.call = call
            try:
                await self._publish_all(lane.connection, call, entries)
            except asyncio.CancelledError:  # the store is closing
                for group in call.values():
                    for numbering in group:
                        numbering.cancel()
                self._cancel_waiting()
                raise
            except Exception as exc:  # Redis away: each publisher answers UNAVAILABLE
                for group in call.values():
                    for numbering in group:
                        if not numbering.done():
                            numbering.fail(exc)
                continue
            finally:
                # Before any later take, with no await between: a channel whose
                # publishes are held next (``_numbered``) is never taken meanwhile.
                lane.call = {}
            self._numbered(call)

    def _cancel_waiting(self) -> None:
        """The store is closing: every queued publish is told so."""
        for numbering in self._waiting:
            self._count_queued(numbering, -1)
            numbering.cancel()
        self._waiting.clear()

    def _numbered(self, call: _Call) -> None:
        """Answer each publish from its first seq, or hold it while its lease is
        recovered. A subscriber's messages of the call go out in one write, as a durable
        batch's."""
        with deliveries_together():
            for group in call.values():
                for numbering in group:
                    if numbering.first <= 0:
                        self._hold(numbering, numbering.first)
                    elif not numbering.done():  # else its publisher gave up
                        try:
                            numbering.numbered()
                        except Exception:  # a bug: the other publishes of the call are answered
                            logger.exception(
                                "recent publish to %r: answering it failed", numbering.channel
                            )

    def _take_waiting(self, busy: _Call) -> tuple[_Call, int]:
        """The next call's publishes by channel, and their entries: at most
        ``APPENDS_PER_CALL`` entries and ``BYTES_PER_CALL`` (one larger publish goes
        alone), as a script holds Redis until it ends. A publish whose publisher gave up
        before it was sent is dropped (it was answered UNAVAILABLE); one of a held
        channel joins the channel's hold; one of a channel in ``busy`` (the other
        lane's call) stays queued, in order, ahead of its channel's later ones, while
        other channels' are taken past it. One pass over what it looks at."""
        call: _Call = {}
        passed: list[_Numbering] = []
        entries = nbytes = 0
        waiting, held = self._waiting, self._held
        while waiting:
            head = waiting[0]
            if head.done():
                self._count_queued(waiting.popleft(), -1)
                continue
            channel = head.channel
            if channel in held:
                held[channel].append(waiting.popleft())
                continue
            if channel in busy:
                passed.append(waiting.popleft())
                continue
            if call and (
                entries + head.count > APPENDS_PER_CALL or nbytes + head.nbytes > BYTES_PER_CALL
            ):
                break
            waiting.popleft()
            group = call.get(channel)
            if group is None:
                call[channel] = [head]
            else:
                group.append(head)
            entries += head.count
            nbytes += head.nbytes
        if passed:
            waiting.extendleft(reversed(passed))
        self._queued_messages -= entries
        self._queued_bytes -= nbytes
        return call, entries

    def _hold(self, numbering: _Numbering, state: int) -> None:
        """Keep a publish the script could not number, and every later one of its
        channel, in order, until the channel's lease is usable again (``_recover``)."""
        held = self._held.get(numbering.channel)
        if held is None:
            held = self._held[numbering.channel] = []
            spawn(self._recover(numbering.channel, state))
        held.append(numbering)
        self._count_queued(numbering, 1)

    async def _recover(self, channel: str, state: int) -> None:
        """Make the channel's lease usable (wait for another publisher's claim, learn a
        new Redis server, renew or start it), then queue its held publishes first."""
        try:
            if state == _PENDING:
                await asyncio.sleep(PENDING_RETRY_SECS)
            elif state == _OTHER_SERVER and await self._server_changed():
                pass  # this store was behind: the lease is Redis' current one
            else:
                held = sum(numbering.count for numbering in self._held[channel])
                lease = _NO_LEASE if state == _OTHER_SERVER else state
                block = Window.from_settings().seq_block
                await self._renew(channel, lease, max(block, held))
        except Exception as exc:  # Redis or PostgreSQL away: UNAVAILABLE for them
            for numbering in self._held.pop(channel):
                self._count_queued(numbering, -1)
                if not numbering.done():
                    numbering.fail(exc)
            return
        except BaseException:  # cancelled: the store is closing
            for numbering in self._held.pop(channel):
                self._count_queued(numbering, -1)
                numbering.cancel()
            raise
        self._waiting.extendleft(reversed(self._held.pop(channel)))
        self._wake_sender(channel)

    async def _publish_all(self, connection: HeldConnection, call: _Call, entries: int) -> None:
        """One script call for ``call`` (of ``entries`` entries) on ``connection``: sets
        each publish's ``first`` seq (or why none).

        Publishes of one channel are numbered together, in queue order, so each gets
        its own first seq from the channel's."""
        keys, counts_and_entries = self._call_of(call, entries)
        relay = relay_now()
        # The bounds as the settings are now: read once per call, not per publish.
        window = Window.from_settings()
        args = [
            window.messages,
            window.bytes,
            window.secs * 1000,
            LEASE_IDLE_SECS,
            await self.server_id(),
            len(call),
            script_argument(counts_and_entries),
            b"" if relay is None else script_argument(_relayed_groups(relay, call)),
            b"" if relay is None else relay.mark + RECENT_ENTRIES,
            window.lease_renewal,
            window.trim_slack,
            window.expiry_refresh_ms,
        ]
        answers = await _numbering_call(connection, keys, args)
        for group, answer in zip(call.values(), answers, strict=True):
            seq = int(answer)
            for numbering in group:
                numbering.first = seq
                if seq > 0:
                    seq += numbering.count

    def _call_of(self, call: _Call, entries: int) -> tuple[list[bytes], list[int | str]]:
        """Make each publish's ids, timestamp and window entries, for all at once (a
        publish sent again, after its lease was recovered, was stored by none before);
        the call's keys, counts and entries (``_PUBLISH``)."""
        micros = time.time_ns() // 1000
        timestamp = micros / 1_000_000
        ids = new_message_ids(entries, now_ms=micros // 1000)
        keys: list[bytes] = []
        counts: list[int | str] = []
        data_jsons: list[str] = []
        excluding = False
        known_keys = self._publish_keys
        # Channel by channel, as the script reads them; ``ids[i]`` is ``data_jsons[i]``'s.
        for channel, group in call.items():
            keys += known_keys.get(channel) or self._publish_keys_of(channel)
            before = len(data_jsons)
            for numbering in group:
                taken = len(data_jsons)
                numbering.timestamp = timestamp
                numbering.relayed = False  # until ``_relayed_groups`` says otherwise
                numbering.ids = ids[taken : taken + numbering.count]
                data_jsons += numbering.data_jsons
                excluding = excluding or numbering.exclude is not None
            counts.append(len(data_jsons) - before)
        excluded = None
        if excluding:
            excluded = [n.exclude for g in call.values() for n in g for _ in range(n.count)]
        return keys, counts + entry_tails(ids, timestamp, data_jsons, excluded)

    async def _renew(self, channel: str, state: int, amount: int) -> None:
        """One block for all of the channel's held publishes: a block each would cost a
        PostgreSQL write each and push the ceiling (and a restart's jump) further."""
        if state == _NO_LEASE:
            await self._start_lease(channel, amount)
        else:
            await self.install_block(channel, await _seq_block_take(channel, amount))
            metrics.RECENT_SEQ_BLOCKS.labels("renew").inc()

    async def install_block(self, channel: str, top: int) -> None:
        """Raise the live lease's ceiling to ``top`` (nothing when the lease is gone:
        the block stays unused, and the next publish starts a new lease)."""
        await self._install(keys=self._keys(channel), args=[top, await self.server_id()])

    async def _start_lease(self, channel: str, amount: int) -> None:
        """Claim the missing lease, reserve a block, start the counter at its bottom
        (the module docstring says why in this order)."""
        keys = self._keys(channel)
        token = uuid.uuid4().hex
        # Fresh: a lease claimed under a run_id from before a restart would be taken
        # for another server's by every node that knows the new one.
        server = await self.server_id(fresh=True)
        if not int(await self._claim(keys=keys, args=[token, PENDING_TTL_MSECS, server])):
            return  # another publisher claimed it first: wait for its confirm
        try:
            top = await _seq_block_take(channel, amount)
        except Exception:
            # PostgreSQL away: the claim is dropped, or every publisher of the channel
            # would wait out its marker (PENDING_TTL_MSECS) once PostgreSQL is back.
            with contextlib.suppress(RedisError, OSError):
                await self._release(keys=keys, args=[token])
            raise
        metrics.RECENT_SEQ_BLOCKS.labels("start").inc()
        await self._confirm(keys=keys, args=[token, top - amount, top, LEASE_IDLE_SECS])

    async def read(
        self, channel: str, since: int | None, limit: int, window: Window, max_bytes: int = 0
    ) -> tuple[int, list[ChannelMessage]] | None:
        """The channel's latest seq and its window entries after ``since`` (the last
        ``limit`` when None) that are younger than the window's age, and (``max_bytes``
        above 0) the first of them whose data fits it, at least one; None while the
        lease is missing (the channel's latest seq is then unknown). Entries follow
        the last one returned whenever its seq is below the latest."""
        after = -1 if since is None else since
        while True:
            answer = await self._read_once(channel, [after, limit], window.messages, max_bytes)
            if not answer:
                return None  # missing, or written by another server: lost either way
            latest, entries = answer
            messages = [message_from_entry(channel, e) for e in entries]
            cutoff = time.time() - window.secs
            # A leading run only, so what is served stays contiguous.
            aged = 0
            while aged < len(messages) and messages[aged].timestamp < cutoff:
                aged += 1
            if not aged or since is None or messages[-1].seq >= int(latest):
                return int(latest), messages[aged:]
            # A read cut by its count or bytes that began with entries past the age (a
            # channel that kept publishing keeps its window): the entries asked for are
            # the ones after them. Cut short (or empty), the page would read as the
            # window's end, and a replay or a REST client would stop before what is served.
            after = messages[aged - 1].seq

    async def _read_once(
        self, channel: str, after_and_limit: list[int], count: int, max_bytes: int
    ) -> Any:
        """One ``_READ`` of a window of ``count`` messages: (latest, entries), or falsy
        while the lease is missing."""
        keys = self._keys(channel)

        def args(server: str | None) -> list[Any]:
            return [*after_and_limit, server, count, max_bytes]

        try:
            answer = await self._read(keys=keys, args=args(await self.server_id()))
        except ServerChanged as changed:  # not sent: again, naming the server it reached
            return await self._read(keys=keys, args=args(changed.server))
        if answer == 0 and await self._server_changed():
            answer = await self._read(keys=keys, args=args(self._server_id))
        return answer

    async def latest_seqs(self, channels: Iterable[str]) -> dict[str, int]:
        """Each channel's latest seq; channels whose lease is missing are left out."""
        names = list(channels)
        server = (await self.server_id()).encode()
        try:
            answers = await self._leases(names)
        except ServerChanged as changed:  # read again, from the server it reached
            server = changed.server.encode()
            answers = await self._leases(names)
        foreign = any(n is not None and by != server for n, _, by in answers)
        if foreign and await self._server_changed():
            # Redis restarted (or failed over) since this store last asked: the leases
            # other nodes wrote since are the live ones. Without this a node that only
            # subscribes never learns the new server, and never sees a channel move on.
            server = (await self.server_id()).encode()
        return {
            channel: int(n)
            for channel, (n, pending, written_by) in zip(names, answers, strict=True)
            if n is not None and pending is None and written_by == server
        }

    async def _leases(self, channels: list[str]) -> list[list[bytes | None]]:
        """Each channel's lease: its counter, pending marker and server, or Nones."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.hmget(lease_key(self.prefix, channel), "n", "p", "r")
            answers: list[list[bytes | None]] = await pipe.execute()
        return answers


def _store_of_loop() -> RecentStore:
    try:
        client = redis_async(
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECS,
            socket_timeout=REDIS_TIMEOUT_SECS,
            # Named, so CLIENT LIST shows what the recent channels hold open.
            client_name=f"{redis_prefix()}-recent",
        )
    except RuntimeError as exc:  # no REDIS_URL
        raise PushError(ErrorCode.UNAVAILABLE, "recent channels need Redis") from exc
    return RecentStore(client, redis_prefix())


_stores = LoopLocal(_store_of_loop)


def store() -> RecentStore:
    """This event loop's store (a Redis client belongs to one loop)."""
    return _stores.get()


async def store_close() -> None:
    """Close this loop's store (the node stops; its loop may end)."""
    found = _stores.pop()
    if found is not None:
        await found.close()


def redis_unavailable(exc: BaseException) -> PushError:
    return PushError(ErrorCode.UNAVAILABLE, f"Redis unavailable: {type(exc).__name__}; retry")


# ----- publishing -------------------------------------------------------------------------


# Hands a committed message to fan-out (``push.cluster.broadcast.broadcast_async``):
# storage sits below the cluster, so the publishing service passes it in.
Broadcast = Callable[[ChannelMessage], Awaitable[None]]


async def publish(
    channel: str, data_json: str, publisher_id: int | None, *, broadcast: Broadcast
) -> ChannelMessage:
    """Number, store and broadcast one message of a recent channel."""
    (message,) = await publish_batch(channel, [data_json], publisher_id, broadcast=broadcast)
    return message


# What a numbering fails with when Redis (or PostgreSQL, for a new block of seqs) is
# away or slow: answered UNAVAILABLE. (On the database threads a DatabaseError becomes
# db_call's PushError, UNAVAILABLE, which is what the block's reservation raises.)
_UNAVAILABLE_ERRORS = (RedisError, OSError, TimeoutError, DatabaseError, PushError)


class _AnswerLost(TimeoutError):
    """A publish's call went to Redis and its answer did not come in time."""


def _refusal(exc: BaseException) -> PushError:
    if isinstance(exc, _AnswerLost):
        return PushError(ErrorCode.UNAVAILABLE, str(exc))
    if isinstance(exc, PushError):  # db_call's, from a DatabaseError: the block's
        exc = exc.__cause__ or exc
    if isinstance(exc, DatabaseError):  # a new block of seqs could not be reserved
        return PushError(
            ErrorCode.UNAVAILABLE, f"PostgreSQL unavailable: {type(exc).__name__}; retry"
        )
    return redis_unavailable(exc)


class _Awaited(_Numbering):
    """A publish whose caller awaits its first seq (``publish_batch``); one it gave up
    (cancelled) before its call is not sent."""

    __slots__ = ("future",)

    def __init__(self, channel: str, data_jsons: list[str], exclude: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(channel, data_jsons, exclude, loop)
        self.future: asyncio.Future[int] = loop.create_future()

    def done(self) -> bool:
        return self.future.done()

    def numbered(self) -> None:
        self.future.set_result(self.first)

    def fail(self, exc: BaseException) -> None:
        self.future.set_exception(exc)

    def cancel(self) -> None:
        self.future.cancel()


async def publish_batch(
    channel: str,
    data_jsons: list[str],
    publisher_id: int | None,
    *,
    broadcast: Broadcast,
    exclude: str | None = None,
) -> list[ChannelMessage]:
    """Number and store several messages of one recent channel at once (consecutive
    seqs, all or none), then broadcast them in order. ``publisher_id`` is not kept:
    a recent message has no row to keep it in."""
    numbering = _Awaited(channel, data_jsons, exclude)
    try:
        # Answered by PUBLISH_DEADLINE_SECS at the latest (``RecentStore._expire``).
        store().append(numbering)
        await numbering.future
    except _UNAVAILABLE_ERRORS as exc:
        raise _refusal(exc) from exc
    messages = numbering.messages()
    for message in messages:
        await broadcast(message)
    return messages


class _Submitted(_Numbering):
    """A publish answered by the call that numbers it (``publish_submitted``): its
    messages are broadcast and its future answered there, with no task, no second
    future and no callback of its own (measured: those cost a recent publish ~1.5 us
    of the node's CPU). A refusal is the answer's result, not raised."""

    __slots__ = ("answer", "broadcast", "settled")

    def __init__(
        self,
        channel: str,
        data_jsons: list[str],
        exclude: str | None,
        broadcast: Callable[[ChannelMessage], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(channel, data_jsons, exclude, loop)
        self.answer: asyncio.Future[Published | PushError] = loop.create_future()
        self.broadcast = broadcast
        # Numbered or refused: its caller cancelling ``answer`` only gives up the
        # answer, the publish goes on (a numbered message is always broadcast).
        self.settled = False

    def done(self) -> bool:
        return self.settled

    def numbered(self) -> None:
        self.settled = True
        messages = self.messages()
        broadcast = self.broadcast
        for message in messages:
            try:
                broadcast(message)
            except Exception:  # stored: subscribers catch up from the window
                logger.exception("broadcast of %r failed", message)
        self._answer(Published(messages, False))

    def fail(self, exc: BaseException) -> None:
        self.settled = True
        if not isinstance(exc, _UNAVAILABLE_ERRORS):
            logger.error("recent publish to %r failed", self.channel, exc_info=exc)
        self._answer(_refusal(exc))

    def cancel(self) -> None:
        self.settled = True
        self._answer(PushError(ErrorCode.UNAVAILABLE, "the node is stopping"))

    def _answer(self, outcome: Published | PushError) -> None:
        if not self.answer.done():
            self.answer.set_result(outcome)


def publish_submitted(
    channel: str,
    data_jsons: list[str],
    *,
    broadcast: Callable[[ChannelMessage], None],
    exclude: str | None = None,
) -> asyncio.Future[Published | PushError]:
    """``publish_batch`` for a caller on the node's loop: queued now (raising at once
    what refuses it), broadcast through ``broadcast`` and answered by the call that
    numbers it, with no task per publish. A refusal is the future's result, not
    raised. A caller that cancels the future only gives up its answer: the messages
    are numbered and broadcast all the same (a numbered message never goes missing
    from the live stream)."""
    recent = store()
    submitted = _Submitted(channel, data_jsons, exclude, broadcast, recent.loop)
    recent.append(submitted)
    return submitted.answer


def publish_sync(
    channel: str, data_json: str, publisher_id: int | None, *, broadcast: Broadcast
) -> ChannelMessage:
    """``publish`` for synchronous code (REST views, ``push.publish``)."""
    return _run(publish(channel, data_json, publisher_id, broadcast=broadcast))


# ----- synchronous callers --------------------------------------------------------------------

_background: asyncio.AbstractEventLoop | None = None
_background_lock = threading.Lock()
# The running node's loop, while it runs (the node sets it): synchronous callers' Redis
# work goes there, beside the node's own.
_serving_loop: asyncio.AbstractEventLoop | None = None


def serve_on(loop: asyncio.AbstractEventLoop | None) -> None:
    """Run synchronous callers' work on ``loop`` (a node started on it), or on a
    background loop of this process (None: the node stopped)."""
    global _serving_loop
    _serving_loop = loop


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` for a synchronous caller on a loop that lasts: the node's, in a
    server process, else one background loop of this process. (``async_to_sync`` would
    make a loop, and so a Redis connection, per call in a process without a server:
    a worker publishing ticks would open a connection per message.)"""
    serving = _serving_loop
    loop = serving if serving is not None and not serving.is_closed() else _background_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coroutine.close()
        raise RuntimeError("called on the event loop: await the async form instead")
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    try:
        return future.result(timeout=SYNC_CALL_TIMEOUT_SECS)
    except concurrent.futures.TimeoutError:
        # The loop stopped under us (the node is shutting down) or is stuck: the
        # caller's thread is not held for good.
        future.cancel()
        raise PushError(
            ErrorCode.UNAVAILABLE, "the recent-channel store did not answer in time"
        ) from None


def _background_loop() -> asyncio.AbstractEventLoop:
    global _background
    with _background_lock:
        if _background is None or _background.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="push-recent", daemon=True).start()
            _background = loop
        return _background


# ----- reading ------------------------------------------------------------------------------


async def window_since(
    channel: str, since: int, limit: int, max_bytes: int
) -> tuple[list[ChannelMessage], bool]:
    """The window's messages after ``since``, oldest first, at most ``limit`` and
    ``max_bytes`` of data (at least one) as a durable page (REST history); and whether
    more follow them."""
    try:
        answer = await store().read(channel, since, limit, Window.from_settings(), max_bytes)
    except (RedisError, OSError) as exc:
        raise redis_unavailable(exc) from exc
    if answer is None:
        return [], False
    latest, messages = answer
    return messages, bool(messages) and messages[-1].seq < latest


def window_since_sync(
    channel: str, since: int, limit: int, max_bytes: int
) -> tuple[list[ChannelMessage], bool]:
    return _run(window_since(channel, since, limit, max_bytes))


async def latest_seqs(channels: list[str]) -> dict[str, int]:
    """Each recent channel's latest seq (REST channel info); a missing lease is left out."""
    return await store().latest_seqs(channels)


def latest_seqs_sync(channels: list[str]) -> dict[str, int]:
    # The store is looked up inside the coroutine, on the loop it runs on: a store
    # belongs to one loop, and the caller's thread has none.
    return _run(latest_seqs(channels))
