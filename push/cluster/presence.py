"""Presence on ``presence-*`` channels, across nodes: who is there, joins and leaves.

A member is a user (or the identity a signed subscription token names), not a
connection: the first connection of a user joins, the last one leaves, on whatever
nodes they are. Counts live in Redis and change in Lua scripts, so two nodes never
both announce the same join. Each node also records its own entries, so when a node
dies the node that notices (``push.cluster.directory``) removes them and announces the leaves.
The scripts that make a join or leave also write its ``member_added`` /
``member_removed`` to the event stream (``PresenceStore.events``), so those enter it in
the order Redis made them, whatever node made each.
Without Redis (one process) the same rules run in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from common.redis_client import redis_prefix, redis_sync
from push.ops.events import MEMBER_ADDED, MEMBER_EVENT_LUA, MEMBER_REMOVED, EventLog

if TYPE_CHECKING:
    from accounts.principals import Principal

logger = logging.getLogger(__name__)

Member = dict[str, Any]
# Tell every node serving a channel that a member joined or left: (kind, channel, member).
Announce = Callable[[str, str, Member], Awaitable[None]]
# The joins and leaves of a channel this node heard, in the order its subscribers got
# them: (kind, member).
Heard = list[tuple[str, Member]]

# KEYS: conns, counts, members, node index, leave payloads, and with events (``EventLog``)
# the stream and the channel's last entry (``EventLog.member_event_keys``). ARGV: conn
# field, user, info, index entry; with a relay (``PresenceRelay``, else empty) the
# channel's group and the payloads of the member's join (sent now) and leave (kept for
# the last leave); with events (else empty) the member_added event's head, the stream's
# bound and how long its entry stays the channel's last (``EventLog.member_event_args``).
_JOIN = (
    MEMBER_EVENT_LUA
    + """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('SADD', KEYS[4], ARGV[4])
local n = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if n ~= 1 then return 0 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[2], ARGV[7])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
if ARGV[8] ~= '' then
  write_member_event(KEYS[6], KEYS[7], ARGV[8], ARGV[2], ARGV[9], ARGV[10])
end
return 1
"""
)
# KEYS: as _JOIN's, then the node's leave receipts. ARGV: conn field, index entry, the
# channel's group (or empty), the member_removed event's head, bound and time kept (as
# _JOIN's, or empty), how long a receipt is kept (ms; empty: none) and how many at most.
# A receipt (the index entry in the node's sorted set, scored by Redis' clock) says
# that this leave was made and its member_removed written, for a node that never got
# the answer (``PresenceStore._announce_lost_leaves``).
_LEAVE = (
    MEMBER_EVENT_LUA
    + """
local function keep_receipt(receipts, entry, kept_ms, most)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  redis.call('ZADD', receipts, now, entry)
  redis.call('ZREMRANGEBYSCORE', receipts, '-inf', now - kept_ms)
  local extra = redis.call('ZCARD', receipts) - most
  if extra > 0 then redis.call('ZREMRANGEBYRANK', receipts, 0, extra - 1) end
  redis.call('PEXPIRE', receipts, kept_ms)
end
redis.call('SREM', KEYS[4], ARGV[2])
local user = redis.call('HGET', KEYS[1], ARGV[1])
if not user then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
local n = redis.call('HINCRBY', KEYS[2], user, -1)
if n <= 0 then
  local info = redis.call('HGET', KEYS[3], user)
  local leave = redis.call('HGET', KEYS[5], user)
  redis.call('HDEL', KEYS[2], user)
  redis.call('HDEL', KEYS[3], user)
  redis.call('HDEL', KEYS[5], user)
  local sent = 0
  if leave and ARGV[3] ~= '' then
    redis.call('PUBLISH', ARGV[3], leave)
    sent = 1
  end
  if ARGV[4] ~= '' then
    write_member_event(KEYS[6], KEYS[7], ARGV[4], user, ARGV[5], ARGV[6])
    if ARGV[7] ~= '' then keep_receipt(KEYS[8], ARGV[2], tonumber(ARGV[7]), tonumber(ARGV[8])) end
  end
  return {user, info or '{}', sent}
end
return false
"""
)
# A leave this node made but never got the answer of, or that Redis lost with its data.
# KEYS: members, the node's leave receipts (``_LEAVE``), and the event keys (as _JOIN's).
# ARGV: user, the member_removed event's head, bound and time kept (or empty), and the
# leave's index entry. Returns 0 when the member is there (through another connection),
# 2 when the leave was made and written (the receipt), else 1, having written its
# member_removed.
_LOST_LEAVE = (
    MEMBER_EVENT_LUA
    + """
local made = redis.call('ZREM', KEYS[2], ARGV[5]) == 1
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if made then return 2 end
if ARGV[2] ~= '' then
  write_member_event(KEYS[3], KEYS[4], ARGV[2], ARGV[1], ARGV[3], ARGV[4])
end
return 1
"""
)
# How long a leave's receipt is kept: longer than a node that lost the leave's answer
# (Redis slow, the connection broken) takes to ask again, which it does every
# PUSH_CLUSTER_ANNOUNCE_SECS once Redis answers; as long as an event stays its channel's
# ``after`` (``push.ops.events.AFTER_KEPT_SECS``). A node away from Redis for longer
# may write a member_removed twice (the receivers' dedupe by event id does not see it:
# the two have two ids).
LEAVE_RECEIPT_SECS = 600
# The receipts a node keeps at most, the newest: one sorted-set entry (~100 bytes) per
# member gone through the node's own connections. As separate keys, a user churning a
# presence subscription on a few hundred connections (25 leaves a second each, within
# the frame rate) made Redis hold hundreds of MB for the 10 minutes; now at most ~1 MB
# per node. Past it, a leave lost long ago among a flood of newer ones may be written
# twice, as above.
LEAVE_RECEIPTS_KEPT = 10_000


class PresenceRelay(Protocol):
    """Where the presence scripts send each join and leave they make, as they make it
    (``push.cluster.broker.Broker.presence_relay``): the channel's group on the
    channel layer, and the payload the layer would carry there.

    Announced by the node after the script, a change could reach the other nodes after
    a later one made elsewhere: a node whose loop was busy between a member's last
    leave and its announcement told every subscriber the member had gone after it had
    come back on another node (a page reloaded), and it stayed gone for them. Sent by
    the script, changes reach every node in the order Redis made them."""

    def group_of(self, channel: str) -> bytes: ...

    def payload(self, kind: str, channel: str, changed: Member) -> bytes: ...


# A member list is read whole (every member of the channel): on a channel of 5,000
# members, one read and its decoding cost the node ~15 ms, and a member may ask 50 times
# a second. Requests for one channel share a read while its members have not changed:
# any join or leave recorded here, or announced by another node, drops it; and it is
# kept at most this long, for the few channels asked most recently.
MEMBERS_REUSE_SECS = 1.0
MEMBERS_REUSE_MAX_CHANNELS = 64


def member(user_id: Any, info: dict[str, Any] | None) -> Member:
    return {"user_id": user_id, "info": info or {}}


def _user_field(user_id: Any) -> str:
    return json.dumps(user_id)


def member_key(one: Member) -> str:
    """What tells members apart: their user id (``7`` and ``"7"`` are two)."""
    return _user_field(one["user_id"])


def members_after(listed: list[Member], heard: Heard) -> list[Member]:
    """``listed`` with the joins and leaves ``heard`` since its read began, in order: the
    members as a subscriber that got those events knows them. An event the read shows
    already changes nothing (its member's next event, if any, is heard after it)."""
    by_user = {member_key(m): m for m in listed}
    for kind, changed in heard:
        if kind == "join":
            by_user[member_key(changed)] = changed
        else:
            by_user.pop(member_key(changed), None)
    return list(by_user.values())


class Listeners:
    """Records of the joins and leaves heard on channels, each kept while its owner
    listens (a member list or a view being read, ``members_after``)."""

    def __init__(self) -> None:
        self._records: dict[str, list[Heard]] = {}

    def listen(self, channel: str) -> Heard:
        heard: Heard = []
        self._records.setdefault(channel, []).append(heard)
        return heard

    def unlisten(self, channel: str, heard: Heard) -> None:
        # By identity: two records that heard the same are still two.
        records = [h for h in self._records.get(channel, ()) if h is not heard]
        if records:
            self._records[channel] = records
        else:
            self._records.pop(channel, None)

    def record(self, channel: str, kind: str, changed: Member) -> None:
        for heard in self._records.get(channel, ()):
            heard.append((kind, changed))


class PresenceStore:
    """Join, leave and list members; ``redis`` None keeps everything in this process."""

    def __init__(self, redis: Any, prefix: str, server_id: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.server_id = server_id
        self._memory: dict[str, dict[str, tuple[str, str]]] = {}  # channel -> conn -> (user, info)
        # Channel -> (when read, the read): shared by ``members`` (see MEMBERS_REUSE_SECS).
        self._listed: dict[str, tuple[float, asyncio.Future[list[Member]]]] = {}
        # This node's entries as they should be in Redis (``repair``): index entry ->
        # (channel, connection field, user, info). Recorded before Redis is asked, so a
        # join or leave that fails is put right later.
        self._mine: dict[str, tuple[str, str, str, str]] = {}
        # A join or leave failed since the last repair: compare entry by entry.
        self._unsure = False
        self._repairing = asyncio.Lock()
        # This node's entries whose leave failed (index entry -> channel, user, info):
        # Redis may have lost them with its data, or made the leave and lost the answer,
        # and then only these say that the member may have left (``_put_right``).
        self._leaving: dict[str, tuple[str, str, str]] = {}
        # The records of those who listen to a channel's joins and leaves (``listen``).
        self._listening = Listeners()
        # Set by the running node where its channel layer allows: then every join and
        # leave this store reports has been sent to the channel's nodes already.
        self.relay: PresenceRelay | None = None
        # Set by the node when it writes lifecycle events: then the scripts write the
        # member events of the joins and leaves they make (``MEMBER_EVENT_LUA``).
        self.events: EventLog | None = None
        if redis is not None:
            self._join = redis.register_script(_JOIN)
            self._leave = redis.register_script(_LEAVE)
            self._lost_leave = redis.register_script(_LOST_LEAVE)

    def _keys(self, channel: str, server_id: str) -> list[str]:
        base = f"{self.prefix}:presence:{channel}"
        return [
            f"{base}:conns",
            f"{base}:counts",
            f"{base}:members",
            self.node_index(server_id),
            f"{base}:leaves",
        ]

    def node_index(self, server_id: str) -> str:
        return f"{self.prefix}:presence-node:{server_id}"

    def _receipts_key(self) -> str:
        """The sorted set of this node's leave receipts (``_LEAVE``)."""
        return f"{self.prefix}:presence-left:{self.server_id}"

    async def _member_event(self, kind: str, channel: str) -> tuple[list[str], list[str | int]]:
        """The keys and arguments a script needs to write the member event of a change
        it makes on ``channel`` (none without events), once what this node emitted of
        the channel before is written: a member added goes after its channel occupied."""
        events = self.events
        if events is None:
            return [], ["", "", ""]
        await events.write_before(channel)
        return events.member_event_keys(channel), events.member_event_args(kind, channel)

    async def join(self, channel: str, connection_id: str, joined: Member) -> bool:
        """Record a connection; True when its user was not there yet (announce a join)."""
        user = _user_field(joined["user_id"])
        info = json.dumps(joined["info"])
        field = f"{self.server_id}|{connection_id}"
        if self.redis is None:
            conns = self._memory.setdefault(channel, {})
            first = all(u != user for u, _ in conns.values())
            conns[field] = (user, info)
            return first
        entry = f"{channel}|{field}"
        self._mine[entry] = (channel, field, user, info)
        return await self._join_entry(channel, field, user, info)

    async def _join_entry(self, channel: str, field: str, user: str, info: str) -> bool:
        keys = self._keys(channel, self.server_id)
        args: list[str | bytes | int] = [field, user, info, f"{channel}|{field}"]
        relay = self.relay
        if relay is None:
            args += ["", "", ""]
        else:
            joined = member(json.loads(user), json.loads(info))
            args += [
                relay.group_of(channel),
                relay.payload("join", channel, joined),
                relay.payload("leave", channel, joined),
            ]
        try:
            event_keys, event_args = await self._member_event(MEMBER_ADDED, channel)
            return bool(await self._join(keys=keys + event_keys, args=args + event_args))
        except Exception:
            self._unsure = True
            raise
        finally:
            # After the write: a list read before it must not be shared past it (the
            # other nodes drop theirs when they hear the join, ``Node._on_control``).
            self.forget_members(channel)

    async def leave(
        self, channel: str, connection_id: str, server_id: str | None = None
    ) -> Member | None:
        """Forget a connection; the member when it was its user's last (announce a leave)."""
        server_id = server_id or self.server_id
        field = f"{server_id}|{connection_id}"
        if self.redis is None:
            conns = self._memory.get(channel, {})
            gone = conns.pop(field, None)
            if not conns:  # everyone left: nothing kept for the channel
                self._memory.pop(channel, None)
            if gone is None or any(u == gone[0] for u, _ in conns.values()):
                return None
            return member(json.loads(gone[0]), json.loads(gone[1]))
        entry = f"{channel}|{field}"
        own = server_id == self.server_id
        mine = self._mine.pop(entry, None) if own else None
        group = self.relay.group_of(channel) if self.relay is not None else ""
        try:
            event_keys, event_args = await self._member_event(MEMBER_REMOVED, channel)
            # A receipt for this node's own leaves: only they are asked about again.
            keep: list[str | int] = (
                [LEAVE_RECEIPT_SECS * 1000, LEAVE_RECEIPTS_KEPT] if own and event_keys else ["", ""]
            )
            result = await self._leave(
                keys=[*self._keys(channel, server_id), *event_keys, self._receipts_key()],
                args=[field, entry, group, *event_args, *keep],
            )
            if not result:
                return None
            left = member(json.loads(_text(result[0])), json.loads(_text(result[1])))
            if not result[2]:  # joined by a node that kept no leave to send
                await self._publish("leave", channel, left)
        except Exception:
            self._unsure = True
            if mine is not None:
                self._leaving[entry] = (channel, mine[2], mine[3])
            raise
        finally:
            self.forget_members(channel)
        return left

    async def _publish(self, kind: str, channel: str, changed: Member) -> None:
        """Send a join or leave no script sent to the channel's nodes, with a relay."""
        relay = self.relay
        if relay is not None:
            await self.redis.publish(relay.group_of(channel), relay.payload(kind, channel, changed))

    def members_in_memory(self, channel: str) -> list[Member]:
        seen: dict[str, str] = {}
        for user, info in list(self._memory.get(channel, {}).values()):
            seen.setdefault(user, info)
        return [member(json.loads(u), json.loads(i)) for u, i in seen.items()]

    async def members(self, channel: str, *, read_since: float | None = None) -> list[Member]:
        """The channel's members (shared with other callers: not to be changed); with
        ``read_since`` (the loop's time), from a read begun then or later."""
        if self.redis is None:
            return self.members_in_memory(channel)
        loop = asyncio.get_running_loop()
        now = loop.time()
        listed = self._listed.get(channel)
        read: asyncio.Future[list[Member]]
        if (
            listed is None
            or now - listed[0] > MEMBERS_REUSE_SECS
            or _failed(listed[1])
            or (read_since is not None and listed[0] < read_since)
        ):
            read = asyncio.ensure_future(self._read_members(channel))
            read.add_done_callback(_retrieved)
            self._listed.pop(channel, None)
            self._forget_old_reads(now)
            self._listed[channel] = (now, read)
        else:
            read = listed[1]
        # Shielded: a caller that goes away does not cancel the others' read.
        return await asyncio.shield(read)

    def _forget_old_reads(self, now: float) -> None:
        """Drop the reads past their time (oldest first: the dict is in read order) and
        the oldest past the channel bound, so no member list is held for nothing."""
        listed = self._listed
        while listed:
            oldest = next(iter(listed))
            if now - listed[oldest][0] <= MEMBERS_REUSE_SECS and (
                len(listed) < MEMBERS_REUSE_MAX_CHANNELS
            ):
                return
            del listed[oldest]

    async def _read_members(self, channel: str) -> list[Member]:
        return _members_from(await self.redis.hgetall(self._keys(channel, self.server_id)[2]))

    async def members_of(self, channels: list[str]) -> dict[str, list[Member]]:
        """The members of each of ``channels``, read in one round trip (never shared)."""
        pipe = self.redis.pipeline(transaction=False)
        for channel in channels:
            pipe.hgetall(self._keys(channel, self.server_id)[2])
        read = await pipe.execute()
        return {c: _members_from(raw) for c, raw in zip(channels, read, strict=True)}

    def forget_members(self, channel: str) -> None:
        """The channel's members changed: the next ``members`` reads them again (callers
        already waiting on a read keep it: they asked before the change)."""
        self._listed.pop(channel, None)

    def listen(self, channel: str) -> Heard:
        """Record, until ``unlisten``, the joins and leaves of ``channel`` this node
        hears: what a member list read meanwhile may not show, though the channel's
        subscribers here got it (``members_after``)."""
        return self._listening.listen(channel)

    def unlisten(self, channel: str, heard: Heard) -> None:
        self._listening.unlisten(channel, heard)

    def heard(self, channel: str, kind: str, changed: Member) -> None:
        """A join or leave announced (by any node), just before this node's subscribers
        of ``channel`` get it."""
        self.forget_members(channel)
        self._listening.record(channel, kind, changed)

    async def repair(self, announce: Announce) -> None:
        """Make Redis hold this node's entries again where it does not: after Redis
        restarted without them, or took this node for dead and reaped it, the members
        still connected here join again; an entry whose leave failed leaves (and is
        announced gone even when Redis lost it with its data). Each join or leave this
        changes is announced (the scripts decide, as ever, so once across
        the cluster). One SCARD when nothing is wrong. One repair at a time (the node
        also repairs as soon as it hears Redis again): two would both announce a lost
        leave."""
        if self.redis is None:
            return
        async with self._repairing:
            index = self.node_index(self.server_id)
            if not self._unsure and await self.redis.scard(index) == len(self._mine):
                return
            self._unsure = False
            try:
                await self._put_right(announce, index)
            except Exception:
                self._unsure = True  # compared entry by entry again next time
                raise

    async def _put_right(self, announce: Announce, index: str) -> None:
        recorded = {_text(entry) for entry in await self.redis.smembers(index)}
        for entry in [e for e in self._mine if e not in recorded]:
            mine = self._mine.get(entry)
            if mine is None:  # left meanwhile
                continue
            channel, field, user, info = mine
            if await self._join_entry(channel, field, user, info):
                await announce("join", channel, member(json.loads(user), json.loads(info)))
            if entry not in self._mine:
                # Its leave ran while this join was on its way: leave again.
                await self._leave_entry(announce, entry)
        for entry in recorded:
            if entry not in self._mine:
                await self._leave_entry(announce, entry)
                self._leaving.pop(entry, None)
        await self._announce_lost_leaves(announce, recorded)

    async def _announce_lost_leaves(self, announce: Announce, recorded: set[str]) -> None:
        """The leaves that failed and whose entries Redis did not hold: lost with its
        data (a restart while it was away), or made with their answer lost. Each member
        no longer listed (this node's own entries are back by now) is announced as
        gone, or its subscribers would list it for as long as they stay; one listed
        through another connection is there, and nothing is said. Its member_removed
        is written unless its leave's receipt says that leave wrote it (``_LOST_LEAVE``)."""
        for entry, (channel, user, info) in list(self._leaving.items()):
            if entry in recorded or entry in self._mine:
                continue
            members_key = self._keys(channel, self.server_id)[2]
            event_keys, event_args = await self._member_event(MEMBER_REMOVED, channel)
            gone = await self._lost_leave(
                keys=[members_key, self._receipts_key(), *event_keys],
                args=[user, *event_args, entry],
            )
            if gone:
                left = member(json.loads(user), json.loads(info))
                await self._publish("leave", channel, left)
                await announce("leave", channel, left)
            self._leaving.pop(entry, None)

    async def _leave_entry(self, announce: Announce, entry: str) -> None:
        if entry in self._mine:  # joined again meanwhile
            return
        channel, _, field = entry.partition("|")
        left = await self.leave(channel, field[len(self.server_id) + 1 :])
        if left is not None:
            await announce("leave", channel, left)

    async def entries_of(self, server_id: str) -> list[tuple[str, str]]:
        """(channel, connection id) of every presence a node recorded (to reap it)."""
        if self.redis is None:
            return []
        entries = await self.redis.smembers(self.node_index(server_id))
        result = []
        for entry in entries:
            channel, _, connection_id = _text(entry).split("|", 2)
            result.append((channel, connection_id))
        return result


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _failed(read: asyncio.Future[list[Member]]) -> bool:
    return read.done() and (read.cancelled() or read.exception() is not None)


def _retrieved(read: asyncio.Future[list[Member]]) -> None:
    # A failed read's error is raised to its callers; marked seen here so that a read
    # nobody awaited any more is not logged as a lost exception.
    if not read.cancelled():
        read.exception()


def _members_from(raw: dict[Any, Any]) -> list[Member]:
    return [member(json.loads(_text(user)), json.loads(_text(info))) for user, info in raw.items()]


def presence_members_sync(channel: str, *, local: PresenceStore | None) -> list[Member]:
    """The members of ``channel``, from synchronous code (the REST API). Without Redis
    they are in this process's memory: ``local``, the running node's store, if any."""
    from django.conf import settings

    if not settings.REDIS_URL:
        return local.members_in_memory(channel) if local is not None else []
    client = redis_sync(socket_connect_timeout=2, socket_timeout=5)
    try:
        return _members_from(client.hgetall(_members_key(channel)))  # type: ignore[arg-type]  # redis-py types sync and asyncio commands alike
    finally:
        client.close()


def presence_counts_sync(channels: list[str], *, local: PresenceStore | None) -> dict[str, int]:
    """How many members each of ``channels`` has, from synchronous code (the REST
    channel info and list): counted in Redis, all in one round trip, never read whole
    (a page of the list may name a thousand presence channels)."""
    from django.conf import settings

    if not settings.REDIS_URL or not channels:
        return {c: len(local.members_in_memory(c)) if local is not None else 0 for c in channels}
    client = redis_sync(socket_connect_timeout=2, socket_timeout=5)
    try:
        pipe = client.pipeline(transaction=False)
        for channel in channels:
            pipe.hlen(_members_key(channel))
        return dict(zip(channels, pipe.execute(), strict=True))
    finally:
        client.close()


def _members_key(channel: str) -> str:
    return f"{redis_prefix()}:presence:{channel}:members"


def presence_member(
    principal: Principal, connection_id: uuid.UUID, claims: dict[str, Any] | None
) -> dict[str, Any]:
    """Who a connection is on a presence channel: its user, or the identity a signed
    subscription token names (``user_id`` and ``info`` in its claims)."""
    if claims is not None and "user_id" in claims:
        return member(claims["user_id"], claims.get("info"))
    if principal.kind == "user":
        return member(principal.id, {"username": principal.name})
    if principal.kind == "service":
        return member(principal.key, {"service": principal.name})
    info = claims.get("info") if claims else None
    return member(str(connection_id), info)


async def leave_presence(
    presence: PresenceStore, announce: Announce, connection_id: str, channels: list[str]
) -> None:
    for channel in channels:
        try:
            left = await presence.leave(channel, connection_id)
            if left is not None:
                await announce("leave", channel, left)
        except Exception as exc:  # Redis down: the dead-node reaper is not for this node
            logger.warning("presence leave on %s failed: %s", channel, exc)
