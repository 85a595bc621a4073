"""The node's subscriptions to its channels' groups, read on Redis connections of their
own instead of through the channel layer.

Channels' Redis pub/sub layer reads its subscriptions one message at a time through
redis-py's ``PubSub.get_message`` (a timeout, a dict, a queue and a task wake-up per
message before the broker sees it): measured here, 9-11 µs of the node's CPU per
message received, against 2.3 µs reading the replies of the same kind of connection
directly (``Connection.read_response``). A node receives every message of every channel
it serves, its own included (Redis sends a publisher's messages back to it too), so that
was about a tenth of a node's CPU while publishing over WebSocket and a sixth while
publishing REST batches.

Only the reading changed: the groups are the layer's own (the same Redis channel names,
shards and serializer), so nodes of both kinds talk to each other. The node's control
group is read here too (``Broker.join_group``); its inbox stays on the layer. Used with
``RedisPubSubChannelLayer``; any other layer is read through the layer
(``GroupSubscribers.for_layer`` answers None).

Failures:
- ``subscribe`` returns once Redis confirmed the subscription (the hub reads a
  channel's last seq only after that, so nothing published later is missed); while
  the connection is down it raises at once, as the layer did;
- a connection that breaks is opened again every ``RECONNECT_SECS``, and every group is
  subscribed again; what was published meanwhile is missed here and repaired as any
  loss between nodes is (the hub's gap detection and its periodic sync with history;
  presence joins and leaves by ``push.cluster.presence_views``, told by
  ``on_resubscribed``);
- a connection that goes silent without a reset is found by a PING sent when nothing
  came for ``PING_SECS``, and given up when nothing came for one more;
- an ``unsubscribe`` whose UNSUBSCRIBE cannot be sent raises and gives the connection
  up: opened again, it subscribes only the groups still wanted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError

from common.background import spawn

logger = logging.getLogger(__name__)

RECONNECT_SECS = 0.5
PING_SECS = 5.0
SUBSCRIBE_TIMEOUT_SECS = 5.0
CONNECT_TIMEOUT_SECS = 5.0

_FAILURES = (RedisError, OSError, TimeoutError)


class ShardSubscriber:
    """The groups of one Redis shard, on one connection, read by one task."""

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        on_message: Callable[[bytes], None],
        on_error: Callable[[BaseException], None],
        on_resubscribed: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._on_message = on_message
        self._on_error = on_error
        self._on_resubscribed = on_resubscribed
        # A connection was open before: the next one follows a failure.
        self._was_connected = False
        # PING tokens sent by ``heard_all_before``, until their PONG comes.
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._ping_tokens = itertools.count()
        self._groups: set[str] = set()
        # Connected, with every group of ``_groups`` subscribed (or being subscribed).
        self._connection: AbstractConnection | None = None
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._replies = 0
        self._task: asyncio.Task[None] | None = None
        # The current attempt to connect: pending while it is under way, failed from a
        # failure until the next attempt starts.
        self._ready: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self._task = spawn(self._run(), name="push-broker-subscriber")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None

    async def subscribe(self, group: str) -> None:
        connection = await self._connected()
        self._groups.add(group)
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(group.encode(), []).append(confirmed)
        try:
            await connection.send_command("SUBSCRIBE", group, check_health=False)
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECS):
                await confirmed
        except BaseException:
            self._groups.discard(group)
            waiting = self._confirmations.get(group.encode(), [])
            if confirmed in waiting:
                waiting.remove(confirmed)
            raise

    async def _connected(self) -> AbstractConnection:
        """The connection; while one is being opened, once it is. Raises at once while
        Redis cannot be reached (between two attempts), as the layer did."""
        ready = self._ready
        if self._connection is None and ready is not None and not ready.done():
            async with asyncio.timeout(CONNECT_TIMEOUT_SECS + SUBSCRIBE_TIMEOUT_SECS):
                await asyncio.shield(ready)
        connection = self._connection
        if connection is None:
            raise ConnectionError("not connected to Redis")
        return connection

    async def unsubscribe(self, group: str) -> None:
        self._groups.discard(group)
        connection = self._connection
        if connection is not None:
            # Not waited for: a message that still comes is one the hub does not need.
            try:
                await connection.send_command("UNSUBSCRIBE", group, check_health=False)
            except BaseException:
                # Unsent, the group would be read until the connection broke (redis-py
                # gives up a connection whose write failed; this does not count on it):
                # opened again, it subscribes only the groups still wanted.
                await connection.disconnect(nowait=True)
                raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            ready = self._ready
            if ready is None or ready.done():
                self._ready = ready = loop.create_future()
            try:
                connection = await self._connect()
            except Exception as exc:  # a bug too: the node must go on reading
                self._failed(exc, ready)
                await asyncio.sleep(RECONNECT_SECS)
                continue
            ready.set_result(None)
            if self._was_connected and self._on_resubscribed is not None:
                self._on_resubscribed()
            self._was_connected = True
            watchdog = spawn(self._watch(connection), name="push-broker-subscriber-ping")
            try:
                await self._read(connection)
            except Exception as exc:
                self._ready = ready = loop.create_future()
                self._failed(exc, ready)
            finally:
                self._connection = None
                watchdog.cancel()
                await connection.disconnect(nowait=True)
            await asyncio.sleep(RECONNECT_SECS)

    async def _connect(self) -> AbstractConnection:
        kwargs: dict[str, Any] = dict(self._pool.connection_kwargs)
        # Read without a timeout (an idle connection is normal here: the watchdog finds
        # a dead one); connect with one.
        kwargs["socket_timeout"] = None
        kwargs["socket_connect_timeout"] = kwargs.get("socket_connect_timeout") or (
            CONNECT_TIMEOUT_SECS
        )
        connection: AbstractConnection = self._pool.connection_class(**kwargs)
        await connection.connect()
        if self._groups:
            await connection.send_command("SUBSCRIBE", *sorted(self._groups), check_health=False)
        self._connection = connection
        return connection

    async def _read(self, connection: AbstractConnection) -> None:
        read = connection.read_response
        on_message = self._on_message
        while True:
            reply = await read(disable_decoding=True)
            self._replies += 1
            if type(reply) is list and reply[0] == b"message":
                on_message(reply[2])
            elif type(reply) is list and reply[0] == b"subscribe":
                for confirmed in self._confirmations.pop(reply[1], ()):
                    if not confirmed.done():
                        confirmed.set_result(None)
            elif type(reply) is list and reply[0] == b"pong":
                pong = self._pongs.pop(reply[1], None)
                if pong is not None and not pong.done():
                    pong.set_result(None)

    @property
    def connected(self) -> bool:
        """Whether a connection is open (it may be found broken later)."""
        return self._connection is not None

    async def heard_all_before(self) -> None:
        """Return once every message Redis sent this connection before now was read (and
        its groups' subscriptions, sent before, confirmed): a PING on the connection, whose
        answer Redis queues behind them. Raises while the connection is down."""
        connection = await self._connected()
        token = str(next(self._ping_tokens)).encode()
        pong = self._pongs[token] = asyncio.get_running_loop().create_future()
        try:
            await connection.send_command("PING", token, check_health=False)
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECS):
                await pong
        finally:
            self._pongs.pop(token, None)

    async def _watch(self, connection: AbstractConnection) -> None:
        """PING a connection that was silent for ``PING_SECS``; give it up when the
        answer does not come within as long again."""
        seen = self._replies
        pinged = False
        while True:
            await asyncio.sleep(PING_SECS)
            if self._replies != seen:
                seen, pinged = self._replies, False
                continue
            if pinged:
                logger.warning("broker subscriber: Redis did not answer a PING; reconnecting")
                await connection.disconnect(nowait=True)
                return
            try:
                await connection.send_command("PING", check_health=False)
            except _FAILURES:
                return  # the reader sees the connection fail too
            pinged = True

    def _failed(self, exc: BaseException, ready: asyncio.Future[None]) -> None:
        if isinstance(exc, _FAILURES):
            logger.warning("broker subscriber: %s", exc)
        else:
            logger.exception("broker subscriber failed; reconnecting", exc_info=exc)
        ready.set_exception(ConnectionError(f"Redis unavailable: {exc}"))
        ready.exception()  # retrieved: nobody may be waiting
        self._on_error(exc)


class GroupSubscribers:
    """One ``ShardSubscriber`` per shard of a ``RedisPubSubChannelLayer``, each group
    on the shard the layer itself would use for it."""

    def __init__(
        self,
        layer: Any,
        *,
        on_message: Callable[[bytes], None],
        on_error: Callable[[BaseException], None],
        on_resubscribed: Callable[[], None] | None = None,
    ) -> None:
        self._layer = layer
        self._on_message = on_message
        self._on_error = on_error
        self._on_resubscribed = on_resubscribed
        self._shards: dict[int, ShardSubscriber] = {}

    @classmethod
    def for_layer(
        cls,
        layer: Any,
        *,
        on_message: Callable[[bytes], None],
        on_error: Callable[[BaseException], None],
        on_resubscribed: Callable[[], None] | None = None,
    ) -> GroupSubscribers | None:
        """Subscribers for ``layer``, or None when it is not a layer whose groups this
        can read (it reads attributes the layer does not document, and checks each)."""
        try:
            from channels_redis.pubsub import (  # type: ignore[import-untyped]  # no stubs
                RedisPubSubChannelLayer,
            )
        except ImportError:
            return None
        if not isinstance(layer, RedisPubSubChannelLayer):
            return None
        try:
            loop_layer = layer._get_layer()
        except RuntimeError:  # no running loop: not called from a node
            return None
        needed = ("_get_group_channel_name", "_get_shard", "_shards")
        if not all(hasattr(loop_layer, name) for name in needed):
            return None
        if not all(isinstance(getattr(s, "host", None), dict) for s in loop_layer._shards):
            return None
        if not hasattr(layer, "deserialize"):
            return None
        return cls(layer, on_message=on_message, on_error=on_error, on_resubscribed=on_resubscribed)

    def start(self) -> None:
        from channels_redis.utils import create_pool  # type: ignore[import-untyped]  # no stubs

        loop_layer = self._layer._get_layer()
        for index, shard in enumerate(loop_layer._shards):
            subscriber = ShardSubscriber(
                create_pool(shard.host),
                on_message=self._on_message,
                on_error=self._on_error,
                on_resubscribed=self._on_resubscribed,
            )
            self._shards[index] = subscriber
            subscriber.start()

    async def stop(self) -> None:
        for subscriber in self._shards.values():
            await subscriber.stop()
        self._shards.clear()

    def _shard_of(self, group: str) -> tuple[ShardSubscriber, str]:
        loop_layer = self._layer._get_layer()
        group_channel = loop_layer._get_group_channel_name(group)
        shard = loop_layer._get_shard(group_channel)
        return self._shards[loop_layer._shards.index(shard)], group_channel

    async def subscribe(self, group: str) -> None:
        subscriber, group_channel = self._shard_of(group)
        await subscriber.subscribe(group_channel)

    async def unsubscribe(self, group: str) -> None:
        subscriber, group_channel = self._shard_of(group)
        await subscriber.unsubscribe(group_channel)

    def hears(self, group: str) -> bool:
        """Whether ``group``'s connection is open: what is published to it now arrives."""
        return self._shard_of(group)[0].connected

    async def heard_all_before(self, groups: Iterable[str]) -> None:
        """Return once every message Redis sent before now to ``groups`` was read
        (``ShardSubscriber.heard_all_before``): one PING per shard they are on."""
        shards = {id(s): s for s in (self._shard_of(group)[0] for group in groups)}
        await asyncio.gather(*(shard.heard_all_before() for shard in shards.values()))
