"""The cluster as operators see it: which nodes are alive, what each one serves, and
commands that reach every node (disconnect a connection or a user).

Each node writes a liveness key with its stats to Redis every
``PUSH_CLUSTER_ANNOUNCE_SECS`` (expiring after three of those) and keeps a score in a
sorted set of nodes. A node whose score is older than ``PUSH_NODE_DEAD_AFTER_SECS``
died without draining: the next node to notice marks that node's connections closed
in the registry. Commands travel over
the channel layer's control group, which every node joins. Without Redis (one
process) the directory is that process alone.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from common.errors import CloseCode
from common.redis_client import redis_async, redis_prefix, redis_sync

logger = logging.getLogger(__name__)

# The node's connections to Redis for its own work (directory, presence, events, the
# recent-history cache, occupancy counts). A burst (thousands of channels joined or
# left at once) queues on them, each command a round trip of well under a millisecond,
# instead of opening a connection per command that runs at the same moment.
NODE_REDIS_CONNECTIONS = 16
CONTROL_GROUP = "push.control"
DISCONNECT_EVENT = "push.disconnect"
TOP_CHANNELS = 100


def node_key(server_id: str) -> str:
    return f"{redis_prefix()}:node:{server_id}"


def nodes_key() -> str:
    return f"{redis_prefix()}:nodes"


class NodeDirectory:
    """This node's side: announce itself, and reap nodes that died."""

    def __init__(
        self, redis_url: str | None, server_id: str, *, announce_secs: float, dead_after_secs: float
    ) -> None:
        self.server_id = server_id
        self.announce_secs = announce_secs
        self.dead_after_secs = dead_after_secs
        self._redis: Any = None
        self.prefix = redis_prefix()
        # This process' mark in its announcements: another one under its name, written
        # since its own last one, is another live process with the same NODE_ID.
        self.instance = secrets.token_hex(8)
        self._announced = False
        if redis_url:
            self._redis = redis_async(
                max_connections=NODE_REDIS_CONNECTIONS, socket_connect_timeout=2, socket_timeout=5
            )

    async def announce(self, stats: dict[str, Any]) -> bool:
        """Announce this node alive; True when the directory did not list it (its first
        announcement, or it was taken for dead and forgotten, or Redis lost its data)."""
        if self._redis is None:
            return False
        now = await self._redis_now()
        key = node_key(self.server_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            ttl_secs = max(1, int(self.announce_secs * 3))
            pipe.get(key)
            pipe.set(key, json.dumps({**stats, "instance": self.instance}), ex=ttl_secs)
            pipe.zadd(nodes_key(), {self.server_id: now})
            previous, _, added = await pipe.execute()
        if self._announced and _instance_of(previous) not in (None, self.instance):
            # (A first announcement may find a previous run's: started again after a crash.)
            logger.error(
                "another process announces itself as node %s: give each node its own "
                "NODE_ID (meanwhile both undo each other's presence, occupancy and "
                "registry rows)",
                self.server_id,
            )
        self._announced = True
        return bool(added)

    @property
    def redis(self) -> Any:
        return self._redis

    async def withdraw(self) -> None:
        if self._redis is None:
            return
        await self._redis.delete(node_key(self.server_id))
        await self._redis.zrem(nodes_key(), self.server_id)

    async def dead_nodes(self) -> list[str]:
        if self._redis is None:
            return []
        cutoff = await self._redis_now() - self.dead_after_secs
        members = await self._redis.zrangebyscore(nodes_key(), "-inf", cutoff)
        return [m.decode() if isinstance(m, bytes) else m for m in members]

    async def _redis_now(self) -> float:
        """Redis' clock, by which every node stamps its announcements and judges the
        others': with each host's own, one whose clock ran ahead of the others by more
        than the dead age took them all for dead at every turn, and one behind was taken
        for dead by all."""
        seconds, micros = await self._redis.time()
        return float(seconds) + micros / 1_000_000

    async def forget(self, server_id: str) -> None:
        if self._redis is not None:
            await self._redis.zrem(nodes_key(), server_id)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def _instance_of(announcement: bytes | None) -> str | None:
    """The process mark of an announcement (None: none, or not one of ours)."""
    try:
        return str(json.loads(announcement)["instance"]) if announcement else None
    except (ValueError, KeyError, TypeError):
        return None


def cluster_nodes(*, local: Callable[[], dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Every live node's last announcement (admin). Sync; reads Redis when configured,
    else the cluster is this process: ``local`` gives its running node's stats, if any."""
    redis_url = getattr(settings, "REDIS_URL", None)
    if not redis_url:
        return [local()] if local is not None else []
    client = redis_sync(socket_connect_timeout=2, socket_timeout=5)
    try:
        ids = [m.decode() for m in client.zrange(nodes_key(), 0, -1)]  # type: ignore[union-attr]  # redis-py types sync and asyncio commands alike
        raw = client.mget([node_key(i) for i in ids]) if ids else []
    finally:
        client.close()
    return [json.loads(value) for value in raw if value]  # type: ignore[union-attr]  # as above


def connections_disconnect(
    *,
    connection_ids: list[str] | None = None,
    user_ids: list[int] | None = None,
    pusher_user_ids: list[str] | None = None,
    code: int = CloseCode.POLICY,
) -> None:
    """Close these connections, and every connection of these users (Django users, or
    the users Pusher connections signed in as), on every node."""
    event = {
        "type": DISCONNECT_EVENT,
        "connection_ids": [str(c) for c in connection_ids or []],
        "user_ids": [int(u) for u in user_ids or []],
        "pusher_user_ids": [str(u) for u in pusher_user_ids or []],
        "code": int(code),
    }
    layer = get_channel_layer()
    if layer is None:
        return
    async_to_sync(layer.group_send)(CONTROL_GROUP, event)
