"""Every Redis client of the project is made here, so one setting decides how Redis is
found for all of them: the channel layer, the cluster directory, presence, lifecycle
events, the readiness check, the admin and Django's cache.

``REDIS_URL`` alone: that server (any Redis, a managed one, ``rediss://`` for TLS).
With ``REDIS_SENTINELS`` (``host:port`` of each Sentinel) the clients ask Sentinel for
the current master of ``REDIS_SENTINEL_MASTER`` and ask again after a failover;
``REDIS_URL`` then still gives the database number and the password, not the host.

This module imports no settings at import time: ``realtime_project.settings`` uses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis
from redis import asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.connection import parse_url
from redis.exceptions import NoScriptError, ResponseError
from redis.sentinel import Sentinel, SentinelConnectionPool

# How long to wait for a Sentinel to answer which server is the master.
SENTINEL_TIMEOUT_SECS = 2.0
# How long a command of a bounded client waits for a free connection before it fails.
POOL_WAIT_SECS = 5.0
# The channel layer's connect and read deadlines. It publishes under one lock per shard:
# without a read deadline, one PUBLISH on a connection whose packets vanish (a network
# that drops it without a reset) held every later one for as long as the kernel kept
# the connection, minutes. Its pub/sub reads wait with deadlines of their own, and the
# broker reads the channels' groups on connections without one (group_subscriber).
LAYER_CONNECT_TIMEOUT_SECS = 2.0
LAYER_SOCKET_TIMEOUT_SECS = 5.0


def sentinel_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as redis-py's Sentinel takes it."""
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a Sentinel address is host:port, not {text!r}")
    return host.strip("[]"), int(port)


def master_options(url: str) -> dict[str, Any]:
    """What of ``url`` still applies when Sentinel names the host: database, user,
    password. The connection class is Sentinel's own."""
    options = parse_url(url)
    for key in ("host", "port", "connection_class", "path"):
        options.pop(key, None)
    return options


def channel_layer_host(url: str, sentinels: list[tuple[str, int]], master: str) -> dict[str, Any]:
    """One entry of the channel layer's ``hosts``: channels-redis builds a pool from the
    ``address`` and the other keys, or a Sentinel pool from ``sentinels`` and
    ``master_name``."""
    deadlines = {
        "socket_connect_timeout": LAYER_CONNECT_TIMEOUT_SECS,
        "socket_timeout": LAYER_SOCKET_TIMEOUT_SECS,
    }
    if not sentinels:
        return {"address": url, **deadlines}
    return {
        "sentinels": sentinels,
        "master_name": master,
        "sentinel_kwargs": {"socket_timeout": SENTINEL_TIMEOUT_SECS},
        **master_options(url),
        **deadlines,
    }


def is_settings_layer_host(host: Any) -> bool:
    """Whether a shard of the channel layer (its ``host`` as channels-redis decoded it)
    is the server the settings' ``REDIS_URL`` names, as the settings build the layer's
    hosts: the same server as this process' own Redis clients."""
    from channels_redis.utils import decode_hosts  # type: ignore[import-untyped]  # no stubs

    try:
        ours = channel_layer_host(*_settings())
    except RuntimeError:
        return False
    return bool(_server_of(decode_hosts([ours])[0]) == _server_of(host))


def _server_of(host: dict[str, Any]) -> dict[str, Any]:
    """A layer host's entry without its deadlines: which server, not how long to wait."""
    return {key: value for key, value in host.items() if key not in _LAYER_DEADLINES}


_LAYER_DEADLINES = ("socket_connect_timeout", "socket_timeout")


def _settings() -> tuple[str, list[tuple[str, int]], str]:
    from django.conf import settings

    if not settings.REDIS_URL:
        raise RuntimeError("no REDIS_URL: this process runs without Redis")
    return settings.REDIS_URL, settings.REDIS_SENTINELS, settings.REDIS_SENTINEL_MASTER


def redis_prefix() -> str:
    """The prefix of every key the project writes to Redis: the channel layer's own, so
    one ``REDIS_PREFIX`` keeps a deployment's keys and groups apart from another's."""
    from django.conf import settings

    return str(settings.REDIS_PREFIX)


def redis_sync(**options: Any) -> redis.Redis:
    return _client(redis.Redis, Sentinel, options)


def redis_async(*, max_connections: int | None = None, **options: Any) -> aioredis.Redis:
    """An asyncio client. With ``max_connections``, a command that finds that many in
    use waits (up to ``POOL_WAIT_SECS``) for one to come back instead of opening
    another: without a bound, every command running at the same moment opens a
    connection of its own and the pool keeps them all (measured: a node joining 300
    channels at once opened 300, each on the event loop)."""
    if max_connections is None:
        return _client(aioredis.Redis, AsyncSentinel, options)
    url, sentinels, master = _settings()
    bound = {"max_connections": max_connections, "timeout": POOL_WAIT_SECS}
    if not sentinels:
        pool = aioredis.BlockingConnectionPool.from_url(url, **bound, **options)
        return aioredis.Redis.from_pool(pool)
    sentinel = _sentinel(AsyncSentinel, sentinels)
    return sentinel.master_for(
        master,
        connection_pool_class=BlockingSentinelPool,
        **master_options(url),
        **bound,
        **options,
    )


# Each event loop's named clients (an asyncio client belongs to the loop it runs on).
_loop_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def loop_client(name: str, **options: Any) -> aioredis.Redis:
    """The running loop's client called ``name``, made on first use with ``options``
    (a bound ``max_connections`` among them) and named in ``CLIENT LIST``."""
    clients = _loop_clients.setdefault(asyncio.get_running_loop(), {})
    client = clients.get(name)
    if client is None:
        client = clients[name] = redis_async(client_name=f"{redis_prefix()}-{name}", **options)
    return client


class BlockingSentinelPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool of the master's connections, with the blocking pool's bound."""


def _client(redis_class: Any, sentinel_class: Any, options: dict[str, Any]) -> Any:
    url, sentinels, master = _settings()
    if not sentinels:
        return redis_class.from_url(url, **options)
    sentinel = _sentinel(sentinel_class, sentinels)
    return sentinel.master_for(master, **master_options(url), **options)


def _sentinel(sentinel_class: Any, sentinels: list[tuple[str, int]]) -> Any:
    return sentinel_class(sentinels, sentinel_kwargs={"socket_timeout": SENTINEL_TIMEOUT_SECS})


class CacheSentinelPool(SentinelConnectionPool):
    """Django's Redis cache builds its pool with ``pool_class.from_url(LOCATION, ...)``:
    this one answers with the Sentinel-managed pool of the configured master."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> CacheSentinelPool:
        _, sentinels, master = _settings()
        # What the URL names wins over the cache's OPTIONS, as redis-py's own from_url has it.
        return cls(master, _sentinel(Sentinel, sentinels), **{**options, **master_options(url)})


def script_argument(values: list[Any]) -> bytes:
    """``values`` (strings, bytes and integers) as one argument of a Lua script, which
    reads it with ``cmsgpack.unpack``. A batch goes to Redis as one argument, not one or
    more per message, because redis-py builds a command in Python argument by argument,
    copying the buffer so far for each small one (measured: about 0.9 µs of the node's
    CPU per argument, against 0.08 µs per message in one array). Raw strings only
    (``use_bin_type=False``): the MessagePack of Redis' Lua predates the bin and str8
    types."""
    return msgpack.packb(values, use_bin_type=False)


@dataclass(frozen=True)
class LuaScript:
    """A Lua script by its source and SHA1, as ``EVALSHA`` names it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        # Redis names scripts by SHA1; not a security use.
        digest = hashlib.sha1(self.source.encode(), usedforsecurity=False)
        object.__setattr__(self, "sha", digest.hexdigest())


class HeldConnection:
    """One connection of a client's pool, held by one caller that sends one command at
    a time, for the node's commands of every write batch (broadcast, recent cache,
    recent channels' numbering, kept-token checks).

    A command goes straight through redis-py's ``Connection`` (it packs, sends and
    parses as the client would): the client's per-command pool check-out (a lock, a
    liveness check and, in redis-py 7, connection-count metrics), retry wrapper and
    reply callbacks are skipped. Measured here with a script call of 2 KB: 90 us of
    the caller's CPU per call through the client, 67 with a single-connection client,
    43 this way. A connection that failed, or a command given up half way (its
    caller cancelled), is closed and put back, and the next command takes another one.
    One the server closed while it was held idle (Redis restarted) is noticed before a
    command is sent on it: that costs a reconnect, not the command. A connection lost
    with a command under way fails that command; the client would have sent it again
    on a new connection, not knowing whether it ran, which a script that numbers
    messages must not do twice."""

    def __init__(self, pool: Callable[[], Any], *, write_at_once: bool = False) -> None:
        self._pool = pool  # the pool to take from now (a layer may replace its client)
        self._connection: Any = None
        self._taken_from: Any = None
        # ``_write_now``, for the recent store's numbering lanes, which wait for each
        # reply (the node 0.96 of a core busy instead of 0.92, +3% recent-only
        # publishes/s over three alternating pairs). Written at once on every held
        # connection, fan-out at 5,000 subscribers fell ~10% (four alternating pairs,
        # 7.0 -> 8.0 us of CPU per delivery): probably fewer messages shared a write
        # once the kept-token reads and the cache's appends came back sooner.
        self._write_at_once = write_at_once
        # Whether the last command left for Redis: one that then failed may have run.
        self.sent = False

    async def execute(self, *args: Any) -> Any:
        """The reply to one command; a Redis error reply raises ``ResponseError``."""
        self.sent = False
        connection = self._connection
        if connection is not None and _closed_by_server(connection):
            await self.release(broken=True)  # Redis restarted while it was idle
            connection = None
        if connection is None:
            connection = await self._take()
        try:
            self.sent = True
            if not (self._write_at_once and _write_now(connection, args)):
                await connection.send_packed_command(pack_command(args), check_health=False)
            return await connection.read_response()
        except ResponseError:
            raise  # an answer: the connection is in step
        except BaseException:
            await self.release(broken=True)
            raise

    async def run_script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``EVALSHA``, or ``EVAL`` (which caches it again) after Redis forgot it."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def release(self, *, broken: bool = False) -> None:
        """Put the connection back (closed first when ``broken``)."""
        connection, pool = self._connection, self._taken_from
        self._connection = self._taken_from = None
        if connection is None:
            return
        try:
            if broken:
                await connection.disconnect(nowait=True)
            await pool.release(connection)
        except Exception:  # noqa: S110  # already closed: nothing is left to free
            pass

    async def _take(self) -> Any:
        pool = self._pool()
        connection = await pool.get_connection()
        self._connection, self._taken_from = connection, pool
        return connection


def pack_command(args: Sequence[str | bytes | int | float]) -> bytes:
    """A command in RESP, as redis-py's ``Connection.pack_command`` makes it for these
    argument types (text as UTF-8, numbers in decimal), in one join: redis-py's copies
    its buffer so far for each argument, which cost a script call with a key and a
    count per channel about as much as the round trip.

    Packed by hiredis where it is installed, as redis-py's own sync connections pack
    theirs: a publish's script call of 13 arguments cost 3.5 us in Python, 1.2 us so.
    What hiredis does not take (an ``int`` subclass, arguments not in a tuple) is packed
    here, and a value Redis would not read back as sent is refused here (hiredis also
    takes a ``memoryview``, packed as its bytes)."""
    if _HIREDIS_PACK is not None:
        try:
            return _HIREDIS_PACK(args)
        except TypeError:
            pass
    return _packed_here(args)


def _hiredis_pack_command() -> Callable[[Any], bytes] | None:
    """hiredis' packer, if installed: optional, as it is for redis-py (the project's
    requirements.txt installs it)."""
    try:
        import hiredis
    except ImportError:
        return None
    packer: Callable[[Any], bytes] = hiredis.pack_command
    return packer


_HIREDIS_PACK = _hiredis_pack_command()


def _packed_here(args: Sequence[str | bytes | int | float]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"a Redis argument is text, bytes or a number, not {type(arg)}")
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


def _write_now(connection: Any, args: Sequence[Any]) -> bool:
    """Write a command to ``connection``'s transport buffer at once; False, with nothing
    written, when redis-py does not expose its writer or it is closing. redis-py's own
    send runs under ``asyncio.wait_for`` when the client has a socket timeout (the
    recent store's does): a task per command, sent a loop turn later. The reply's read
    keeps the timeout, and a held connection sends nothing more before it."""
    writer = getattr(connection, "_writer", None)
    if writer is None or not connection.is_connected or writer.transport.is_closing():
        return False
    writer.write(pack_command(args))
    return True


def _closed_by_server(connection: Any) -> bool:
    """Whether the server closed this connection (its end of the stream was read), or
    it is not connected at all. (A redis-py without the stream reader this looks at
    counts as open: a command on a closed connection then fails as it would.)"""
    reader = getattr(connection, "_reader", None)
    if reader is None:
        return not getattr(connection, "is_connected", True)
    return bool(reader.at_eof())
