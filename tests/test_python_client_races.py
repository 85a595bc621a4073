"""The Python client against a scripted server (``websockets``): what it does when
replies come late, twice or out of turn, and when a channel's gap repair is slow."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fossil_delta
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.protocol import State
from websockets.typing import Subprotocol

from tests.test_python_client import (
    CLIENT_PATH,
    FAST,
    FakeHistory,
    PushClient,
    Subscription,
    message,
    pushclient,
)
from tests.waiting import wait_until

from pushclient.delta import data_text  # isort: skip (after the client is importable)

Script = Callable[[ServerConnection], Awaitable[None]]


def established(heartbeat_interval: float = 25) -> str:
    return json.dumps(
        {
            "type": "connection_established",
            "connection_id": "c",
            "server_id": "scripted",
            "heartbeat_interval": heartbeat_interval,
            "timestamp": 0,
        }
    )


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """Serves each connection with the given script; yields a function that starts a
    server and returns its WebSocket URL."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(script: Script) -> str:
            async def handler(ws: ServerConnection) -> None:
                await script(ws)
                await ws.wait_closed()

            server = await stack.enter_async_context(
                serve(handler, "127.0.0.1", 0, subprotocols=[Subprotocol("v1.json")])
            )
            port = server.sockets[0].getsockname()[1]
            return f"ws://127.0.0.1:{port}/ws/"

        yield start


async def test_a_repeated_connection_established_does_not_add_heartbeats(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # A server (or a proxy replaying frames) that greets twice: the client must still
    # send one heartbeat per interval, not one per greeting.
    interval = 0.1
    heartbeats: list[float] = []
    started: list[float] = []

    async def script(ws: ServerConnection) -> None:
        started.append(time.monotonic())
        for _ in range(20):
            await ws.send(established(interval))
        async for frame in ws:
            if json.loads(frame)["type"] == "heartbeat":
                heartbeats.append(time.monotonic())

    client = PushClient(await scripted(script), **FAST)
    await client.connect()
    try:
        await wait_until(lambda: len(heartbeats) >= 3, "three heartbeats", timeout=10)
    finally:
        await client.close()
    # One heartbeat at most per interval since the first greeting went out.
    assert len(heartbeats) <= (heartbeats[-1] - started[0]) / interval + 1, heartbeats


@pytest.mark.parametrize("interval", [0, -1, 1e-9, "5", None])
async def test_a_greeting_with_a_nonsense_heartbeat_interval_sends_no_flood_of_heartbeats(
    scripted: Callable[[Script], Awaitable[str]], interval: Any
) -> None:
    # A server or proxy that sends 0, a negative, a tiny or no number: the client takes
    # its default or at least 0.1 s, never a loop of heartbeats as fast as it can send.
    heartbeats: list[float] = []

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps({**json.loads(established()), "heartbeat_interval": interval}))
        async for frame in ws:
            if json.loads(frame)["type"] == "heartbeat":
                heartbeats.append(time.monotonic())

    client = PushClient(await scripted(script), **FAST)
    await client.connect()
    try:
        await asyncio.sleep(0.5)
    finally:
        await client.close()
    assert len(heartbeats) <= 6, len(heartbeats)


def subscribed(request: dict[str, Any], seq: int, **fields: Any) -> str:
    """The reply to ``request``, a subscribe of ``news``."""
    reply = {"type": "subscribed", "id": request["id"], "channel": "news", "seq": seq}
    return json.dumps({**reply, **fields})


def news(seq: int, **fields: Any) -> str:
    """A message of ``news`` whose data is its seq."""
    return json.dumps({"type": "message", "channel": "news", "seq": seq, "data": seq, **fields})


async def replies(ws: ServerConnection) -> AsyncIterator[dict[str, Any]]:
    """The client's requests; ``unsubscribe`` and ``heartbeat`` are answered here."""
    async for frame in ws:
        request = json.loads(frame)
        if request["type"] == "unsubscribe":
            await ws.send(
                json.dumps({"type": "unsubscribed", "id": request["id"], "channel": "news"})
            )
        elif request["type"] != "heartbeat":
            yield request


@pytest.mark.parametrize("late_reply", ["error", "subscribed"])
async def test_a_late_reply_to_an_old_subscribe_leaves_the_new_subscription_alone(
    scripted: Callable[[Script], Awaitable[str]], late_reply: str
) -> None:
    # The resubscribe after a reconnect is still unanswered when the application
    # unsubscribes and subscribes again. The old request's late answer (a refusal, or
    # a resume that could not recover) belongs to the old subscription: the new one
    # must go on receiving.
    connections: list[ServerConnection] = []

    async def script(ws: ServerConnection) -> None:
        connections.append(ws)
        await ws.send(established())
        subscribes: list[dict[str, Any]] = []
        async for request in replies(ws):
            subscribes.append(request)
            if len(connections) == 1:
                await ws.send(subscribed(request, 3))
                await ws.close(1012)
                return
            if len(subscribes) == 2:
                old, new = subscribes
                if late_reply == "error":
                    refusal = {"type": "error", "id": old["id"], "code": "FORBIDDEN"}
                    await ws.send(json.dumps({**refusal, "message": "no"}))
                else:
                    await ws.send(subscribed(old, 0, recovered=False))
                await ws.send(subscribed(new, 7))
                for seq in (8, 9):
                    await ws.send(news(seq))

    received: list[int] = []
    trouble: list[dict[str, Any]] = []
    client = PushClient(await scripted(script), **FAST)
    client.on("gap", trouble.append)
    client.on("unrecovered", trouble.append)
    await client.connect()
    try:
        await client.subscribe("news")
        await wait_until(
            lambda: len(connections) == 2 and client.state == "connected", "a reconnect"
        )
        await client.unsubscribe("news")
        subscription = await client.subscribe("news", lambda m: received.append(m["seq"]))
        assert subscription.seq == 7
        await wait_until(lambda: received == [8, 9], "the new subscription's messages", timeout=5)
    finally:
        await client.close()
    # The old subscription's news is not the new one's.
    assert trouble == []


class GatedHistory(FakeHistory):
    """A history read that waits until the test lets it answer (a slow database)."""

    def __init__(self, stored: range) -> None:
        super().__init__(stored)
        self.gate = threading.Event()

    def __call__(self, url: str, headers: dict[str, str], timeout_secs: float) -> Any:
        self.gate.wait(10)
        return super().__call__(url, headers, timeout_secs)


async def test_a_slow_gap_repair_holds_a_bounded_number_of_messages_and_loses_none() -> None:
    # The channel goes on while its gap is read: past the bound the client keeps
    # nothing more, and reads what it left out from the history afterwards.
    history = GatedHistory(range(1, 41))
    client = PushClient("ws://push.test/ws/", max_held_messages=5)
    client.get_json = history
    seen: dict[str, list[Any]] = {"seqs": [], "unrecovered": [], "error": []}
    client.on("unrecovered", seen["unrecovered"].append)
    client.on("error", seen["error"].append)
    ready = asyncio.get_running_loop().create_future()
    subscription = Subscription("news", lambda m: seen["seqs"].append(m["seq"]), 3, ready)
    client._subscriptions["news"] = subscription
    held_most = 0
    for seq in [4, *range(6, 41)]:
        await client._on_message(message(seq))
        held_most = max(held_most, len(subscription.held or ()))
    assert seen["seqs"] == [4]
    history.gate.set()
    await wait_until(lambda: subscription.held is None, "the repair", timeout=10)
    assert held_most <= 5
    assert seen["seqs"] == list(range(4, 41))
    assert seen["unrecovered"] == seen["error"] == []


async def test_after_recovered_false_no_seq_reaches_the_handler_after_the_refetch_point(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # Resumed from 2, the server kept only 6 to 8: it answers recovered false with seq
    # 8 and replays 6 to 8. The application refetches the channel's state up to 8 when
    # it hears unrecovered; 6 to 8 handed over as well would be applied twice.
    async def script(ws: ServerConnection) -> None:
        await ws.send(established())
        async for request in replies(ws):
            await ws.send(subscribed(request, 8, recovered=False))
            for seq in (6, 7, 8, 9):
                await ws.send(news(seq))

    received: list[int] = []
    unrecovered: list[dict[str, Any]] = []
    client = PushClient(await scripted(script), **FAST)
    client.on("unrecovered", unrecovered.append)
    await client.connect()
    try:
        await client.subscribe("news", lambda m: received.append(m["seq"]), since=2)
        await wait_until(lambda: 9 in received, "the live message", timeout=10)
    finally:
        await client.close()
    assert received == [9]
    assert unrecovered == [{"channel": "news", "since": 2, "seq": 8}]


async def test_a_subscribe_given_up_by_its_caller_is_not_held(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # asyncio.wait_for(client.subscribe(...), 1) timing out: the caller was told it
    # failed, so a late reply must deliver nothing to its handler, and subscribing to the
    # channel again must ask the server again and work.
    subscribes: list[dict[str, Any]] = []

    async def script(ws: ServerConnection) -> None:
        await ws.send(established())
        async for request in replies(ws):
            subscribes.append(request)
            if len(subscribes) == 2:
                for request in subscribes:
                    await ws.send(subscribed(request, 3))
                await ws.send(news(4))

    first: list[int] = []
    second: list[int] = []
    client = PushClient(await scripted(script), **FAST)
    await client.connect()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.subscribe("news", lambda m: first.append(m["seq"])), 0.1)
        subscription = await asyncio.wait_for(
            client.subscribe("news", lambda m: second.append(m["seq"])), 10
        )
        assert subscription.seq == 3
        await wait_until(lambda: second == [4], "the message", timeout=10)
    finally:
        await client.close()
    assert first == []


async def test_a_long_gap_is_read_and_delivered_a_page_at_a_time() -> None:
    # A gap of thousands of messages: each history page reaches the handler before the
    # next one is read, so the client holds one page, not the whole range.
    seen: list[int] = []
    reads: list[tuple[int, int]] = []  # (the read's since, the last seq delivered then)

    class RecordingHistory(FakeHistory):
        def __call__(self, url: str, headers: dict[str, str], timeout_secs: float) -> Any:
            reads.append((int(parse_qs(urlsplit(url).query)["since"][0]), seen[-1]))
            return super().__call__(url, headers, timeout_secs)

    client = PushClient("ws://push.test/ws/")
    client.get_json = RecordingHistory(range(1, 2600))
    ready = asyncio.get_running_loop().create_future()
    subscription = Subscription("news", lambda m: seen.append(m["seq"]), 3, ready)
    client._subscriptions["news"] = subscription
    for seq in (4, 2500):
        await client._on_message(message(seq))
    await wait_until(lambda: subscription.held is None, "the repair", timeout=10)
    assert seen == list(range(4, 2501))
    assert reads == [(4, 4), (1004, 1004), (2004, 2004)]


async def test_an_unsubscribe_while_the_resubscribe_waits_for_its_retry_succeeds(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # After a reconnect the resubscribe was refused for now (UNAVAILABLE) and waits to be
    # asked again; the application unsubscribes meanwhile. The server holds no such
    # subscription and says NOT_SUBSCRIBED: what the application asked for is done.
    connections: list[ServerConnection] = []

    async def script(ws: ServerConnection) -> None:
        connections.append(ws)
        await ws.send(established())
        async for frame in ws:
            request = json.loads(frame)
            answer: dict[str, Any] = {"id": request.get("id"), "channel": "news"}
            if request["type"] == "subscribe" and len(connections) == 1:
                await ws.send(subscribed(request, 3))
                await ws.close(1012)
                return
            elif request["type"] == "subscribe":
                error = {"type": "error", "code": "UNAVAILABLE", "message": "down"}
                await ws.send(json.dumps({**answer, **error}))
            elif request["type"] == "unsubscribe":
                error = {"type": "error", "code": "NOT_SUBSCRIBED", "message": "not subscribed"}
                await ws.send(json.dumps({**answer, **error}))

    errors: list[str] = []
    draws = iter([0.0])  # reconnect at once; the resubscribe's retry waits 5 s
    client = PushClient(await scripted(script), base_delay_secs=5.0, rand=lambda: next(draws, 1.0))
    client.on("error", lambda detail: errors.append(detail["code"]))
    await client.connect()
    try:
        await client.subscribe("news")
        await wait_until(lambda: errors == ["UNAVAILABLE"], "the refused resubscribe", timeout=10)
        assert await client.unsubscribe("news") is None
        assert client.last_seq("news") is None
    finally:
        await client.close()


async def test_connections_closed_right_after_the_greeting_back_off_as_failures_do(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # A node that greets and then closes at once (a server error, a slow consumer's
    # replay that overflows again): reconnecting at the base delay every time would
    # have every client of that node knock again and again within half a second.
    async def script(ws: ServerConnection) -> None:
        await ws.send(established())
        await ws.close(1011)

    delays: list[float] = []
    client = PushClient(
        await scripted(script), base_delay_secs=0.01, max_delay_secs=0.08, rand=lambda: 1.0
    )
    client.on("close", lambda detail: delays.append(detail.get("delay_secs", -1)))
    await client.connect()
    try:
        await wait_until(lambda: len(delays) >= 5, "five reconnects", timeout=10)
    finally:
        await client.close()
    assert delays[:5] == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.08])


async def test_a_delta_resync_whose_unsubscribe_is_refused_still_subscribes_again(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # A delta that does not apply makes the client unsubscribe and subscribe again from
    # the last seq it delivered. An unsubscribe answered with an error (here
    # NOT_SUBSCRIBED; a reply that comes too late is the same) must not leave the
    # channel without a subscription, silent for the rest of the connection.
    subscribes: list[dict[str, Any]] = []

    async def script(ws: ServerConnection) -> None:
        await ws.send(established())
        async for frame in ws:
            request = json.loads(frame)
            answer = {"id": request["id"], "channel": "news"}
            if request["type"] == "unsubscribe":
                error = {"type": "error", "code": "NOT_SUBSCRIBED", "message": "not subscribed"}
                await ws.send(json.dumps({**answer, **error}))
                continue
            if request["type"] != "subscribe":
                continue
            subscribes.append(request)
            await ws.send(subscribed(request, 0 if len(subscribes) == 1 else 2, delta="fossil"))
            if len(subscribes) == 1:
                await ws.send(news(1))
                # Not a delta of anything: it does not apply.
                broken = {"type": "message", "channel": "news", "seq": 2, "delta": True}
                await ws.send(json.dumps({**broken, "data_delta": "bm90IGEgZGVsdGE="}))
            else:
                await ws.send(news(2))

    received: list[int] = []
    client = PushClient(await scripted(script), **FAST)
    await client.connect()
    try:
        await client.subscribe("news", lambda m: received.append(m["seq"]), delta=True)
        await wait_until(lambda: received == [1, 2], "both messages", timeout=5)
    finally:
        await client.close()
    assert subscribes[1]["since"] == 1


async def test_a_handshake_refused_with_retry_after_is_not_tried_again_sooner() -> None:
    # A load balancer in front of the nodes answers 503 with Retry-After: sooner is
    # refused again, and a crowd of clients that ignore it keeps the balancer busy.
    attempts: list[float] = []

    def refuse(ws: ServerConnection, request: Any) -> Any:
        attempts.append(time.monotonic())
        if len(attempts) > 2:
            return None  # the third attempt goes through
        response = ws.respond(503, "busy\n")
        response.headers["Retry-After"] = "1"
        return response

    async def handler(ws: ServerConnection) -> None:
        await ws.send(established())
        await ws.wait_closed()

    delays: list[float] = []
    subprotocols = [Subprotocol("v1.json")]
    async with serve(
        handler, "127.0.0.1", 0, subprotocols=subprotocols, process_request=refuse
    ) as server:
        port = server.sockets[0].getsockname()[1]
        client = PushClient(f"ws://127.0.0.1:{port}/ws/", base_delay_secs=0.05, max_delay_secs=2)
        client.on("close", lambda detail: delays.append(detail.get("delay_secs", -1)))
        await asyncio.wait_for(client.connect(), 10)
        await client.close()
    assert delays[:2] == [1.0, 1.0]
    assert attempts[2] - attempts[1] >= 1.0 - 0.01


async def test_cli_subscribe_closed_for_good_by_the_server_exits_with_failure(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # The server closes with 1008 (the token was revoked, or the client went over its
    # rate): a script watching `python -m pushclient subscribe` must see it failed.
    async def script(ws: ServerConnection) -> None:
        await ws.send(established())
        async for request in replies(ws):
            await ws.send(subscribed(request, 0))
            await ws.close(1008, "token revoked")

    # This tree's client, whatever copy the environment installed.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "pushclient", "subscribe", "news", "--url", await scripted(script)),
        env={**os.environ, "PYTHONPATH": str(CLIENT_PATH)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1, err.decode()


async def test_close_called_from_a_handler_closes_the_connection(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    # "Stop after the message I wanted": close() from inside a handler runs on the
    # client's own read loop. The connection must close, and nothing more be handed on.
    server_side: list[ServerConnection] = []

    async def script(ws: ServerConnection) -> None:
        server_side.append(ws)
        await ws.send(established())
        async for request in replies(ws):
            await ws.send(subscribed(request, 0))
            for seq in (1, 2):
                await ws.send(news(seq))

    received: list[int] = []
    client = PushClient(await scripted(script), **FAST)

    async def handler(message: dict[str, Any]) -> None:
        received.append(message["seq"])
        await client.close()

    await client.connect()
    await client.subscribe("news", handler)
    await wait_until(lambda: received, "the first message", timeout=5)
    await wait_until(lambda: server_side[0].state is State.CLOSED, "the close", timeout=5)
    assert received == [1]
    assert client.state == "disconnected"


async def test_a_handler_that_unsubscribes_during_a_gap_repair_gets_nothing_more() -> None:
    client = PushClient("ws://push.test/ws/")
    client.get_json = FakeHistory(range(1, 10))
    seen: list[int] = []
    gaps: list[dict[str, Any]] = []
    client.on("gap", gaps.append)

    async def handler(message: dict[str, Any]) -> None:
        seen.append(message["seq"])
        if message["seq"] == 5:
            await client.unsubscribe("news")  # returns at once: no await lets a cancel in

    ready = asyncio.get_running_loop().create_future()
    subscription = Subscription("news", handler, 3, ready)
    client._subscriptions["news"] = subscription
    for seq in (4, 8, 9):
        await client._on_message(message(seq))
    repair = subscription.repair
    assert repair is not None
    await asyncio.wait([repair])
    assert seen == [4, 5]
    # The repair ended there: it did not go round again for the held 8 and 9.
    assert [(gap["from"], gap["to"]) for gap in gaps] == [(5, 7)]


async def test_a_delta_that_would_make_data_over_the_frame_limit_is_refused() -> None:
    # A broken or hostile server: a few bytes of copy commands can declare and build
    # gigabytes out of a small base.
    client = PushClient("ws://push.test/ws/", max_frame_bytes=2_000)
    seen: list[int] = []
    errors: list[dict[str, Any]] = []
    client.on("error", errors.append)
    ready = asyncio.get_running_loop().create_future()
    subscription = Subscription("news", lambda m: seen.append(m["seq"]), 0, ready, delta=True)
    subscription.delta_agreed = True
    client._subscriptions["news"] = subscription
    base, large = {"pad": "x" * 100}, {"pad": "y" * 4_000}
    await client._on_message({**json.loads(news(1)), "data": base})
    text_delta = fossil_delta.create_delta(data_text(base).encode(), data_text(large).encode())
    delta = {"delta": True, "data_delta": base64.b64encode(text_delta).decode()}
    await client._on_message({"type": "message", "channel": "news", "seq": 2, **delta})
    assert seen == [1]
    assert [error["code"] for error in errors] == ["DELTA_MISMATCH"]
    assert "2000" in errors[0]["message"]
    if subscription.resync is not None:
        await asyncio.wait([subscription.resync])


async def test_a_repair_in_flight_stops_when_its_channel_is_refused() -> None:
    # The resubscribe after a reconnect is refused for good (FORBIDDEN: the grant was
    # revoked) while the channel's gap is being read: the repair must end there, not
    # read the history again and again for a channel the client no longer has.
    history = GatedHistory(range(1, 10))
    client = PushClient("ws://push.test/ws/")
    client.get_json = history
    ready = asyncio.get_running_loop().create_future()
    ready.set_result({})
    subscription = Subscription("news", None, 3, ready)
    client._subscriptions["news"] = subscription
    for seq in (4, 8):
        await client._on_message(message(seq))
    repair = subscription.repair
    assert repair is not None
    client._pending[1] = pushclient.client._Pending(future=None, subscription=subscription)
    client._on_error({"type": "error", "id": 1, "code": "FORBIDDEN", "message": "revoked"})
    history.gate.set()
    await wait_until(repair.done, "the repair to end", timeout=5)
    assert len(history.requests) <= 1
