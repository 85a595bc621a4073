"""The Python client (``clients/python/pushclient``) against real nodes: reconnect after
a restart, resume without a gap, request ids, errors, the heartbeat watchdog, backoff
bounds, and the command line as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.servers import ROOT, ServerNode, publish_rest

CLIENT_PATH = ROOT / "clients" / "python"
if str(CLIENT_PATH) not in sys.path:
    sys.path.insert(0, str(CLIENT_PATH))

from pushclient import (  # noqa: E402
    ConnectionClosed,
    PushClient,
    PushError,
    State,
    backoff_ceiling,
    backoff_delay,
    is_terminal_close,
)
from pushclient.state import InvalidTransition, check_transition  # noqa: E402

WAIT_SECS = 20.0
# Fast reconnects keep the tests short; the bounds themselves are tested below.
FAST = {"base_delay_secs": 0.05, "max_delay_secs": 0.5}


# ----- pure parts: no server ------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(40))
def test_backoff_delay_stays_within_the_capped_exponential(attempt: int) -> None:
    ceiling = min(30.0, 0.5 * 2**attempt)
    assert backoff_ceiling(attempt) == ceiling
    assert backoff_delay(attempt, rand=lambda: 0.0) == 0.0
    assert backoff_delay(attempt, rand=lambda: 1.0) == ceiling
    for _ in range(50):
        assert 0.0 <= backoff_delay(attempt) <= ceiling


def test_backoff_is_full_jitter_and_honours_custom_bounds() -> None:
    assert [backoff_ceiling(n, base_secs=1.0, max_secs=5.0) for n in range(5)] == [
        1.0,
        2.0,
        4.0,
        5.0,
        5.0,
    ]
    assert backoff_ceiling(10_000) == 30.0  # a huge attempt number does not overflow
    # Full jitter: draws spread over the whole window, not bunched near the ceiling.
    draws = [backoff_delay(8) for _ in range(2000)]
    assert min(draws) < 3.0 and max(draws) > 27.0
    assert 12.0 < sum(draws) / len(draws) < 18.0
    with pytest.raises(ValueError):
        backoff_ceiling(-1)


@pytest.mark.parametrize(
    ("code", "terminal"),
    [
        *[(code, True) for code in (1000, 1008, 1009)],
        *[(code, False) for code in (1001, 1006, 1011, 1012, 1013, 4001, 4002, None)],
    ],
)
def test_close_codes_follow_the_contract(code: int | None, terminal: bool) -> None:
    assert is_terminal_close(code) is terminal


def test_a_wrong_state_transition_fails_loudly() -> None:
    check_transition(State.CONNECTED, State.RECONNECTING)
    with pytest.raises(InvalidTransition, match="'disconnected' to 'connected'"):
        check_transition(State.DISCONNECTED, State.CONNECTED)


async def test_a_seq_jump_is_reported_as_a_gap_and_duplicates_are_dropped() -> None:
    client = PushClient("ws://127.0.0.1:1/ws/")
    gaps: list[dict[str, Any]] = []
    seen: list[int] = []
    client.on("gap", gaps.append)
    ready = asyncio.get_running_loop().create_future()
    from pushclient.client import Subscription

    client._subscriptions["news"] = Subscription("news", lambda m: seen.append(m["seq"]), 3, ready)
    for seq in (4, 4, 7, 6, 8):
        await client._on_message({"type": "message", "channel": "news", "seq": seq, "data": 0})
    assert seen == [4, 7, 8]
    assert gaps == [{"channel": "news", "expected": 5, "received": 7}]


# ----- against real nodes ----------------------------------------------------------------


@pytest.fixture
def node(e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    node = ServerNode(e2e_env, name=f"pyclient-{uuid.uuid4().hex[:6]}").start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def other_node(e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    node = ServerNode(e2e_env, name=f"pyclient-other-{uuid.uuid4().hex[:6]}").start()
    yield node
    node.stop()


def channel_name(prefix: str = "py") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def eventually(what: str, check: Callable[[], bool], timeout: float = WAIT_SECS) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


e2e = pytest.mark.e2e


@e2e
async def test_reconnects_after_a_restart_and_resumes_without_a_gap(
    node: ServerNode, other_node: ServerNode, publisher_token: str
) -> None:
    channel = channel_name()
    seqs: list[int] = []
    states: list[str] = []
    gaps: list[dict[str, Any]] = []
    client = PushClient(node.ws_url, **FAST)
    client.on("state", lambda detail: states.append(detail["state"]))
    client.on("gap", gaps.append)
    await client.connect()
    await client.subscribe(channel, lambda message: seqs.append(message["seq"]))
    try:
        for i in range(3):
            await publish_rest(node, publisher_token, channel, i)
        await eventually("the first messages", lambda: seqs == [1, 2, 3])
        first_server = client.connection_id

        await asyncio.to_thread(node.stop)
        await eventually("the client to notice", lambda: client.state == State.RECONNECTING)
        # Published elsewhere while the client's node is down: only a resume delivers them.
        for i in range(5):
            await publish_rest(other_node, publisher_token, channel, f"missed {i}")
        await asyncio.to_thread(node.start)
        await eventually("the reconnect", lambda: client.state == State.CONNECTED, timeout=30)
        for i in range(2):
            await publish_rest(other_node, publisher_token, channel, f"after {i}")
        await eventually("every message", lambda: seqs == list(range(1, 11)))
    finally:
        await client.close()
    assert gaps == []
    assert client.connection_id != first_server
    assert states[:2] == ["connecting", "connected"]
    assert "reconnecting" in states and states[-2:] == ["connected", "disconnected"]


@e2e
async def test_subscribe_with_since_replays_the_stored_tail(
    node: ServerNode, publisher_token: str
) -> None:
    channel = channel_name()
    for i in range(6):
        await publish_rest(node, publisher_token, channel, {"n": i})
    received: list[dict[str, Any]] = []
    async with PushClient(node.ws_url) as client:
        subscription = await client.subscribe(channel, received.append, since=2)
        await eventually("the replay", lambda: len(received) == 4)
        assert subscription.recovered is True
        assert client.last_seq(channel) == 6
    assert [m["seq"] for m in received] == [3, 4, 5, 6]
    assert [m["data"] for m in received] == [{"n": 2}, {"n": 3}, {"n": 4}, {"n": 5}]


@e2e
@pytest.mark.parametrize("wire_format", ["json", "msgpack"])
async def test_concurrent_publishes_each_get_their_own_reply(
    node: ServerNode, publisher_token: str, wire_format: str
) -> None:
    channel = channel_name()
    async with PushClient(node.ws_url, token=publisher_token, format=wire_format) as client:
        received: list[int] = []
        await client.subscribe(channel, lambda message: received.append(message["seq"]))
        replies = await asyncio.gather(*(client.publish(channel, {"i": i}) for i in range(20)))
        await eventually("our own messages", lambda: len(received) == 20)
        unsubscribed = await client.unsubscribe(channel)
        assert unsubscribed is not None and unsubscribed["type"] == "unsubscribed"
    assert sorted(reply["seq"] for reply in replies) == list(range(1, 21))
    assert len({reply["id"] for reply in replies}) == 20
    assert received == list(range(1, 21))


@e2e
async def test_errors_reject_the_request_and_a_bad_token_is_not_retried(
    node: ServerNode,
) -> None:
    async with PushClient(node.ws_url) as client:
        with pytest.raises(PushError) as refused:
            await client.publish(channel_name(), 1)
        assert refused.value.code == "FORBIDDEN"
        with pytest.raises(PushError) as forbidden:
            await client.subscribe("private-secrets")
        assert forbidden.value.code == "FORBIDDEN"
    states: list[str] = []
    client = PushClient(node.ws_url, token="not-a-token", **FAST)
    client.on("state", lambda detail: states.append(detail["state"]))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.connect(), 10)
    assert states == ["connecting", "disconnected"]


# ----- the heartbeat watchdog, against a server that goes silent -----------------------


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[str, list[ServerConnection]]]:
    """Says connection_established with a 0.2 s heartbeat, then never another word."""
    connections: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(ws)
        hello = {
            "type": "connection_established",
            "connection_id": str(len(connections)),
            "server_id": "silent",
            "heartbeat_interval": 0.2,
            "timestamp": 0,
        }
        await ws.send(json.dumps(hello))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, subprotocols=["v1.json"]) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws/", connections


async def test_a_silent_connection_is_dropped_after_two_heartbeats_and_retried(
    silent_server: tuple[str, list[ServerConnection]],
) -> None:
    url, connections = silent_server
    closes: list[dict[str, Any]] = []
    client = PushClient(url, **FAST)
    client.on("close", closes.append)
    await client.connect()
    await eventually("a reconnect", lambda: len(connections) >= 2, timeout=5)
    await client.close()
    assert closes[0]["code"] == 4001 and closes[0]["will_reconnect"] is True
    assert closes[-1]["will_reconnect"] is False


# ----- the command line ------------------------------------------------------------------


async def run_cli(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(CLIENT_PATH)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushclient",
        *args,
        env=env,
        cwd=Path(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@e2e
async def test_cli_publish_and_subscribe_round_trip(node: ServerNode, publisher_token: str) -> None:
    channel = channel_name("cli")
    common = ("--url", node.ws_url, "--token", publisher_token)
    first = await run_cli("publish", channel, '{"hello": "world"}', *common)
    out, err = await asyncio.wait_for(first.communicate(), WAIT_SECS)
    assert first.returncode == 0, err.decode()
    assert json.loads(out)["seq"] == 1

    subscriber = await run_cli("subscribe", channel, "--since", "0", "--count", "3", *common)
    for data in ('"two"', "[3, 3.5, null]"):
        publisher = await run_cli("publish", channel, data, *common)
        _, err = await asyncio.wait_for(publisher.communicate(), WAIT_SECS)
        assert publisher.returncode == 0, err.decode()
    out, err = await asyncio.wait_for(subscriber.communicate(), WAIT_SECS)
    assert subscriber.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [(m["seq"], m["data"]) for m in lines] == [
        (1, {"hello": "world"}),
        (2, "two"),
        (3, [3, 3.5, None]),
    ]
    assert all(m["type"] == "message" and m["channel"] == channel for m in lines)


async def test_cli_refuses_bad_input_without_connecting() -> None:
    no_token = await run_cli("publish", "news", "1", "--url", "ws://127.0.0.1:1/ws/")
    _, err = await no_token.communicate()
    assert no_token.returncode == 2 and b"--token" in err
    bad_json = await run_cli("publish", "news", "{nope", "--token", "t")
    _, err = await bad_json.communicate()
    assert bad_json.returncode == 2 and b"JSON" in err
