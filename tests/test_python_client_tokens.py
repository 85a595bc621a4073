"""Signed subscription tokens in the Python client (``subscribe(..., token=...)``): the
token on every subscribe, a provider asked again after a reconnect and before the
token's ``exp`` (which extends the subscription: no replay, no gap), a subscription the
server ends, and providers that fail. Against a scripted server, and against a real node
whose revocation check runs every 0.2 s, so that a token's expiry is seen at once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import shlex
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fossil_delta
import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from tests.servers import SUBSCRIPTION_TOKEN_SECRET, ServerNode, publish_rest
from tests.test_python_client import (
    FAST,
    FakeHistory,
    PushClient,
    PushError,
    State,
    feed,
    run_cli,
)
from tests.test_python_client_races import established
from tests.waiting import wait_until

from pushclient import TokenProviderFailed  # isort: skip (after the client is importable)
from pushclient.signing import subscription_token  # isort: skip
from pushclient.delta import data_text  # isort: skip
from pushclient.tokens import (  # isort: skip
    MIN_TOKEN_REFRESH_SECS,
    token_claims,
    token_refresh_delay_secs,
)

e2e = pytest.mark.e2e

WAIT_SECS = 20.0


def mint(
    channel: str, *, ttl_secs: float, iat_ago_secs: int = 0, secret: str = SUBSCRIPTION_TOKEN_SECRET
) -> str:
    """A signed subscription token as the app's own back-end makes one (the documented
    HMAC scheme); ``iat_ago_secs`` dates it back, so that the client plans its refresh
    for later than the token lives."""
    now = int(time.time())
    claims = {"ch": channel, "iat": now - iat_ago_secs, "exp": int(now + ttl_secs)}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    signature = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def unsigned(claims: Any) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{payload}.sig"


class Provider:
    """A token provider that counts its calls, fails the next ``failures`` of them, and
    waits while ``held`` (a back-end that is slow to answer)."""

    def __init__(self, channel: str, *, ttl_secs: float = 600, iat_ago_secs: int = 0) -> None:
        self.channel = channel
        self.ttl_secs = ttl_secs
        self.iat_ago_secs = iat_ago_secs
        self.calls: list[float] = []
        self.tokens: list[str] = []
        self.failures = 0
        self.open = asyncio.Event()
        self.open.set()

    async def __call__(self, channel: str) -> str:
        assert channel == self.channel
        self.calls.append(time.monotonic())
        await self.open.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the back-end did not answer")
        self.tokens.append(mint(channel, ttl_secs=self.ttl_secs, iat_ago_secs=self.iat_ago_secs))
        return self.tokens[-1]


# ----- what the token says --------------------------------------------------------------


def test_the_claims_are_read_without_verifying_and_a_malformed_token_has_none() -> None:
    assert token_claims(unsigned({"ch": "private-x", "exp": 5, "info": {"n": "Zoë"}})) == {
        "ch": "private-x",
        "exp": 5,
        "info": {"n": "Zoë"},
    }
    not_json = base64.urlsafe_b64encode(b"not json").decode()
    for bad in ["", "not base64!.x", f"{not_json}.x", unsigned([1])]:
        assert token_claims(bad) is None, bad


@pytest.mark.parametrize(
    ("lifetime", "delay"),
    [(3600, 3240), (60, 54), (20, 15), (4, 2), (1, MIN_TOKEN_REFRESH_SECS)],
    ids=["90%", "90% of a minute", "5 s before", "half-way", "not within 1 s"],
)
def test_a_token_is_refreshed_at_90_percent_and_at_least_5_s_before_exp(
    lifetime: int, delay: float
) -> None:
    assert token_refresh_delay_secs(unsigned({"iat": 1000, "exp": 1000 + lifetime})) == delay


def test_the_refresh_follows_the_lifetime_not_the_clients_clock() -> None:
    # exp - iat, whatever our clock says (here far ahead of the back-end's).
    assert token_refresh_delay_secs(unsigned({"iat": 1000, "exp": 1060}), now=9e9) == 54
    # Without iat: exp minus now; already expired by our clock: once a second, no loop.
    assert token_refresh_delay_secs(unsigned({"exp": 100}), now=40) == 54
    assert token_refresh_delay_secs(unsigned({"exp": 100}), now=200) == MIN_TOKEN_REFRESH_SECS
    assert token_refresh_delay_secs(unsigned({"ch": "private-x"})) is None
    assert token_refresh_delay_secs("garbage") is None


# ----- against a scripted server --------------------------------------------------------


class Scripted:
    """Starts scripted servers (``Server``) on free ports, stopped with the test."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self.stack = stack

    async def start(self, server: Server) -> str:
        async def handler(ws: ServerConnection) -> None:
            await server.script(ws)
            await ws.wait_closed()

        listening = await self.stack.enter_async_context(
            serve(handler, "127.0.0.1", 0, subprotocols=[Subprotocol("v1.json")])
        )
        return f"ws://127.0.0.1:{listening.sockets[0].getsockname()[1]}/ws/"


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    async with contextlib.AsyncExitStack() as stack:
        yield Scripted(stack)


class Server:
    """Every frame the client sent, by connection; the script answers subscribes
    ``subscribed`` at ``seq`` unless told otherwise."""

    def __init__(self) -> None:
        self.connections: list[ServerConnection] = []
        self.frames: list[list[dict[str, Any]]] = []
        self.answer = True
        self.seq = 0

    def subscribes(self, connection: int = -1) -> list[dict[str, Any]]:
        return [f for f in self.frames[connection] if f["type"] == "subscribe"]

    async def script(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        frames: list[dict[str, Any]] = []
        self.frames.append(frames)
        await ws.send(established())
        async for raw in ws:
            frame = json.loads(raw)
            frames.append(frame)
            if frame["type"] == "subscribe" and self.answer:
                reply = {"type": "subscribed", "id": frame["id"], "channel": frame["channel"]}
                await ws.send(json.dumps({**reply, "seq": self.seq, "delta": "fossil"}))

    async def send(self, envelope: dict[str, Any] | str) -> None:
        text = envelope if isinstance(envelope, str) else json.dumps(envelope)
        await self.connections[-1].send(text)


async def started(
    scripted: Scripted, server: Server, **options: Any
) -> tuple[PushClient, list[dict[str, Any]]]:
    client = PushClient(await scripted.start(server), **{**FAST, **options})
    errors: list[dict[str, Any]] = []
    client.on("error", errors.append)
    await client.connect()
    return client, errors


def message(seq: int, **fields: Any) -> dict[str, Any]:
    return {"type": "message", "channel": "private-x", "seq": seq, "data": seq, **fields}


async def test_a_token_string_rides_on_the_first_subscribe_and_the_resume_after_a_reconnect(
    scripted: Scripted,
) -> None:
    server = Server()
    server.seq = 4
    client, errors = await started(scripted, server)
    token = unsigned({"ch": "private-x", "exp": time.time() + 600})
    try:
        await client.subscribe("private-x", token=token)
        await server.send(message(5))
        await wait_until(lambda: client.last_seq("private-x") == 5, "seq 5")
        await server.connections[0].close(1012)
        await wait_until(lambda: len(server.frames) == 2 and server.subscribes(), "the resume")
    finally:
        await client.close()
    assert [(f.get("token"), f.get("since")) for f in server.subscribes(0)] == [(token, None)]
    assert [(f.get("token"), f.get("since")) for f in server.subscribes(1)] == [(token, 5)]
    assert errors == []


async def test_before_exp_a_fresh_token_extends_the_subscription_and_keeps_the_delta_base(
    scripted: Scripted,
) -> None:
    server = Server()
    client, errors = await started(scripted, server)
    tokens = iter(range(1, 10))

    def provider(channel: str) -> str:  # a plain function works too
        now = int(time.time())
        return unsigned({"ch": channel, "iat": now, "exp": now + 2, "n": next(tokens)})

    received: list[Any] = []
    base, following = {"v": 1, "rows": ["a", "b", "c"] * 8}, {"v": 2, "rows": ["a", "b", "c"] * 8}
    try:
        await client.subscribe("private-x", lambda m: received.append(m["data"]), token=provider)
        await server.send(message(1, data=base))
        obtained = time.monotonic()
        # A 2 s token is refreshed half-way through.
        await wait_until(lambda: len(server.subscribes()) == 2, "the refresh", timeout=5)
        assert time.monotonic() - obtained >= 0.9
        refresh = server.subscribes()[1]
        assert token_claims(refresh["token"])["n"] == 2
        assert refresh["since"] == 1  # should the server have ended it meanwhile: no gap
        # The server's stream goes on through the extension: its next delta applies.
        delta = fossil_delta.create_delta(data_text(base).encode(), data_text(following).encode())
        encoded = base64.b64encode(delta).decode()
        await server.send({**message(2, delta=True, data_delta=encoded), "data": None})
        await wait_until(lambda: len(received) == 2, "the delta after the refresh")
        await wait_until(lambda: len(server.subscribes()) == 3, "the next refresh", timeout=5)
    finally:
        await client.close()
    assert received == [base, following]
    assert errors == []


async def test_a_refused_fresh_token_drops_the_subscription_and_stops_the_servers_stream(
    scripted: Scripted,
) -> None:
    server = Server()
    client, errors = await started(scripted, server)
    tokens = [unsigned({"iat": int(time.time()), "exp": int(time.time()) + 2}), "refused.x"]
    ended: list[dict[str, Any]] = []
    client.on("ended", ended.append)
    try:
        await client.subscribe("private-x", token=lambda channel: tokens.pop(0))
        server.answer = False  # the refresh is answered by the test
        await wait_until(lambda: len(server.subscribes()) == 2, "the refresh", timeout=5)
        refusal = {"type": "error", "code": "FORBIDDEN", "message": "subscription token refused"}
        await server.send({**refusal, "id": server.subscribes()[1]["id"]})
        await wait_until(lambda: errors, "the refusal told")
        await wait_until(
            lambda: [f for f in server.frames[0] if f["type"] == "unsubscribe"], "an unsubscribe"
        )
    finally:
        await client.close()
    assert [e["code"] for e in errors] == ["FORBIDDEN"]
    assert ended == [
        {"channel": "private-x", "code": "FORBIDDEN", "message": "subscription token refused"}
    ]
    assert client.last_seq("private-x") is None


async def test_without_a_provider_a_subscription_the_server_ended_is_dropped_and_told(
    scripted: Scripted,
) -> None:
    server = Server()
    server.seq = 3
    client, errors = await started(scripted, server)
    token = unsigned({"ch": "private-x", "exp": time.time() + 600})
    received: list[int] = []
    told_ended: list[dict[str, Any]] = []
    client.on("ended", told_ended.append)
    try:
        await client.subscribe("private-x", token=token)
        ended = {"type": "error", "code": "FORBIDDEN", "message": "token expired"}
        await server.send({**ended, "channel": "private-x"})
        await wait_until(lambda: errors, "the error told")
        assert told_ended == [
            {"channel": "private-x", "code": "FORBIDDEN", "message": "token expired"}
        ]
        assert client.last_seq("private-x") is None
        # Subscribing again asks the server again, and receives again.
        await client.subscribe("private-x", lambda m: received.append(m["seq"]), token=token)
        await server.send(message(4))
        await wait_until(lambda: received == [4], "the new subscription's message")
    finally:
        await client.close()
    assert [(e["code"], e["envelope"]["channel"]) for e in errors] == [("FORBIDDEN", "private-x")]
    assert len(server.subscribes()) == 2


async def test_endings_one_after_another_back_off_and_recover_from_the_last_seq(
    scripted: Scripted,
) -> None:
    server = Server()
    client, errors = await started(
        scripted, server, base_delay_secs=0.05, max_delay_secs=1.0, rand=lambda: 1.0
    )
    provider = Provider("private-x")
    try:
        await client.subscribe("private-x", token=provider)
        await server.send(message(1))
        waits = []
        for ending in range(1, 4):
            ended = time.monotonic()
            await server.send({"type": "error", "code": "FORBIDDEN", "channel": "private-x"})
            await wait_until(lambda n=ending: len(server.subscribes()) == n + 1, "a resubscribe")
            waits.append(time.monotonic() - ended)
    finally:
        await client.close()
    # backoff(0), (1), (2) with rand() = 1: 0.05, 0.1, 0.2 s; then from the last seq.
    assert all(wait >= least for wait, least in zip(waits, [0.05, 0.1, 0.2], strict=True)), waits
    assert [f["since"] for f in server.subscribes()[1:]] == [1, 1, 1]
    assert len(provider.calls) == 4
    assert errors == []


@pytest.mark.parametrize(
    ("provider", "hint"),
    [
        (lambda channel: 1 / 0, "ZeroDivisionError"),
        (lambda channel: {"token": "x"}, "it gave dict, not a token"),
        (lambda channel: "", "it gave an empty string"),
        (lambda: "forgot the channel", "TypeError"),
        (lambda channel: asyncio.sleep(60), "no token within 0.2 s"),
    ],
    ids=["raises", "no string", "empty", "wrong signature", "never answers"],
)
async def test_a_provider_that_fails_fails_the_first_subscribe_and_sends_nothing(
    scripted: Scripted, provider: Any, hint: str
) -> None:
    server = Server()
    client, _ = await started(scripted, server, request_timeout_secs=0.2)
    try:
        with pytest.raises(TokenProviderFailed, match=hint) as failed:
            await client.subscribe("private-x", token=provider)
        assert failed.value.code == "TOKEN_PROVIDER_FAILED"
        assert "'private-x'" in failed.value.message
        assert client.last_seq("private-x") is None
        # Not held: the reconnect does not ask for it.
        await server.connections[0].close(1012)
        await wait_until(lambda: len(server.frames) == 2, "the reconnect")
    finally:
        await client.close()
    assert server.subscribes(0) == server.subscribes(1) == []


async def test_a_provider_failing_after_a_reconnect_is_asked_again_with_growing_delays(
    scripted: Scripted,
) -> None:
    server = Server()
    server.seq = 7
    client, errors = await started(
        scripted, server, base_delay_secs=0.05, max_delay_secs=1.0, rand=lambda: 1.0
    )
    provider = Provider("private-x")
    try:
        await client.subscribe("private-x", token=provider)
        provider.failures = 3
        await server.connections[0].close(1012)
        await wait_until(lambda: len(server.frames) == 2 and server.subscribes(), "the resume")
    finally:
        await client.close()
    assert len(provider.calls) == 5
    waits = [b - a for a, b in zip(provider.calls[1:], provider.calls[2:], strict=False)]
    # After each failure: backoff(0), (1), (2) with rand() = 1, never at once.
    assert all(w >= least for w, least in zip(waits, [0.05, 0.1, 0.2], strict=True)), waits
    assert [e["code"] for e in errors] == ["TOKEN_PROVIDER_FAILED"] * 3
    assert server.subscribes()[0]["since"] == 7


async def test_no_token_is_logged_or_told_whatever_fails(
    scripted: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server()
    client, errors = await started(scripted, server)
    secret = unsigned({"iat": int(time.time()), "exp": int(time.time()) + 2, "n": "secret"})
    tokens = [secret, secret]

    def provider(channel: str) -> str:
        if tokens:
            return tokens.pop()
        raise RuntimeError("no more tokens")

    caplog.set_level("DEBUG")
    try:
        await client.subscribe("private-x", token=provider)
        server.answer = False
        await wait_until(lambda: len(server.subscribes()) == 2, "the refresh", timeout=5)
        await server.send({"type": "error", "id": server.subscribes()[1]["id"], "code": "X"})
        await wait_until(lambda: errors, "the refusal")
    finally:
        await client.close()
    told = json.dumps(errors) + caplog.text
    assert secret.split(".")[0] not in told


# ----- against a real node --------------------------------------------------------------


def private_channel() -> str:
    return f"private-tokens-{uuid.uuid4().hex[:8]}"


class Watched:
    """What the application sees of one channel: seqs, errors, and the ends the server
    announced (which the client may recover from without a word to the application)."""

    def __init__(self, client: PushClient, channel: str) -> None:
        self.seqs: list[int] = []
        self.errors: list[dict[str, Any]] = []
        self.ended: list[str] = []
        client.on("error", self.errors.append)
        on_ended = client._on_subscription_ended

        def ended(subscription: Any, error: PushError) -> None:
            self.ended.append(error.code)
            on_ended(subscription, error)

        client._on_subscription_ended = ended

    def handler(self, message: dict[str, Any]) -> None:
        self.seqs.append(message["seq"])


def drop_connection(client: PushClient) -> None:
    """The network drops the client's connection (no close frame)."""
    assert client._ws is not None
    client._ws.transport.abort()


@e2e
async def test_a_provider_is_asked_again_after_a_reconnect_and_the_resume_loses_nothing(
    token_node: ServerNode, publisher_token: str
) -> None:
    channel = private_channel()
    provider = Provider(channel)
    client = PushClient(token_node.ws_url, **FAST)
    watched = Watched(client, channel)
    await client.connect()
    try:
        await client.subscribe(channel, watched.handler, token=provider)
        for i in range(3):
            await publish_rest(token_node, publisher_token, channel, i)
        await wait_until(lambda: watched.seqs == [1, 2, 3], "the first messages")
        # The back-end is slow after the reconnect: what is published meanwhile reaches
        # the client only through the resume from seq 3.
        provider.open.clear()
        drop_connection(client)
        await wait_until(
            lambda: client.state == State.CONNECTED and len(provider.calls) == 2,
            "the reconnect asking for a token",
            timeout=WAIT_SECS,
        )
        for i in range(4):
            await publish_rest(token_node, publisher_token, channel, f"missed {i}")
        provider.open.set()
        await publish_rest(token_node, publisher_token, channel, "after")
        await wait_until(lambda: watched.seqs == list(range(1, 9)), "every message once")
    finally:
        await client.close()
    assert watched.errors == watched.ended == []


@e2e
async def test_refreshed_before_exp_the_subscription_outlives_its_first_token_without_a_gap(
    token_node: ServerNode, publisher_token: str
) -> None:
    channel = private_channel()
    provider = Provider(channel, ttl_secs=4)  # refreshed every 2 s
    client = PushClient(token_node.ws_url, **FAST)
    watched = Watched(client, channel)
    await client.connect()
    try:
        await client.subscribe(channel, watched.handler, token=provider)
        first_exp = token_claims(provider.tokens[0])["exp"]
        published = 0
        # Past the first token's exp, and the revocation check after it.
        while time.time() < first_exp + 1.5:
            published = await publish_rest(token_node, publisher_token, channel, published)
            await asyncio.sleep(0.1)
        await wait_until(lambda: watched.seqs[-1:] == [published], "the last message")
    finally:
        await client.close()
    assert watched.seqs == list(range(1, published + 1))
    assert len(provider.calls) >= 3
    assert watched.errors == watched.ended == []


@e2e
async def test_a_subscription_the_server_ended_resumes_with_a_fresh_token_from_its_last_seq(
    token_node: ServerNode, publisher_token: str
) -> None:
    # Tokens dated back: the client plans the refresh for later than they live, so the
    # server ends the subscription at exp; the provider's next token resumes it.
    channel = private_channel()
    provider = Provider(channel, ttl_secs=2, iat_ago_secs=100)
    client = PushClient(token_node.ws_url, **FAST)
    watched = Watched(client, channel)
    await client.connect()
    try:
        await client.subscribe(channel, watched.handler, token=provider)
        published = 0
        while not watched.ended or len(provider.calls) < 2:
            published = await publish_rest(token_node, publisher_token, channel, published)
            await asyncio.sleep(0.05)
            assert published < 200, "the server never ended the subscription"
        for _ in range(5):
            published = await publish_rest(token_node, publisher_token, channel, published)
        await wait_until(lambda: watched.seqs[-1:] == [published], "the last message")
    finally:
        await client.close()
    assert watched.ended[:1] == ["FORBIDDEN"]
    assert watched.seqs == list(range(1, published + 1))
    assert watched.errors == []  # recovered: nothing for the application to hear


@e2e
async def test_without_a_provider_an_expired_token_ends_the_subscription_and_the_app_is_told(
    token_node: ServerNode, publisher_token: str
) -> None:
    channel = private_channel()
    client = PushClient(token_node.ws_url, **FAST)
    watched = Watched(client, channel)
    await client.connect()
    try:
        await client.subscribe(channel, watched.handler, token=mint(channel, ttl_secs=1.5))
        await wait_until(lambda: watched.errors, "the end told", timeout=WAIT_SECS)
        assert client.last_seq(channel) is None
        # A fresh token subscribes it again (not the dropped one, which would say it
        # is subscribed and receive nothing).
        await client.subscribe(channel, watched.handler, token=mint(channel, ttl_secs=60))
        seq = await publish_rest(token_node, publisher_token, channel, "again")
        await wait_until(lambda: watched.seqs == [seq], "the message after subscribing again")
    finally:
        await client.close()
    assert [(e["code"], e["envelope"]["channel"]) for e in watched.errors] == [
        ("FORBIDDEN", channel)
    ]


@e2e
async def test_a_token_the_node_refuses_and_a_failing_provider_fail_the_subscribe(
    token_node: ServerNode, publisher_token: str
) -> None:
    channel = private_channel()
    client = PushClient(token_node.ws_url, **FAST)
    await client.connect()
    provider = Provider(channel)
    provider.failures = 1
    try:
        with pytest.raises(PushError) as refused:
            await client.subscribe(channel, token=mint(channel, ttl_secs=60, secret="wrong"))
        assert refused.value.code == "FORBIDDEN"
        with pytest.raises(TokenProviderFailed, match="the back-end did not answer"):
            await client.subscribe(channel, token=provider)
        # The provider failing after a reconnect: asked again, then the resume.
        watched = Watched(client, channel)
        await client.subscribe(channel, watched.handler, token=provider)
        seq = await publish_rest(token_node, publisher_token, channel, 1)
        await wait_until(lambda: watched.seqs == [seq], "the first message")
        provider.failures = 2
        drop_connection(client)
        await wait_until(lambda: len(watched.errors) == 2, "two failures told", timeout=WAIT_SECS)
        seq = await publish_rest(token_node, publisher_token, channel, 2)
        await wait_until(lambda: watched.seqs == [seq - 1, seq], "the message after the resume")
    finally:
        await client.close()
    assert [e["code"] for e in watched.errors] == ["TOKEN_PROVIDER_FAILED"] * 2


# ----- gap repair on a channel held by token ----------------------------------------------


def lose_frame(client: PushClient, seq: int) -> list[int]:
    """The network loses the message frame of ``seq`` once (as a drop-oldest send queue
    does): the client sees a gap and repairs it from the REST history. Returns the
    seqs lost so far."""
    lost: list[int] = []
    on_message = client._on_message

    async def lossy(message: dict[str, Any]) -> None:
        if message.get("seq") == seq and seq not in lost:
            lost.append(seq)
            return
        await on_message(message)

    client._on_message = lossy  # type: ignore[method-assign]  # loses a frame, then passes on
    return lost


@e2e
@pytest.mark.parametrize("given", ["string", "provider"])
async def test_a_gap_on_a_channel_held_only_by_token_is_read_back_with_the_token(
    token_node: ServerNode, publisher_token: str, given: str
) -> None:
    channel = private_channel()
    provider = Provider(channel)
    token = mint(channel, ttl_secs=600) if given == "string" else provider
    # No credential of its own: the token is all that lets the client read the channel.
    client = PushClient(token_node.ws_url, **FAST)
    watched = Watched(client, channel)
    gaps: list[dict[str, Any]] = []
    unrecovered: list[dict[str, Any]] = []
    client.on("gap", gaps.append)
    client.on("unrecovered", unrecovered.append)
    lost = lose_frame(client, 2)
    await client.connect()
    try:
        await client.subscribe(channel, watched.handler, token=token)
        for i in range(3):
            await publish_rest(token_node, publisher_token, channel, i)
        await wait_until(lambda: watched.seqs[-1:] == [3], "the message after the gap")
    finally:
        await client.close()
    assert lost == [2]
    assert [(gap["from"], gap["to"]) for gap in gaps] == [(2, 2)]
    assert watched.seqs == [1, 2, 3], "the lost message read back from the history"
    assert watched.errors == unrecovered == []
    if given == "provider":
        # One token for the subscribe, a fresh one for the history read.
        assert len(provider.tokens) == 2


async def test_the_history_read_carries_the_token_and_a_failing_provider_fails_it() -> None:
    """Against a scripted history: the token in ``X-Subscription-Token`` (never in the
    URL), a provider asked for each read, and one that fails is the read's failure."""
    history = FakeHistory(range(1, 10))
    calls: list[str] = []

    def provider(channel: str) -> str:
        calls.append(channel)
        if len(calls) > 1:
            raise ConnectionError("the back-end did not answer")
        return "fresh-token"

    seen = await feed(history, [4, 6], token=provider, base_delay_secs=0.01)
    assert seen["seqs"] == [4, 5, 6]
    (url, headers), *_ = history.requests
    assert headers["X-Subscription-Token"] == "fresh-token"
    assert "fresh-token" not in url
    seen = await feed(history, [4, 6], token=provider, base_delay_secs=0.01)
    assert seen["seqs"] == [4, 6]
    assert [error["code"] for error in seen["error"]] == ["GAP_REPAIR_FAILED"]
    assert "did not answer" in seen["error"][0]["message"]


# ----- tokens minted with pushclient.signing ---------------------------------------------


def test_a_user_id_the_server_would_refuse_is_refused_when_minting() -> None:
    for bad in [True, 1.5, "", "x" * 129, ["ann"]]:
        with pytest.raises(ValueError, match="user_id"):
            subscription_token("presence-x", ttl_secs=60, secret="s", user_id=bad)  # type: ignore[arg-type]  # wrong on purpose
    claims = token_claims(subscription_token("presence-x", ttl_secs=60, secret="s", user_id=7))
    assert claims is not None and claims["user_id"] == 7


@e2e
async def test_tokens_naming_one_user_id_make_one_presence_member_of_its_connections(
    token_node: ServerNode,
) -> None:
    """Tokens minted by ``pushclient.signing`` with a ``user_id``: two connections of one
    user are one member of the presence channel, named by that ``user_id``; the same
    token reads the channel's details over REST."""
    channel = f"presence-tokens-{uuid.uuid4().hex[:8]}"

    def token_for(user_id: str) -> str:
        return subscription_token(
            channel,
            ttl_secs=600,
            secret=SUBSCRIPTION_TOKEN_SECRET,
            info={"name": user_id.title()},
            user_id=user_id,
        )

    tabs = [PushClient(token_node.ws_url, **FAST) for _ in range(3)]
    try:
        for tab, user_id in zip(tabs, ["ann", "ann", "bob"], strict=True):
            await tab.connect()
            await tab.subscribe(channel, token=token_for(user_id))

        async def both_listed() -> dict[str, Any] | None:
            # A node lists a member once it has heard the join, a moment after its
            # subscribe was answered (the first tab hears that join just then).
            answer = await tabs[0]._request({"type": "presence", "channel": channel})
            return answer if len(answer["members"]) == 2 else None

        reply = await wait_until(both_listed, "both users listed")
        details = await asyncio.to_thread(
            httpx.get,
            f"{token_node.http_url}/api/v1/channels/{channel}",
            headers={"X-Subscription-Token": token_for("ann")},
            timeout=10,
        )
    finally:
        for tab in tabs:
            await tab.close()
    members = sorted(reply["members"], key=lambda member: member["user_id"])
    assert members == [
        {"user_id": "ann", "info": {"name": "Ann"}},
        {"user_id": "bob", "info": {"name": "Bob"}},
    ]
    assert details.status_code == 200, details.text
    assert details.json()["presence_members"] == 2


@e2e
async def test_the_cli_subscribes_with_a_subscription_token_per_channel(
    token_node: ServerNode, publisher_token: str
) -> None:
    """``--subscription-token CHANNEL=TOKEN`` opens a private channel to a CLI with no
    credential of its own; another channel of the same run needs none."""
    channel, public = private_channel(), f"news-{uuid.uuid4().hex[:8]}"
    await publish_rest(token_node, publisher_token, channel, "stored")
    subscriber = await run_cli(
        "subscribe",
        channel,
        public,
        "--since",
        "0",
        "--count",
        "3",
        "--url",
        token_node.ws_url,
        "--subscription-token",
        f"{channel}={mint(channel, ttl_secs=600)}",
    )
    assert subscriber.stderr is not None
    for _ in channel, public:
        await asyncio.wait_for(
            _stderr_line_with(subscriber.stderr, b'"subscribed"'), timeout=WAIT_SECS
        )
    await publish_rest(token_node, publisher_token, channel, "live")
    await publish_rest(token_node, publisher_token, public, "public")
    out, err = await asyncio.wait_for(subscriber.communicate(), WAIT_SECS)
    assert subscriber.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted((m["channel"], m["data"]) for m in lines) == sorted(
        [(channel, "stored"), (channel, "live"), (public, "public")]
    )


@contextlib.asynccontextmanager
async def _cli_with_token(
    node: ServerNode, *channels: str, token_arg: list[str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A CLI subscribed to ``channels`` (the first one by token), once it says so;
    killed if still running when the test ends (one that never exits is the failure)."""
    subscriber = await run_cli(
        "subscribe", *channels, "--count", "1", "--url", node.ws_url, *token_arg
    )
    try:
        assert subscriber.stderr is not None
        for _ in channels:
            await asyncio.wait_for(
                _stderr_line_with(subscriber.stderr, b'"subscribed"'), timeout=WAIT_SECS
            )
        yield subscriber
    finally:
        if subscriber.returncode is None:
            subscriber.kill()
            await subscriber.wait()


@e2e
async def test_the_cli_exits_with_3_and_says_why_once_its_only_channel_has_ended(
    token_node: ServerNode,
) -> None:
    """A string token cannot be renewed: at its exp the stream is over for good, and a
    script watching the CLI must learn it rather than wait on a silent process."""
    channel = private_channel()
    token = mint(channel, ttl_secs=4)
    async with _cli_with_token(
        token_node, channel, token_arg=["--subscription-token", f"{channel}={token}"]
    ) as subscriber:
        _, err = await asyncio.wait_for(subscriber.communicate(), WAIT_SECS)
    assert subscriber.returncode == 3, err.decode()
    events = [json.loads(line) for line in err.decode().splitlines()]
    ended = [event for event in events if event["event"] == "ended"]
    assert [(e["channel"], e["code"], e["streaming"]) for e in ended] == [
        (channel, "FORBIDDEN", [])
    ]
    assert events[-1] == {
        "event": "exit",
        "status": 3,
        "message": f"every channel ended: {channel} (FORBIDDEN: the subscription token "
        f"for {channel!r} expired)",
    }
    assert token not in err.decode()


@e2e
async def test_the_cli_says_which_channel_ended_and_streams_the_others(
    token_node: ServerNode, publisher_token: str
) -> None:
    channel, public = private_channel(), f"news-{uuid.uuid4().hex[:8]}"
    token_arg = ["--subscription-token", f"{channel}={mint(channel, ttl_secs=4)}"]
    async with _cli_with_token(token_node, channel, public, token_arg=token_arg) as subscriber:
        assert subscriber.stderr is not None
        line = await asyncio.wait_for(_stderr_line_with(subscriber.stderr, b'"ended"'), WAIT_SECS)
        ended = json.loads(line)
        assert (ended["channel"], ended["code"], ended["streaming"]) == (
            channel,
            "FORBIDDEN",
            [public],
        )
        await publish_rest(token_node, publisher_token, public, "still here")
        out, err = await asyncio.wait_for(subscriber.communicate(), WAIT_SECS)
    assert subscriber.returncode == 0, err.decode()
    assert [(m["channel"], m["data"]) for m in map(json.loads, out.decode().splitlines())] == [
        (public, "still here")
    ]


@e2e
async def test_with_a_token_command_the_cli_outlives_its_first_token(
    token_node: ServerNode, publisher_token: str, tmp_path: Path
) -> None:
    """``--subscription-token-command`` is run for the subscribe and again before each
    exp, so the CLI streams a token-only channel past its first token's exp."""
    channel = private_channel()
    given = tmp_path / "tokens"
    mint_one = (
        "import os, pathlib, pushclient.signing as s; "
        "t = s.subscription_token(os.environ['PUSH_CHANNEL'], ttl_secs=4, "
        f"secret={SUBSCRIPTION_TOKEN_SECRET!r}); "
        f"pathlib.Path({str(given)!r}).open('a').write(t + '\\n'); print(t)"
    )
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(mint_one)}"
    token_arg = ["--subscription-token-command", f"{channel}={command}"]
    async with _cli_with_token(token_node, channel, token_arg=token_arg) as subscriber:
        first = token_claims(given.read_text().split()[0])
        assert first["ch"] == channel
        # Past the first token's exp and the node's check after it, refreshed before it.
        await wait_until(
            lambda: time.time() > first["exp"] + 1.5, "past the first exp", timeout=WAIT_SECS
        )
        assert len(given.read_text().split()) >= 2
        await publish_rest(token_node, publisher_token, channel, "later")
        out, err = await asyncio.wait_for(subscriber.communicate(), WAIT_SECS)
    assert subscriber.returncode == 0, err.decode()
    assert [m["data"] for m in map(json.loads, out.decode().splitlines())] == ["later"]
    assert b'"ended"' not in err


@e2e
async def test_a_token_command_that_fails_fails_the_cli_and_says_so(token_node: ServerNode) -> None:
    channel = private_channel()
    command = "echo 'no such user' >&2; exit 7"
    subscriber = await run_cli(
        "subscribe",
        channel,
        "--url",
        token_node.ws_url,
        "--subscription-token-command",
        f"{channel}={command}",
    )
    try:
        _, err = await asyncio.wait_for(subscriber.communicate(), WAIT_SECS)
    finally:
        if subscriber.returncode is None:
            subscriber.kill()
            await subscriber.wait()
    assert subscriber.returncode == 1, err.decode()
    told = err.decode().splitlines()
    assert "no such user" in told  # the command's own stderr
    errors = [json.loads(line) for line in told if '"error"' in line]
    assert errors == [
        {
            "event": "error",
            "code": "TOKEN_PROVIDER_FAILED",
            "message": f"the token provider of {channel!r} failed: "
            "RuntimeError: the token command exited with status 7",
        }
    ]


async def _stderr_line_with(stream: asyncio.StreamReader, needle: bytes) -> bytes:
    while needle not in (line := await stream.readline()):
        assert line, "the CLI ended"
    return line
