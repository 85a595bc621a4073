"""The Python client (``clients/python/pushclient``) against real nodes: reconnect after
a restart with the backoff it documents, resume without a gap, gap repair, request ids,
errors, the heartbeat watchdog, and the command line as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qs, urlsplit

import msgpack
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from tests.servers import ROOT, ServerNode, publish_rest
from tests.waiting import wait_until
from tests.wsclient import flood

CLIENT_PATH = ROOT / "clients" / "python"
# requirements.txt installs the client (`-e ./clients/python`); an environment built
# before that line reads it from the source tree instead.
CLIENT_INSTALLED = importlib.util.find_spec("pushclient") is not None
if not CLIENT_INSTALLED:
    sys.path.insert(0, str(CLIENT_PATH))

import pushclient.client  # noqa: E402
from pushclient import (  # noqa: E402
    ConnectionClosed,
    PushClient,
    PushError,
    State,
    backoff_ceiling,
    backoff_delay,
    is_terminal_close,
)
from pushclient.client import Subscription  # noqa: E402
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


class FakeHistory:
    """The REST history of one channel as ``PushClient.get_json`` reads it: the stored
    seqs, and how many reads fail before one succeeds."""

    def __init__(self, stored: range, *, failures: int = 0) -> None:
        self.stored = stored
        self.failures = failures
        self.requests: list[tuple[str, dict[str, str]]] = []

    def __call__(self, url: str, headers: dict[str, str], timeout_secs: float) -> Any:
        self.requests.append((url, headers))
        if self.failures:
            self.failures -= 1
            raise URLError("connection refused")
        query = parse_qs(urlsplit(url).query)
        since, limit = int(query["since"][0]), int(query["limit"][0])
        seqs = [seq for seq in self.stored if seq > since][:limit]
        return {"results": [message(seq) for seq in seqs], "next": None}


def message(seq: int) -> dict[str, Any]:
    return {"type": "message", "channel": "news", "seq": seq, "data": seq, "timestamp": 0.0}


async def feed(
    history: FakeHistory, seqs: list[int], *, token: Any = None, **options: Any
) -> dict[str, list[Any]]:
    """Hand ``seqs`` to a client whose handler of ``news`` has delivered up to 3, wait for
    any repair to finish, and say what the handler and the listeners saw. ``token``: the
    subscription's signed subscription token (or provider)."""
    client = PushClient("ws://push.test/ws/", token="key", **options)
    client.get_json = history
    seen: dict[str, list[Any]] = {"seqs": [], "gap": [], "unrecovered": [], "error": []}
    for event in ("gap", "unrecovered", "error"):
        client.on(event, seen[event].append)
    ready = asyncio.get_running_loop().create_future()
    subscription = Subscription("news", lambda m: seen["seqs"].append(m["seq"]), 3, ready)
    subscription.token = token
    client._subscriptions["news"] = subscription
    for seq in seqs:
        await client._on_message(message(seq))
    await wait_until(lambda: subscription.held is None, "the repair", timeout=5)
    return seen


async def test_duplicates_are_dropped_and_gaps_are_filled_in_order_from_history() -> None:
    history = FakeHistory(range(1, 10))
    # 6 and 9 arrive while the first gap is open: held, then delivered in their turn.
    seen = await feed(history, [4, 4, 7, 6, 9, 6])
    assert seen["seqs"] == [4, 5, 6, 7, 8, 9]
    assert seen["gap"] == [
        {"channel": "news", "from": 5, "to": 5, "expected": 5, "received": 6},
        {"channel": "news", "from": 8, "to": 8, "expected": 8, "received": 9},
    ]
    assert seen["unrecovered"] == seen["error"] == []
    urls = [urlsplit(url) for url, _ in history.requests]
    assert [u.path for u in urls] == ["/api/v1/channels/news/messages"] * 2
    assert [parse_qs(u.query) for u in urls] == [
        {"since": ["4"], "limit": ["1"]},
        {"since": ["7"], "limit": ["1"]},
    ]
    assert all(headers["Authorization"] == "Token key" for _, headers in history.requests)


@pytest.mark.parametrize(
    ("stored", "failures", "delivered", "unrecovered", "errors"),
    [
        # Retention trimmed 5 and 6: the rest is delivered, the loss reported.
        (range(7, 20), 0, [4, 7, 8, 9], [{"channel": "news", "since": 4, "seq": 6}], []),
        # Two failed reads are retried; the third gets the range.
        (range(1, 20), 2, [4, 5, 6, 7, 8, 9], [], []),
        # The history cannot be read at all: reported, and delivery goes on.
        (
            range(1, 20),
            99,
            [4, 8, 9],
            [{"channel": "news", "since": 4, "seq": 7}],
            ["GAP_REPAIR_FAILED"],
        ),
    ],
    ids=["trimmed", "retried", "unreadable"],
)
async def test_a_gap_the_history_cannot_fill_is_reported_and_delivery_goes_on(
    stored: range,
    failures: int,
    delivered: list[int],
    unrecovered: list[dict[str, Any]],
    errors: list[str],
) -> None:
    history = FakeHistory(stored, failures=failures)
    seen = await feed(history, [4, 8, 9], base_delay_secs=0.01, max_delay_secs=0.02)
    assert seen["seqs"] == delivered
    assert seen["unrecovered"] == unrecovered
    assert [error["code"] for error in seen["error"]] == errors


class BusyHistory(FakeHistory):
    """Refuses reads with 429 and ``Retry-After: 1`` until a second after the first
    refusal: the address's history budget, spent."""

    def __init__(self, stored: range) -> None:
        super().__init__(stored)
        self.refused_at: float | None = None

    def __call__(self, url: str, headers: dict[str, str], timeout_secs: float) -> Any:
        now = time.monotonic()
        self.refused_at = self.refused_at or now
        if now - self.refused_at < 1.0:
            self.requests.append((url, headers))
            refusal = Message()
            refusal["Retry-After"] = "1"
            raise HTTPError(url, 429, "Too Many Requests", refusal, None)
        return super().__call__(url, headers, timeout_secs)


async def test_a_refused_history_read_is_tried_again_after_the_retry_after() -> None:
    history = BusyHistory(range(1, 10))
    seen = await feed(history, [4, 8, 9], base_delay_secs=0.01, max_delay_secs=5.0)
    assert seen["seqs"] == [4, 5, 6, 7, 8, 9]
    assert seen["unrecovered"] == seen["error"] == []
    assert len(history.requests) == 2


class StuckHistory(FakeHistory):
    """Answers the page after seq 4 whatever ``since`` asks: a proxy that caches the
    history page ignoring its query, or a buggy server."""

    def __call__(self, url: str, headers: dict[str, str], timeout_secs: float) -> Any:
        if len(self.requests) >= 50:
            return {"results": [], "next": None}  # stops the test if the client loops
        return super().__call__(url.replace("since=5", "since=4"), headers, timeout_secs)


async def test_a_history_page_that_does_not_move_on_ends_the_read() -> None:
    # The same page again must not be read (and kept) for ever.
    history = StuckHistory(range(5, 6))
    seen = await feed(history, [4, 8])
    assert seen["seqs"] == [4, 5, 8]
    assert seen["unrecovered"] == [{"channel": "news", "since": 5, "seq": 7}]
    assert len(history.requests) == 2


# ----- against real nodes ----------------------------------------------------------------


@pytest.fixture
def node(two_nodes: tuple[ServerNode, ServerNode]) -> ServerNode:
    """A node of the shared pair (tests/conftest.py), for a test that leaves it running."""
    return two_nodes[0]


def channel_name(prefix: str = "py") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


e2e = pytest.mark.e2e


@e2e
async def test_reconnects_after_a_restart_and_resumes_without_a_gap(
    own_node: ServerNode, other_node: ServerNode, publisher_token: str
) -> None:
    channel = channel_name()
    seqs: list[int] = []
    states: list[str] = []
    gaps: list[dict[str, Any]] = []
    client = PushClient(own_node.ws_url, **FAST)
    client.on("state", lambda detail: states.append(detail["state"]))
    client.on("gap", gaps.append)
    await client.connect()
    await client.subscribe(channel, lambda message: seqs.append(message["seq"]))
    try:
        for i in range(3):
            await publish_rest(own_node, publisher_token, channel, i)
        await wait_until(lambda: seqs == [1, 2, 3], "the first messages", timeout=WAIT_SECS)
        first_server = client.connection_id

        await asyncio.to_thread(own_node.stop)
        await wait_until(
            lambda: client.state == State.RECONNECTING, "the client to notice", timeout=WAIT_SECS
        )
        # Published elsewhere while the client's node is down: only a resume delivers them.
        for i in range(5):
            await publish_rest(other_node, publisher_token, channel, f"missed {i}")
        await asyncio.to_thread(own_node.start)
        await wait_until(lambda: client.state == State.CONNECTED, "the reconnect", timeout=30)
        for i in range(2):
            await publish_rest(other_node, publisher_token, channel, f"after {i}")
        await wait_until(lambda: seqs == list(range(1, 11)), "every message", timeout=WAIT_SECS)
    finally:
        await client.close()
    assert gaps == []
    assert client.connection_id != first_server
    assert states[:2] == ["connecting", "connected"]
    assert "reconnecting" in states and states[-2:] == ["connected", "disconnected"]


@e2e
async def test_a_resubscribe_refused_for_now_is_asked_again(
    e2e_env: dict[str, str], publisher_token: str
) -> None:
    # One address may start two subscriptions at once, then one a second: after the
    # restart the third resubscribe is refused RATE_LIMITED (as a database, Redis or
    # broker outage answers UNAVAILABLE). The client holds that channel: it must
    # subscribe again, not drop it without a word.
    env = {**e2e_env, "PUSH_ADDRESS_SUBSCRIBE_BURST": "2", "PUSH_ADDRESS_SUBSCRIBE_PER_SEC": "1"}
    node = ServerNode(env, name=f"budget-{uuid.uuid4().hex[:6]}").start()
    channels = [channel_name() for _ in range(3)]
    received: dict[str, list[int]] = {channel: [] for channel in channels}
    errors: list[str] = []
    client = PushClient(node.ws_url, **FAST)
    client.on("error", lambda detail: errors.append(detail["code"]))
    try:
        await client.connect()
        for channel in channels:
            while True:  # the budget refills one a second
                try:
                    await client.subscribe(
                        channel, lambda m, c=channel: received[c].append(m["seq"])
                    )
                    break
                except PushError as exc:
                    assert exc.code == "RATE_LIMITED"
                    await asyncio.sleep(0.2)
        await asyncio.to_thread(node.stop)
        await asyncio.to_thread(node.start)
        await wait_until(lambda: client.state == State.CONNECTED, "the reconnect", timeout=30)
        for channel in channels:
            await publish_rest(node, publisher_token, channel, "after the restart")
        await wait_until(
            lambda: all(seqs == [1] for seqs in received.values()),
            "a message on every channel",
            timeout=WAIT_SECS,
        )
    finally:
        await client.close()
        await asyncio.to_thread(node.stop)
    assert "RATE_LIMITED" in errors  # the application heard of the refusal


class Jitter:
    """A deterministic jitter source: cycles through ``draws`` and remembers each one."""

    def __init__(self, *draws: float) -> None:
        self.draws = draws
        self.used: list[float] = []

    def __call__(self) -> float:
        draw = self.draws[len(self.used) % len(self.draws)]
        self.used.append(draw)
        return draw


BACKOFF_BASE_SECS = 0.05
BACKOFF_MAX_SECS = 0.4
# The node stays down this long: with the delays above, enough retries to reach the cap.
OUTAGE_SECS = 2.0
# asyncio may wake a sleeper up to its clock's resolution early; far below this.
CLOCK_SLACK_SECS = 0.001


@e2e
async def test_reconnect_delays_follow_the_backoff_and_start_again_at_base(
    own_node: ServerNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    attempts: list[float] = []  # when each connection attempt started
    real_connect = pushclient.client.connect

    def recording_connect(*args: Any, **kwargs: Any) -> Any:
        attempts.append(loop.time())
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(pushclient.client, "connect", recording_connect)
    jitter = Jitter(1.0, 0.5, 0.75, 0.25)
    closes: list[tuple[float, float]] = []  # (when, the delay the client chose)
    client = PushClient(
        own_node.ws_url,
        base_delay_secs=BACKOFF_BASE_SECS,
        max_delay_secs=BACKOFF_MAX_SECS,
        rand=jitter,
        # Any connection counts as one that stayed up (the default asks for 5 s).
        stable_after_secs=0.0,
    )
    client.on(
        "close",
        lambda detail: (
            closes.append((loop.time(), detail["delay_secs"])) if detail["will_reconnect"] else None
        ),
    )
    await client.connect()
    try:
        await asyncio.to_thread(own_node.stop)
        await asyncio.sleep(OUTAGE_SECS)
        await asyncio.to_thread(own_node.start)
        await wait_until(lambda: client.state == State.CONNECTED, "the reconnect", timeout=30)
        outage = list(closes)
        # The rule documented in docs/clients.md: retry n waits draw * min(max, base * 2^n).
        expected = [
            draw * min(BACKOFF_MAX_SECS, BACKOFF_BASE_SECS * 2**n)
            for n, draw in enumerate(jitter.used)
        ]
        assert [delay for _, delay in outage] == pytest.approx(expected)
        assert len(outage) >= 5, "the outage should last past the cap (retry 3 on)"
        # Retry n started at least its delay after the close that announced the delay,
        # so also after the attempt before it (or the drop, for the first).
        retries = attempts[1 : len(outage) + 1]
        assert len(retries) == len(outage)
        for n, ((closed_at, delay), started) in enumerate(zip(outage, retries, strict=True)):
            assert started - closed_at >= delay - CLOCK_SLACK_SECS, (n, started - closed_at)
            if n:
                assert started - attempts[n] >= delay - CLOCK_SLACK_SECS

        # Connected again: the next drop starts over at the base delay.
        await asyncio.to_thread(own_node.stop)
        await wait_until(lambda: len(attempts) > len(outage) + 1, "the next retry", timeout=10)
    finally:
        await client.close()
    dropped_at, first_delay = closes[len(outage)]
    assert first_delay == pytest.approx(jitter.used[len(outage)] * BACKOFF_BASE_SECS)
    assert attempts[len(outage) + 1] - dropped_at >= first_delay - CLOCK_SLACK_SECS


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
        await wait_until(lambda: len(received) == 4, "the replay", timeout=WAIT_SECS)
        assert subscription.recovered is True
        assert client.last_seq(channel) == 6
    assert [m["seq"] for m in received] == [3, 4, 5, 6]
    assert [m["data"] for m in received] == [{"n": 2}, {"n": 3}, {"n": 4}, {"n": 5}]


@e2e
async def test_a_cursor_past_the_channel_goes_on_from_the_seq_the_server_names(
    node: ServerNode, publisher_token: str
) -> None:
    # A stored cursor the channel never reached (its history was reset, or restored
    # from a backup): the server answers its real latest seq with recovered false, and
    # the messages after that seq are new ones the application must get.
    channel = channel_name()
    for i in range(3):
        await publish_rest(node, publisher_token, channel, i)
    received: list[int] = []
    unrecovered: list[dict[str, Any]] = []
    async with PushClient(node.ws_url) as client:
        client.on("unrecovered", unrecovered.append)
        subscription = await client.subscribe(
            channel, lambda message: received.append(message["seq"]), since=10
        )
        assert (subscription.seq, subscription.recovered) == (3, False)
        for i in range(2):
            await publish_rest(node, publisher_token, channel, f"new {i}")
        await wait_until(lambda: received == [4, 5], "the new messages", timeout=WAIT_SECS)
        assert client.last_seq(channel) == 5
    assert unrecovered == [{"channel": channel, "since": 10, "seq": 3}]


# Enough large messages to fill the kernel's socket buffers and the small send queue of
# small_queue_node while the client does not read (tests/test_slow_consumer.py's flood).
FLOOD_MESSAGES = 300
FLOOD_PAYLOAD_BYTES = 64 * 1024


@e2e
async def test_a_gap_from_a_drop_oldest_channel_is_filled_from_history_in_order(
    small_queue_node: ServerNode, publisher_token: str
) -> None:
    node = small_queue_node
    channel = f"ticker:{uuid.uuid4().hex[:8]}"  # drop-oldest on this node
    reading = asyncio.Event()
    seqs: list[int] = []
    gaps: list[dict[str, Any]] = []

    async def stall_then_read(message: dict[str, Any]) -> None:
        # The handler runs in the client's read loop: while it waits, nothing is read,
        # and the node's send queue for this client overflows.
        await reading.wait()
        seqs.append(message["seq"])

    dropped_before = node.metric("push_dropped_frames_total")
    async with PushClient(node.ws_url, token=publisher_token) as client:
        client.on("gap", gaps.append)
        await client.subscribe(channel, stall_then_read)
        await flood(node.ws_url, publisher_token, channel, FLOOD_MESSAGES, FLOOD_PAYLOAD_BYTES)
        assert node.metric("push_dropped_frames_total") > dropped_before
        reading.set()
        await wait_until(lambda: len(seqs) >= FLOOD_MESSAGES, "every message", timeout=60)
    assert seqs == list(range(1, FLOOD_MESSAGES + 1))
    assert gaps, "the node dropped frames: the client saw at least one gap"
    for gap in gaps:
        assert 1 < gap["from"] <= gap["to"] < gap["received"] <= FLOOD_MESSAGES


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
        await wait_until(lambda: len(received) == 20, "our own messages", timeout=WAIT_SECS)
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
    await wait_until(lambda: len(connections) >= 2, "a reconnect", timeout=5)
    await client.close()
    assert closes[0]["code"] == 4001 and closes[0]["will_reconnect"] is True
    assert closes[-1]["will_reconnect"] is False


async def test_a_frame_over_the_limit_closes_the_client_before_it_is_held() -> None:
    # A broken or hostile server must not make the client hold a frame of any size.
    limit = pushclient.client.DEFAULT_MAX_FRAME_BYTES
    connections: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(ws)
        hello = {"type": "connection_established", "connection_id": "1", "server_id": "huge"}
        await ws.send(json.dumps(hello))
        with contextlib.suppress(Exception):
            await ws.send(json.dumps({"type": "heartbeat_ack", "pad": "x" * limit}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, subprotocols=["v1.json"], max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        closes: list[dict[str, Any]] = []
        client = PushClient(f"ws://127.0.0.1:{port}/ws/", **FAST)
        client.on("close", closes.append)
        await client.connect()
        await wait_until(lambda: client.state == State.DISCONNECTED, "the close", timeout=10)
        await client.close()
    assert closes[-1]["code"] == 1009 and closes[-1]["will_reconnect"] is False
    assert len(connections) == 1


async def test_a_malformed_envelope_is_skipped_and_the_client_goes_on() -> None:
    # A broken server or proxy: a message without a seq, or with one that is not a
    # number. Each is reported; neither stops the client for good.
    async def handler(ws: ServerConnection) -> None:
        hello = {"type": "connection_established", "connection_id": "1", "server_id": "bad"}
        await ws.send(json.dumps(hello))
        request = json.loads(await ws.recv())
        for envelope in [
            {"type": "subscribed", "id": request["id"], "channel": "news", "seq": 0},
            {"type": "message", "channel": "news", "data": 1},
            {"type": "message", "channel": "news", "seq": "1", "data": 1},
            {"type": "message", "channel": "news", "seq": 1, "data": 1},
        ]:
            await ws.send(json.dumps(envelope))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, subprotocols=["v1.json"]) as server:
        port = server.sockets[0].getsockname()[1]
        errors: list[str] = []
        received: list[int] = []
        client = PushClient(f"ws://127.0.0.1:{port}/ws/", **FAST)
        client.on("error", lambda detail: errors.append(detail["code"]))
        await client.connect()
        await client.subscribe("news", lambda message: received.append(message["seq"]))
        await wait_until(lambda: received == [1], "the good message", timeout=10)
        assert client.state == State.CONNECTED
        await client.close()
    assert errors == ["INVALID_ENVELOPE", "INVALID_ENVELOPE"]


@pytest.mark.parametrize(
    ("wire_format", "frame"),
    [("msgpack", "a text frame"), ("json", "[" * 100_000)],
    ids=["text-frame-for-msgpack", "json-nested-too-deep"],
)
async def test_an_undecodable_frame_is_reported_and_skipped(wire_format: str, frame: str) -> None:
    async def handler(ws: ServerConnection) -> None:
        hello = {"type": "connection_established", "connection_id": "1", "server_id": "bad"}
        await ws.send(msgpack.packb(hello) if wire_format == "msgpack" else json.dumps(hello))
        await ws.send(frame)
        await ws.wait_closed()

    subprotocol = Subprotocol(f"v1.{wire_format}")
    async with serve(handler, "127.0.0.1", 0, subprotocols=[subprotocol]) as server:
        port = server.sockets[0].getsockname()[1]
        errors: list[str] = []
        client = PushClient(f"ws://127.0.0.1:{port}/ws/", format=wire_format, **FAST)
        client.on("error", lambda detail: errors.append(detail["code"]))
        await client.connect()
        await wait_until(lambda: errors, "the error", timeout=10)
        assert client.state == State.CONNECTED
        await client.close()
    assert errors == ["UNDECODABLE"]


async def test_a_request_without_a_reply_fails_with_a_push_error_timeout(
    silent_server: tuple[str, list[ServerConnection]],
) -> None:
    # docs/clients.md: a request settles with a PushError, TIMEOUT after the timeout.
    url, _ = silent_server
    client = PushClient(url, request_timeout_secs=0.05, heartbeat_interval_secs=60.0)
    await client.connect()
    try:
        with pytest.raises(PushError) as refusal:
            await client.publish("news", {"n": 1})
    finally:
        await client.close()
    assert refusal.value.code == "TIMEOUT"
    assert isinstance(refusal.value, TimeoutError)


# ----- the command line ------------------------------------------------------------------


def env_without_pythonpath() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def cli_env() -> dict[str, str]:
    """The environment of a CLI run: it runs the client these tests import (the
    installed one, or another tree's put first on ``PYTHONPATH``), never a third."""
    return {
        **env_without_pythonpath(),
        "PYTHONPATH": str(Path(pushclient.client.__file__).parents[1]),
    }


def test_the_installed_client_runs_from_any_directory(tmp_path: Path) -> None:
    if not CLIENT_INSTALLED:
        reason = "pushclient is not installed here: pip install -r requirements.txt"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(
        [sys.executable, "-m", "pushclient", "--help"],
        cwd=tmp_path,  # outside the repository: only the installed package can answer
        env=env_without_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "{subscribe,publish}" in result.stdout


async def run_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushclient",
        *args,
        env=cli_env(),
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
    for bad, says in [
        (("--subscription-token", "private-x"), b"CHANNEL=TOKEN"),
        (("--subscription-token", "private-y=a.b"), b"not a CHANNEL"),
        (
            ("--subscription-token", "private-x=a.b", "--subscription-token", "private-x=c.d"),
            b"twice",
        ),
    ]:
        refused = await run_cli("subscribe", "private-x", "--url", "ws://127.0.0.1:1/ws/", *bad)
        _, err = await asyncio.wait_for(refused.communicate(), WAIT_SECS)
        assert refused.returncode == 2 and says in err, err.decode()
