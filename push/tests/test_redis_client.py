"""How the Redis settings become clients: a URL, or Sentinel plus the URL's database
and password (the failover itself is shown in tests/faults/test_redis_sentinel.py); and
the connection the node's per-batch commands hold, against the real Redis."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from typing import Any

import pytest
from django.conf import settings
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.connection import parse_url
from redis.exceptions import RedisError, ResponseError

from common import redis_client
from common.redis_client import (
    HeldConnection,
    LuaScript,
    channel_layer_host,
    master_options,
    pack_command,
    redis_async,
    sentinel_address,
)
from push.tests.redis_proxy import Proxy


def test_sentinel_addresses_parse_with_ipv6_and_spaces() -> None:
    assert sentinel_address(" sentinel-1:26379") == ("sentinel-1", 26379)
    assert sentinel_address("[::1]:26380") == ("::1", 26380)
    with pytest.raises(ValueError):
        sentinel_address("sentinel-1")


def test_with_sentinel_the_url_gives_database_and_password_only() -> None:
    options = master_options("redis://app:secret@ignored.example:6390/3")
    assert options == {"username": "app", "password": "secret", "db": 3}


def test_channel_layer_host_is_the_url_or_a_sentinel_dict() -> None:
    url = "redis://:pw@unused/2"
    assert channel_layer_host(url, [], "mymaster")["address"] == url
    host = channel_layer_host(url, [("s1", 26379)], "mymaster")
    assert isinstance(host, dict)
    assert host["sentinels"] == [("s1", 26379)] and host["master_name"] == "mymaster"
    assert host["db"] == 2 and host["password"] == "pw"


async def test_a_group_send_on_a_connection_redis_stopped_answering_fails_and_the_next_works() -> (
    None
):
    """The channel layer's connections had no read timeout, and each shard publishes
    under one lock: one PUBLISH on a connection whose packets vanished (a network that
    dropped it without a reset) held every presence announcement, client event and
    admin disconnect of the node for as long as the kernel kept the connection, minutes.
    It fails after the layer's timeout now, and the next one takes a new connection."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis")
    from channels_redis.pubsub import RedisPubSubChannelLayer  # type: ignore[import-untyped]  # no stubs

    target = parse_url(str(settings.REDIS_URL))
    proxy = Proxy((target.get("host", "127.0.0.1"), int(target.get("port", 6379))))
    port = await proxy.start()
    url = f"redis://127.0.0.1:{port}/{target.get('db', 0)}"
    layer = RedisPubSubChannelLayer(hosts=[channel_layer_host(url, [], "unused")])
    try:
        await layer.group_send("layer-timeout-test", {"type": "test"})
        proxy.frozen = True
        with pytest.raises(RedisError):
            # Bounded here too, so that the bug fails the test instead of hanging it.
            async with asyncio.timeout(redis_client.LAYER_SOCKET_TIMEOUT_SECS + 5):
                await layer.group_send("layer-timeout-test", {"type": "test"})
        proxy.frozen = False
        await layer.group_send("layer-timeout-test", {"type": "test"})
    finally:
        await layer.flush()
        await proxy.stop()


@pytest.fixture(params=[False, True], ids=["sent-by-redis-py", "written-at-once"])
async def held_client(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, HeldConnection]]:
    """A client and a connection held of its pool, both given back afterwards; each
    test runs with commands sent through redis-py and written at once."""
    if not settings.REDIS_URL:
        pytest.skip("needs Redis")
    client = redis_async(socket_connect_timeout=2, socket_timeout=5)
    held = HeldConnection(lambda: client.connection_pool, write_at_once=request.param)
    try:
        yield client, held
    finally:
        await held.release()
        await client.aclose()


async def _client_id(held: HeldConnection) -> int:
    return int(await held.execute("CLIENT", "ID"))


async def test_a_held_connection_runs_scripts_redis_forgot_and_keeps_its_connection(
    held_client: tuple[Any, HeldConnection],
) -> None:
    client, held = held_client
    script = LuaScript("return {ARGV[1], #KEYS}")
    assert await held.run_script(script, ["k1", "k2"], [b"x"]) == [b"x", 2]
    first = await _client_id(held)
    await client.script_flush()  # as after a restart: Redis forgot the script
    assert await held.run_script(script, [], [b"y"]) == [b"y", 0]
    with pytest.raises(ResponseError):  # an error reply leaves the connection in step
        await held.execute("INCR", "no-such-command-argument", "extra")
    assert await _client_id(held) == first


async def test_a_held_connection_the_server_closed_costs_a_reconnect_not_the_command(
    held_client: tuple[Any, HeldConnection],
) -> None:
    client, held = held_client
    first = await _client_id(held)
    await client.client_kill_filter(_id=first)  # as a Redis restart does to every one
    await asyncio.sleep(0.05)  # the end of the stream reaches the idle connection
    second = await _client_id(held)  # sent on a new connection, answered
    assert second != first


async def test_a_command_given_up_half_way_does_not_leave_its_reply_to_the_next(
    held_client: tuple[Any, HeldConnection],
) -> None:
    _, held = held_client
    first = await _client_id(held)
    # The caller leaves while Redis still works on it: the reply would come later and
    # be read as the next command's, so that connection is closed.
    waiting = asyncio.ensure_future(held.execute("BLPOP", "held-test-empty-list", 1))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await held.execute("ECHO", "next") == b"next"
    assert await _client_id(held) != first


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "a" * 40, 2, "k:é", b"\x00\xff", 0, -17, 2.5, "x" * 70_000),
        ("PING",),
        ("SET", "", b""),
    ],
)
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[Any, ...]) -> None:
    assert pack_command(args) == b"".join(Connection().pack_command(*args))


def test_a_value_redis_would_not_read_back_as_sent_is_refused() -> None:
    for wrong in (True, None, ["a"], bytearray(b"a"), 1j):
        with pytest.raises(TypeError):
            pack_command(("SET", "k", wrong))
    with pytest.raises(UnicodeEncodeError):
        pack_command(("SET", "k", "\ud800"))  # a lone surrogate


class _Number(enum.IntEnum):
    SEVEN = 7


class _Text(str):
    pass


@hypothesis_settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.text()  # no lone surrogates: refused alike, above
        | st.binary()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats()
        | st.sampled_from([_Number.SEVEN, _Text("t"), b"\r\n", "\r\n", 0.1, -0.0]),
        max_size=20,
    )
)
def test_every_command_is_packed_as_python_packs_it(args: list[Any]) -> None:
    """Packed by hiredis or here, a command is the same bytes: from a tuple or a list,
    with an int or str subclass in it."""
    expected = redis_client._packed_here(args)
    assert pack_command(tuple(args)) == expected
    assert pack_command(args) == expected
