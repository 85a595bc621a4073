"""The per-address budgets (push/cluster/address_budgets.py) against a real node, as
clients on different addresses see them: clients bind their sockets to addresses of
their own in 127/8 (Linux routes all of it to the loopback interface), so one address
can use up its budgets while another is served as usual.

Budgets here are small and refill at 1 a second (the least a setting allows), so each
test first uses one up, then checks the refusal right away; the bounds asserted leave
room for the tokens the seconds of a slow machine give back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.pusherclient import APP_ID, APP_KEY, pusher_env, signed_post
from tests.servers import ServerNode, manage
from tests.sseclient import SseStream, sse_url

pytestmark = pytest.mark.e2e

HANDSHAKE_BURST = 5
FRAME_BURST = 30
SUBSCRIBE_BURST = 6
REST_BURST = 5
# Two pages of one ~1 KB message each; the refill (1 byte a second) gives nothing back.
HISTORY_BURST_BYTES = 2000
HISTORY_MESSAGE_CHARS = 1000
# Above the 20 frames each connection sends before the test floods one of them.
CLOSE_AFTER = 25
# Three frames of 20 KB (over the 8 KiB that frames are charged from), then nothing.
FRAME_BURST_BYTES = 50_000
BIG_FRAME_CHARS = 20_000
TIMEOUT_SECS = 10.0


@pytest.fixture(scope="module")
def budget_env(e2e_env: dict[str, str]) -> dict[str, str]:
    return {
        **pusher_env(e2e_env),
        "PUSH_ADDRESS_HANDSHAKE_BURST": str(HANDSHAKE_BURST),
        "PUSH_ADDRESS_HANDSHAKE_PER_SEC": "1",
        "PUSH_ADDRESS_FRAME_BURST": str(FRAME_BURST),
        "PUSH_ADDRESS_FRAME_PER_SEC": "1",
        "PUSH_ADDRESS_SUBSCRIBE_BURST": str(SUBSCRIBE_BURST),
        "PUSH_ADDRESS_SUBSCRIBE_PER_SEC": "1",
        "PUSH_ADDRESS_REST_BURST": str(REST_BURST),
        "PUSH_ADDRESS_REST_PER_SEC": "1",
        "PUSH_ADDRESS_HISTORY_BURST_BYTES": str(HISTORY_BURST_BYTES),
        "PUSH_ADDRESS_HISTORY_BYTES_PER_SEC": "1",
        "PUSH_RATE_LIMIT_CLOSE_AFTER": str(CLOSE_AFTER),
        "PUSH_ADDRESS_FRAME_BURST_BYTES": str(FRAME_BURST_BYTES),
        "PUSH_ADDRESS_FRAME_BYTES_PER_SEC": "1",
    }


@pytest.fixture(scope="module")
def budget_node(budget_env: dict[str, str]) -> Iterator[ServerNode]:
    node = ServerNode(budget_env, name="address-budgets").start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def service_key(budget_env: dict[str, str]) -> str:
    output = manage(
        budget_env,
        *("service_token", "create", "budget-backend"),
        *("--scope", "publish:*", "--scope", "subscribe:*"),
    )
    return output.strip().splitlines()[-1]


_next_address = iter(range(2, 255))


@pytest.fixture
def address() -> str:
    """An address in 127/8 of this test's own: no other test spent its budgets."""
    return f"127.0.1.{next(_next_address)}"


async def ws_open(url: str, address: str, **options: Any) -> ClientConnection:
    return await connect(url, local_addr=(address, 0), open_timeout=TIMEOUT_SECS, **options)


async def handshake(url: str, address: str) -> str:
    """``connection_established``, or how the handshake was refused (``close 1013``)."""
    ws = await ws_open(url, address)
    try:
        envelope = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_SECS))
        return str(envelope["type"])
    except ConnectionClosed as exc:
        return f"close {exc.rcvd.code if exc.rcvd else None}"
    finally:
        await ws.close()


@contextlib.asynccontextmanager
async def http_from(address: str, base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(
        base_url=base_url, transport=transport, timeout=TIMEOUT_SECS
    ) as http:
        yield http


async def sse_status(node: ServerNode, address: str) -> tuple[int, dict[str, Any] | None]:
    async with (
        http_from(address, node.http_url) as http,
        http.stream("GET", sse_url("", ["budget-sse"])) as response,
    ):
        if response.status_code != 200:
            return response.status_code, json.loads(await response.aread())
        return 200, None


async def use_up_handshakes(node: ServerNode, address: str) -> int:
    """Handshakes until the first refusal; how many were let in before it."""
    started = time.monotonic()
    accepted = 0
    for _ in range(HANDSHAKE_BURST + 60):
        outcome = await handshake(node.ws_url, address)
        if outcome != "connection_established":
            assert outcome == "close 1013"
            break
        accepted += 1
    refill = time.monotonic() - started + 1
    assert HANDSHAKE_BURST <= accepted <= HANDSHAKE_BURST + refill
    return accepted


async def test_over_its_handshake_budget_an_address_is_told_to_come_back_later(
    budget_node: ServerNode, address: str
) -> None:
    await use_up_handshakes(budget_node, address)
    # SSE from the same address: 429 before the stream starts.
    refused = [await sse_status(budget_node, address) for _ in range(3)]
    _status, body = next((s, b) for s, b in refused if s == 429)
    assert body is not None and body["code"] == "RATE_LIMITED"
    # A Pusher client from it: Pusher's "over capacity", which pusher-js backs off on.
    async with asyncio.timeout(TIMEOUT_SECS):
        while True:
            ws = await ws_open(f"{budget_node.pusher_url}/app/{APP_KEY}?protocol=7", address)
            frame = json.loads(await ws.recv())
            if frame["event"] == "pusher:error":
                break
            await ws.close()
    assert frame["data"]["code"] == 4100
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    assert ws.close_code == 4100
    # Another address is served as usual, on both transports.
    assert await handshake(budget_node.ws_url, "127.0.2.1") == "connection_established"
    assert (await sse_status(budget_node, "127.0.2.1"))[0] == 200


async def heartbeats(ws: ClientConnection, count: int, prefix: str) -> None:
    for n in range(count):
        await ws.send(json.dumps({"type": "heartbeat", "id": f"{prefix}-{n}"}))


async def replies(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_SECS)) for _ in range(count)]


async def test_frames_across_an_addresss_connections_share_one_budget(
    budget_node: ServerNode, address: str
) -> None:
    connections = [await ws_open(budget_node.ws_url, address) for _ in range(3)]
    for ws in connections:
        await ws.recv()  # connection_established
    started = time.monotonic()
    # 20 frames on each: within each connection's own rate, 60 against the address's 30.
    await asyncio.gather(*(heartbeats(ws, 20, f"c{i}") for i, ws in enumerate(connections)))
    answers = [reply for ws in connections for reply in await replies(ws, 20)]
    refill = time.monotonic() - started + 1
    acked = [a for a in answers if a["type"] == "heartbeat_ack"]
    limited = [a for a in answers if a.get("code") == "RATE_LIMITED"]
    assert len(acked) + len(limited) == 60
    assert FRAME_BURST <= len(acked) <= FRAME_BURST + refill
    # Refused as a connection's own rate refuses: the request's id, the connection open.
    assert {a["id"] for a in limited} <= {f"c{i}-{n}" for i in range(3) for n in range(20)}
    # Past RATE_LIMIT_CLOSE_AFTER refused frames a connection is closed 1008.
    flooding = connections[0]
    await heartbeats(flooding, CLOSE_AFTER + 5, "flood")
    with pytest.raises(ConnectionClosed):
        await replies(flooding, CLOSE_AFTER + 6)
    assert flooding.close_code == 1008
    # A Pusher connection of the same address takes from the same budget.
    pusher = await ws_open(f"{budget_node.pusher_url}/app/{APP_KEY}?protocol=7", address)
    assert json.loads(await pusher.recv())["event"] == "pusher:connection_established"
    for _ in range(3):
        await pusher.send(json.dumps({"event": "pusher:ping", "data": {}}))
    events = [frame["event"] for frame in await replies(pusher, 3)]
    assert "pusher:error" in events
    # Another address's connection is answered in full.
    other = await ws_open(budget_node.ws_url, "127.0.2.2")
    await other.recv()
    await heartbeats(other, 20, "other")
    assert [a["type"] for a in await replies(other, 20)] == ["heartbeat_ack"] * 20
    for ws in [*connections[1:], pusher, other]:
        await ws.close()


async def test_large_frames_of_an_address_share_one_byte_budget_on_both_protocols(
    budget_node: ServerNode, address: str
) -> None:
    """Frames over 8 KiB are charged by size to their address before they are decoded:
    three 20 KB heartbeats use up a budget of 50 KB, and what follows is refused
    undecoded (no id) on that connection, on another of the address's, and on a Pusher
    connection of it; small frames still pass, and another address is not held."""
    padding = "x" * BIG_FRAME_CHARS
    first, second = [await ws_open(budget_node.ws_url, address) for _ in range(2)]
    for ws in (first, second):
        await ws.recv()  # connection_established

    def big(request_id: str) -> str:
        return json.dumps({"type": "heartbeat", "id": request_id, "padding": padding})

    for n in range(3):
        await first.send(big(f"big-{n}"))
    assert [a["type"] for a in await replies(first, 3)] == ["heartbeat_ack"] * 3
    await second.send(big("over"))
    (refused,) = await replies(second, 1)
    assert refused["code"] == "RATE_LIMITED" and "id" not in refused
    await second.send(json.dumps({"type": "heartbeat", "id": "small"}))
    assert (await replies(second, 1))[0]["type"] == "heartbeat_ack"
    pusher = await ws_open(f"{budget_node.pusher_url}/app/{APP_KEY}?protocol=7", address)
    assert json.loads(await pusher.recv())["event"] == "pusher:connection_established"
    await pusher.send(json.dumps({"event": "pusher:ping", "data": {"padding": padding}}))
    assert (await replies(pusher, 1))[0]["event"] == "pusher:error"
    other = await ws_open(budget_node.ws_url, "127.0.2.3")
    await other.recv()
    await other.send(big("elsewhere"))
    assert (await replies(other, 1))[0]["type"] == "heartbeat_ack"
    for ws in (first, second, pusher, other):
        await ws.close()


async def test_subscriptions_of_an_address_share_one_budget_on_websocket_and_sse(
    budget_node: ServerNode, address: str
) -> None:
    connections = [await ws_open(budget_node.ws_url, address) for _ in range(2)]
    for ws in connections:
        await ws.recv()
    started = time.monotonic()
    answers = []
    for i, ws in enumerate(connections):
        for n in range(5):
            channel = f"budget-sub-{address}-{i}-{n}"
            await ws.send(json.dumps({"type": "subscribe", "channel": channel, "id": n}))
            answers.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_SECS)))
    refill = time.monotonic() - started + 1
    subscribed = [a for a in answers if a["type"] == "subscribed"]
    limited = [a for a in answers if a.get("code") == "RATE_LIMITED"]
    assert len(subscribed) + len(limited) == 10
    assert SUBSCRIBE_BURST <= len(subscribed) <= SUBSCRIBE_BURST + refill
    assert all("id" in a for a in limited)
    # Still open: a refused subscription is an error reply, nothing more.
    await heartbeats(connections[1], 1, "after")
    assert (await replies(connections[1], 1))[0]["type"] == "heartbeat_ack"
    for ws in connections:
        await ws.close()

    # An SSE stream of many channels from a fresh address: the channels past the
    # budget are refused one by one, the stream goes on with the others.
    sse_address = "127.0.2.3"
    channels = [f"budget-sse-{n}" for n in range(SUBSCRIBE_BURST + 6)]
    async with (
        http_from(sse_address, budget_node.http_url) as http,
        http.stream("GET", sse_url("", channels)) as response,
    ):
        assert response.status_code == 200
        stream = SseStream(response)
        errors = []
        async with asyncio.timeout(TIMEOUT_SECS):
            async for event in stream.events():
                if event.event == "error":
                    errors.append(event.data)
                if len(errors) >= 5:
                    break
    assert {e["code"] for e in errors} == {"RATE_LIMITED"}
    assert {e["channel"] for e in errors} <= set(channels[SUBSCRIBE_BURST:])


async def test_rest_requests_of_an_address_have_a_budget_before_django(
    budget_node: ServerNode, address: str
) -> None:
    path = "/api/v1/channels/budget-rest/messages?since=0"
    started = time.monotonic()
    async with http_from(address, budget_node.http_url) as http:
        statuses = [(await http.get(path)) for _ in range(REST_BURST + 10)]
    refill = time.monotonic() - started + 1
    ok = [r for r in statuses if r.status_code == 200]
    refused = [r for r in statuses if r.status_code == 429]
    assert len(ok) + len(refused) == len(statuses)
    assert REST_BURST <= len(ok) <= REST_BURST + refill
    assert refused[0].json()["code"] == "RATE_LIMITED"
    assert int(refused[0].headers["Retry-After"]) >= 1
    async with http_from("127.0.2.4", budget_node.http_url) as http:
        assert (await http.get(path)).status_code == 200


async def _answer_to_head_only(
    node: ServerNode, address: str, head: bytes, within: float = TIMEOUT_SECS
) -> bytes:
    """What the node answers to a request whose head is sent and whose body is not."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port, local_addr=(address, 0))
    try:
        writer.write(head)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    finally:
        writer.close()


@pytest.mark.parametrize("path", ["/api/v1/channels/budget-body/messages", "/admin/login/"])
async def test_over_its_rest_budget_an_address_is_refused_before_its_body_is_read(
    budget_node: ServerNode, address: str, path: str
) -> None:
    """daphne reads a whole body before it calls the application: over the address's
    REST budget, the refusal comes at the head, and a body of 2 MB is not read first
    (uvicorn's application answers before the body, as this does)."""
    async with http_from(address, budget_node.http_url) as http:
        statuses = [(await http.get(path)).status_code for _ in range(REST_BURST + 10)]
    assert 429 in statuses, statuses
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 2000000\r\n\r\n"
    ).encode()
    answer = await _answer_to_head_only(budget_node, address, head)
    assert answer.startswith(b"HTTP/1.1 429 "), answer
    assert b"retry-after:" in answer.lower()
    # Another address's body is waited for, as ever.
    with pytest.raises(TimeoutError):
        await _answer_to_head_only(budget_node, "127.0.3.9", head, within=1.0)


@pytest.mark.parametrize("path", ["/ready", "/metrics", "/admin/login/", "/no-such-page"])
async def test_every_page_django_serves_draws_on_the_rest_budget(
    budget_node: ServerNode, address: str, path: str
) -> None:
    """The admin, readiness, metrics and 404s cost what a REST request does (1-4 ms of
    CPU; /ready also a database read and a Redis connection): past the address's REST
    budget they are refused before Django too. Liveness is not held to it."""
    async with http_from(address, budget_node.http_url) as http:
        statuses = [(await http.get(path)).status_code for _ in range(REST_BURST + 10)]
        assert 429 in statuses, statuses
        assert statuses.index(429) >= REST_BURST
        assert (await http.get("/health")).status_code == 200


@pytest.mark.parametrize(
    "path", [f"/apps/{APP_ID}/events", "/apps/no-such-app/events", "/pusher/auth"]
)
async def test_failed_requests_to_the_pusher_endpoints_draw_on_the_rest_budget(
    budget_node: ServerNode, address: str, path: str
) -> None:
    """The Pusher HTTP API (signed by back-ends) and the authorization endpoints (a
    browser asks them per private channel) are not held to the REST budget, but their
    failures are: otherwise one address could make the node read a body, run Django
    and log a warning for each unsigned request, as fast as it sends them."""
    body = b"socket_id=1.1&channel_name=private-budget&" + b"x" * 100_000
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    started = time.monotonic()
    async with http_from(address, budget_node.http_url) as http:
        statuses = [
            (await http.post(path, content=body, headers=headers)).status_code
            for _ in range(REST_BURST + 20)
        ]
    refill = time.monotonic() - started + 1
    served = [s for s in statuses if s != 429]
    assert len(served) <= REST_BURST + refill, statuses
    assert served[0] in (401, 403, 404)
    # A back-end's signed requests are not charged: one address triggers past the burst.
    async with http_from("127.0.2.6", budget_node.http_url) as http:
        triggered = [
            (
                await signed_post(
                    http,
                    f"/apps/{APP_ID}/events",
                    {"name": "e", "channel": "budget-pusher", "data": "{}"},
                )
            ).status_code
            for _ in range(REST_BURST + 5)
        ]
    assert triggered == [200] * (REST_BURST + 5)


async def test_history_an_address_reads_over_rest_has_a_byte_budget(
    budget_node: ServerNode, address: str, service_key: str
) -> None:
    """Counts do not bound what a page costs (up to 4 MiB): the bytes do. A page is
    charged once read, so the address may read while it has any budget left."""
    channel = f"budget-history-{address}"
    auth = {"Authorization": f"Token {service_key}"}
    async with http_from("127.0.2.5", budget_node.http_url) as http:
        for n in range(3):
            data = f"{n}".ljust(HISTORY_MESSAGE_CHARS, "x")
            published = await http.post(
                f"/api/v1/channels/{channel}/messages", json={"data": data}, headers=auth
            )
            assert published.status_code == 201, published.text
    pages = [f"/api/v1/channels/{channel}/messages?since={n}&limit=1" for n in range(3)]
    async with http_from(address, budget_node.http_url) as http:
        first, second, third = [await http.get(page) for page in pages]
        # A service token on the same address is not held to it.
        assert (await http.get(pages[2], headers=auth)).status_code == 200
    assert [first.status_code, second.status_code] == [200, 200]
    assert first.json()["results"][0]["data"].startswith("0")
    assert third.status_code == 429
    assert third.json()["code"] == "RATE_LIMITED"
    assert int(third.headers["Retry-After"]) >= 1
    # Another address reads as usual.
    async with http_from("127.0.2.6", budget_node.http_url) as http:
        assert (await http.get(pages[2])).status_code == 200


async def test_a_burst_of_small_history_reads_from_one_address_is_served_whole(
    two_nodes: tuple[ServerNode, ServerNode], address: str, publisher_token: str
) -> None:
    """Each read in flight holds a message's worth of the byte budget (default: 16
    MiB, 1 MiB a message) until it has read its page: reads sent together beyond that
    wait for room instead of being refused, as an app that loads many small pages at
    once would expect."""
    node, _ = two_nodes
    channel = f"budget-burst-{address}"
    auth = {"Authorization": f"Token {publisher_token}"}
    async with http_from(address, node.http_url) as http:
        published = await http.post(
            f"/api/v1/channels/{channel}/messages", json={"data": "small"}, headers=auth
        )
        assert published.status_code == 201, published.text
        pages = await asyncio.gather(
            *(http.get(f"/api/v1/channels/{channel}/messages?since=0") for _ in range(64))
        )
    assert [page.status_code for page in pages] == [200] * 64
    assert all(page.json()["results"][0]["data"] == "small" for page in pages)


async def test_a_service_token_is_not_held_to_its_addresss_budgets(
    budget_node: ServerNode, address: str, service_key: str
) -> None:
    url = f"{budget_node.ws_url}?token={service_key}"
    # More handshakes than the address's budget, all let in.
    outcomes = [await handshake(url, address) for _ in range(HANDSHAKE_BURST + 5)]
    assert outcomes == ["connection_established"] * (HANDSHAKE_BURST + 5)
    # More frames and subscriptions on them than the address's budgets, all answered.
    connections = [await ws_open(url, address) for _ in range(2)]
    for ws in connections:
        await ws.recv()
    await asyncio.gather(
        *(heartbeats(ws, FRAME_BURST, f"s{i}") for i, ws in enumerate(connections))
    )
    answers = [a["type"] for ws in connections for a in await replies(ws, FRAME_BURST)]
    assert answers == ["heartbeat_ack"] * (2 * FRAME_BURST)
    for n in range(SUBSCRIBE_BURST + 4):
        channel = f"budget-service-{address}-{n}"
        await connections[0].send(json.dumps({"type": "subscribe", "channel": channel}))
        assert json.loads(await connections[0].recv())["type"] == "subscribed"
    # More REST requests than the address's budget (the first one, before the node
    # has verified the key, counts against it; those after do not).
    async with http_from(address, budget_node.http_url) as http:
        statuses = [
            (
                await http.post(
                    "/api/v1/channels/budget-service/messages",
                    json={"data": n},
                    headers={"Authorization": f"Token {service_key}"},
                )
            ).status_code
            for n in range(REST_BURST + 10)
        ]
    assert statuses == [201] * (REST_BURST + 10)
    # Meanwhile the same address is still held to them without the token.
    await use_up_handshakes(budget_node, address)
    for ws in connections:
        await ws.close()


@pytest.fixture(scope="module")
def proxied_node(budget_env: dict[str, str]) -> Iterator[ServerNode]:
    node = ServerNode(
        {**budget_env, "PUSH_TRUSTED_PROXIES": "1"}, name="address-budgets-proxied"
    ).start()
    yield node
    node.stop()


async def test_behind_a_trusted_proxy_the_budget_is_the_forwarded_clients(
    proxied_node: ServerNode,
) -> None:
    path = "/api/v1/channels/budget-proxied/messages?since=0"

    async def statuses(client: str, count: int) -> list[int]:
        headers = {"X-Forwarded-For": client}
        async with httpx.AsyncClient(base_url=proxied_node.http_url, timeout=TIMEOUT_SECS) as h:
            return [(await h.get(path, headers=headers)).status_code for _ in range(count)]

    first = await statuses("203.0.113.5", REST_BURST + 10)
    assert 429 in first and first[:REST_BURST] == [200] * REST_BURST
    # The same proxy (127.0.0.1), another client behind it.
    assert await statuses("203.0.113.6", 1) == [200]
    # A proxy that appends the client's port names the same client.
    assert await statuses("203.0.113.5:51000", 1) == [429]
