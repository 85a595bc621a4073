"""Signed subscription tokens on Server-Sent Events, against real nodes (daphne and
uvicorn) that check tokens' expiry every 0.2 s: a stream reads a channel it may read
only through a token (``?subscription_token=<channel>:<token>`` or the
``X-Subscription-Token`` header); a token is refused with the WebSocket's own error, for
its channel alone; a mistake in the request (a token for a channel the stream does not
name, more tokens than channels) is refused before the stream starts; at the token's
``exp`` that channel ends with the WebSocket's error while the others go on; and a new
stream with a fresh token and the cursor resumes without loss or repeat."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.servers import SUBSCRIPTION_TOKEN_SECRET, ServerNode, publish_rest
from tests.sseclient import SseEvent, SseStream, sse_url
from tests.wsclient import open_ws, request

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def node(request: pytest.FixtureRequest, e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    """A node of each server that knows SUBSCRIPTION_TOKEN_SECRET and checks tokens'
    expiry every 0.2 s: the shared daphne one, and a uvicorn one for this module."""
    if request.param == "daphne":
        yield request.getfixturevalue("token_node")
        return
    env = {
        **e2e_env,
        "PUSH_SUBSCRIPTION_TOKEN_SECRET": SUBSCRIPTION_TOKEN_SECRET,
        "PUSH_REVOCATION_CHECK_SECS": "0.2",
    }
    node = ServerNode(env, server="uvicorn", name=f"sse-tokens-{uuid.uuid4().hex[:6]}").start()
    yield node
    node.stop()


RECEIVE_TIMEOUT_SECS = 10.0
STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)


def mint(channel: str, *, ttl_secs: float = 60, **claims: Any) -> str:
    """A token as the app's back-end mints one (the documented HMAC scheme)."""
    now = int(time.time())
    body = {"ch": channel, "iat": now, "exp": int(now + ttl_secs), **claims}
    payload = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    digest = hmac.new(SUBSCRIPTION_TOKEN_SECRET.encode(), payload.encode(), hashlib.sha256)
    return f"{payload}.{base64.urlsafe_b64encode(digest.digest()).rstrip(b'=').decode()}"


def _channel(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Stream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.reader = SseStream(response)
        self.events = self.reader.events()

    async def next(self, timeout: float = RECEIVE_TIMEOUT_SECS) -> SseEvent:
        return await asyncio.wait_for(anext(self.events), timeout)


@asynccontextmanager
async def open_stream(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http,
        http.stream("GET", url, headers=headers or {}) as response,
    ):
        assert response.status_code == 200, await response.aread()
        stream = Stream(response)
        assert (await stream.next()).event == "connection_established"
        yield stream


async def _websocket_refusal(node: ServerNode, channel: str, token: str) -> dict[str, Any]:
    """What a WebSocket subscribe with ``token`` is answered."""
    ws = await open_ws(node.ws_url)
    try:
        reply = await request(ws, {"type": "subscribe", "channel": channel, "token": token})
    finally:
        await ws.close()
    assert reply["type"] == "error", reply
    return reply


async def test_a_token_opens_its_channel_by_parameter_and_by_header(
    node: ServerNode, publisher_token: str
) -> None:
    private, public = _channel("private-sse"), _channel("open")
    url = sse_url(node.http_url, [private, public], tokens={private: mint(private)})
    async with open_stream(url) as stream:
        await publish_rest(node, publisher_token, private, "secret")
        await publish_rest(node, publisher_token, public, "news")
        got = [(await stream.next()).data for _ in range(2)]
    assert [(m["channel"], m["data"]) for m in got] == [(private, "secret"), (public, "news")]

    # A client that can set headers keeps the token out of the URL (and access logs).
    url = sse_url(node.http_url, [private], since=f"{private}:0")
    header = {"X-Subscription-Token": f"{private}:{mint(private)}"}
    async with open_stream(url, header) as stream:
        assert (await stream.next()).data["data"] == "secret"


async def test_refused_tokens_get_the_websockets_error_for_their_channel_alone(
    node: ServerNode, publisher_token: str
) -> None:
    public = _channel("open")
    names = ["forged", "expired", "other channel", "huge", "no exp", "bad user_id"]
    channels = {name: _channel("private-refused") for name in names}
    genuine = mint(channels["forged"])
    tokens = {
        "forged": genuine[:-4] + ("AAAA" if not genuine.endswith("AAAA") else "BBBB"),
        "expired": mint(channels["expired"], ttl_secs=-5),
        "other channel": mint(public),
        "huge": "A" * 5000 + "." + "B" * 43,
        "no exp": mint(channels["no exp"], exp="soon"),
        "bad user_id": mint(channels["bad user_id"], user_id=["a", "list"]),
    }
    by_channel = {channels[name]: token for name, token in tokens.items()}
    url = sse_url(node.http_url, [*by_channel, public], tokens=by_channel)
    async with open_stream(url) as stream:
        errors = [await stream.next() for _ in names]
        await publish_rest(node, publisher_token, public, "still here")
        message = await stream.next()
    assert [e.event for e in errors] == ["error"] * len(names)
    assert [e.data["channel"] for e in errors] == list(by_channel)
    for error, (channel, token) in zip(errors, by_channel.items(), strict=True):
        websocket = await _websocket_refusal(node, channel, token)
        assert (error.data["code"], error.data["message"]) == (
            websocket["code"],
            websocket["message"],
        )
        assert error.data["code"] == "FORBIDDEN"
    assert message.event == "message" and message.data["data"] == "still here"


async def test_a_token_never_opens_a_channel_it_is_not_given_for(node: ServerNode) -> None:
    """Given as another channel's token it is that channel's refusal; given for a channel
    the stream does not name it refuses the request, as the mistake it is."""
    private, other = _channel("private-mine"), _channel("private-other")
    async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http:
        refused = {
            "not named": await http.get(
                sse_url(node.http_url, [private], tokens={other: mint(other)})
            ),
            "more than channels": await http.get(
                sse_url(node.http_url, [private])
                + f"&subscription_token={private}:{mint(private)}" * 2
            ),
            "no channel part": await http.get(
                sse_url(node.http_url, [private], subscription_token=mint(private))
            ),
            "header for another": await http.get(
                sse_url(node.http_url, [private]),
                headers={"X-Subscription-Token": f"{other}:{mint(other)}"},
            ),
            "many tokens": await http.get(
                sse_url(node.http_url, [private])
                # Within daphne's 16 KiB request line, which bounds a URL before us.
                + f"&subscription_token={private}:{'A' * 2000}" * 6
            ),
        }
    answers = {name: (r.status_code, r.json()["code"]) for name, r in refused.items()}
    assert answers == dict.fromkeys(refused, (400, "INVALID_MESSAGE"))
    assert other in refused["not named"].json()["message"]
    assert "'channel'" in refused["not named"].json()["message"]

    url = sse_url(node.http_url, [private], tokens={private: mint(other)})
    async with open_stream(url) as stream:
        error = await stream.next()
    assert error.data["channel"] == private
    assert error.data["message"] == "subscription token refused: issued for another channel"


async def test_a_user_id_on_a_channel_that_is_not_presence_is_taken_as_the_websocket_takes_it(
    node: ServerNode, publisher_token: str
) -> None:
    private = _channel("private-uid")
    token = mint(private, user_id="u-42")
    ws = await open_ws(node.ws_url)
    try:
        reply = await request(ws, {"type": "subscribe", "channel": private, "token": token})
    finally:
        await ws.close()
    assert reply["type"] == "subscribed"
    async with open_stream(sse_url(node.http_url, [private], tokens={private: token})) as s:
        await publish_rest(node, publisher_token, private, 1)
        assert (await s.next()).data["data"] == 1


async def _next_frame(ws: Any, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The WebSocket's next frame that is ``wanted``, past any other."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
        if wanted(frame):
            return frame


async def _presence_event(ws: Any, kind: str, user_id: str) -> dict[str, Any]:
    """The next ``kind`` (join, leave) of ``user_id``."""
    return await _next_frame(
        ws, lambda frame: frame["type"] == kind and frame["member"]["user_id"] == user_id
    )


async def test_a_presence_token_makes_the_stream_its_user_id_as_a_member(
    node: ServerNode,
) -> None:
    room = _channel("presence-room")
    watcher = await open_ws(node.ws_url)
    try:
        watched = {"type": "subscribe", "channel": room, "token": mint(room, user_id="watcher")}
        assert (await request(watcher, watched))["type"] == "subscribed"
        token = mint(room, user_id="sse-user", info={"name": "Ann"})
        async with open_stream(sse_url(node.http_url, [room], tokens={room: token})):
            joined = await _presence_event(watcher, "join", "sse-user")
        await _presence_event(watcher, "leave", "sse-user")
    finally:
        await watcher.close()
    assert joined["channel"] == room and joined["member"]["info"] == {"name": "Ann"}


async def test_exp_ends_only_that_channel_and_a_fresh_token_resumes_it_without_loss(
    node: ServerNode, publisher_token: str
) -> None:
    private, public = _channel("private-exp"), _channel("open")
    ttl_secs = 2
    url = sse_url(
        node.http_url, [private, public], tokens={private: mint(private, ttl_secs=ttl_secs)}
    )
    ws = await open_ws(node.ws_url)
    try:
        ws_token = mint(private, ttl_secs=ttl_secs)
        subscribe = {"type": "subscribe", "channel": private, "token": ws_token}
        assert (await request(ws, subscribe))["type"] == "subscribed"
        async with open_stream(url) as stream:
            await publish_rest(node, publisher_token, private, "before")
            assert (await stream.next()).data["data"] == "before"
            ended = await stream.next(timeout=ttl_secs + RECEIVE_TIMEOUT_SECS)
            ws_ended = await _next_frame(ws, lambda frame: frame["type"] == "error")
            # Ended: no more of the channel on this stream; the other channel goes on.
            missed = [
                await publish_rest(node, publisher_token, private, f"missed {n}") for n in range(3)
            ]
            await publish_rest(node, publisher_token, public, "goes on")
            after = await stream.next()
            cursor = stream.reader.last_event_id
    finally:
        await ws.close()
    assert ended.event == "error"
    assert ended.data["channel"] == private and ended.data["code"] == "FORBIDDEN"
    assert (ended.data["code"], ended.data["message"]) == (ws_ended["code"], ws_ended["message"])
    assert after.data["channel"] == public and after.data["data"] == "goes on"
    assert cursor is not None and f"{private}:1" in cursor.split(",")

    # The client reopens with a fresh token and its cursor: what it missed, once, in order.
    fresh = sse_url(node.http_url, [private, public], tokens={private: mint(private)})
    async with open_stream(fresh, {"Last-Event-ID": cursor}) as stream:
        resumed = [(await stream.next()).data for _ in missed]
        await publish_rest(node, publisher_token, private, "live")
        live = (await stream.next()).data
    assert [m["seq"] for m in resumed] == missed == [2, 3, 4]
    assert [m["data"] for m in resumed] == ["missed 0", "missed 1", "missed 2"]
    assert live["seq"] == 5 and live["data"] == "live"
