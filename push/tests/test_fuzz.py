"""Property-based fuzzing of every decoder through the real consumer: arbitrary bytes,
text and structures, from an anonymous client and from one that may publish anywhere,
get one reply in the connection's own format (a success or a contract error code), the
connection stays usable, nothing is logged as an error, and the observers of a channel,
one per format, receive exactly the messages whose publish was answered ``published``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from django.contrib.auth.models import User
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token

from accounts.models import ChannelGrant
from common.conf import push_settings
from common.errors import ErrorCode
from push.tests.strategies import (
    OBSERVED_CHANNEL,
    client_frame,
    protobuf_envelopes,
    well_formed_requests,
    wild_envelopes,
    wild_requests,
)
from push.tests.wsclient import WIRE_FORMATS, WsClient, connected_client
from push.wire import protocol
from push.wire.codecs import CODECS

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

FRAME_EXAMPLES = 80
STRUCTURE_EXAMPLES = 120
# Long enough for a frame that wrongly reached an observer to arrive on this one
# node; every example waits it once, so it bounds how many examples the file runs.
OBSERVER_WAIT_SECS = 0.05
REPLY_TYPES = {"error", "subscribed", "unsubscribed", "heartbeat_ack", "published", "presence"}
# What a client's own subscriptions push to it, in any order with its replies.
PUSH_TYPES = {"message", "join", "leave"}
CONTRACT_ERRORS = {
    ErrorCode.INVALID_JSON.value,
    ErrorCode.UNKNOWN_MESSAGE_TYPE.value,
    ErrorCode.INVALID_MESSAGE.value,
    ErrorCode.FORBIDDEN.value,
    ErrorCode.NOT_SUBSCRIBED.value,
    ErrorCode.RATE_LIMITED.value,
}
FUZZ_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture],
}


class FuzzSession:
    """One event loop and one set of connections for every example of a test: per
    format an anonymous client, a publisher (grants on ``*``) and an observer
    subscribed to ``OBSERVED_CHANNEL``."""

    def __init__(self, publisher_token: str) -> None:
        self.runner = asyncio.Runner()
        self.publisher_token = publisher_token
        self.clients: dict[tuple[str, bool], WsClient] = {}
        self.observers: list[WsClient] = []

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(coroutine)

    async def client(self, wire_format: str, as_publisher: bool) -> WsClient:
        if not self.observers:
            for observer_format in WIRE_FORMATS:
                observer = await connected_client(subprotocol=observer_format)
                await observer.request({"type": "subscribe", "channel": OBSERVED_CHANNEL})
                self.observers.append(observer)
        key = (wire_format, as_publisher)
        if key not in self.clients:
            token = self.publisher_token if as_publisher else None
            self.clients[key] = await connected_client(subprotocol=wire_format, token=token)
        return self.clients[key]

    async def disconnect(self) -> None:
        for client in [*self.clients.values(), *self.observers]:
            await client.close()
        self.clients.clear()
        self.observers.clear()

    async def close(self) -> None:
        from push.services.runtime import stop_node

        await self.disconnect()
        await stop_node()


@pytest.fixture
def fuzzer_token(transactional_db: None) -> str:
    """A user who may publish, subscribe and see presence everywhere: its requests get
    past the permission checks to every handler."""
    user = User.objects.create_user("fuzzer", password="x")
    ChannelGrant.objects.create(user=user, pattern="*", can_publish=True, can_presence=True)
    return Token.objects.create(user=user).key


@pytest.fixture
def fuzz_session(settings, fuzzer_token: str):  # type: ignore[no-untyped-def]  # pytest-django's settings
    # Hundreds of frames a second from one connection: above the default rate limit,
    # which has tests of its own.
    settings.PUSH = {"RATE_BURST": 1_000_000, "RATE_PER_SEC": 1_000_000}
    session = FuzzSession(fuzzer_token)
    yield session
    session.run(session.close())
    session.runner.close()


def _frame_bytes(payload: bytes | str) -> int:
    return len(payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload)


def _allowed_error_codes(payload: bytes | str) -> set[str]:
    if _frame_bytes(payload) > push_settings.MAX_FRAME_BYTES:
        return CONTRACT_ERRORS | {ErrorCode.MESSAGE_TOO_LARGE.value}
    return CONTRACT_ERRORS


async def _next_reply(client: WsClient) -> dict[str, Any]:
    """The next reply to a request, past what the client's own subscriptions push."""
    while True:
        envelope = await client.recv()
        if envelope["type"] not in PUSH_TYPES:
            return envelope


async def _answered_and_usable(client: WsClient, payload: bytes | str) -> dict[str, Any]:
    """Send one frame; its one reply, after checking it and that the client still works."""
    await client.send_payload(payload)
    reply = await _next_reply(client)
    assert reply["type"] in REPLY_TYPES, reply
    if reply["type"] == "error":
        assert reply["code"] in _allowed_error_codes(payload), reply
    if reply["type"] == "subscribed":
        await client.send({"type": "unsubscribe", "channel": reply["channel"]})
        assert (await _next_reply(client))["type"] == "unsubscribed"
    await client.send({"type": "heartbeat", "id": "still-there"})
    ack = await _next_reply(client)
    assert ack["type"] == "heartbeat_ack" and ack["id"] == "still-there", ack
    return reply


async def _observers_receive_exactly(
    observers: list[WsClient], published: list[dict[str, Any]]
) -> None:
    """Every observer gets the observed channel's published messages, the same in every
    format, and nothing else."""
    received = [[await o.recv_type("message") for _ in published] for o in observers]
    for messages in received:
        assert [(m["seq"], m["message_id"]) for m in messages] == [
            (p["seq"], p["message_id"]) for p in published
        ]
        assert messages == received[0]
    quiet = await asyncio.gather(
        *(o.communicator.receive_nothing(OBSERVER_WAIT_SECS) for o in observers)
    )
    assert all(quiet), "a frame reached an observer that was not a published message"


def _nothing_logged_as_error(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def _fuzz_one(
    session: FuzzSession,
    caplog: pytest.LogCaptureFixture,
    wire_format: str,
    as_publisher: bool,
    payload: bytes | str,
    request_id: protocol.RequestId | None = None,
) -> None:
    """One frame from one client; ``request_id`` is the id every reply but INVALID_JSON
    must repeat, when the frame is known to carry a valid one."""

    async def scenario() -> None:
        client = await session.client(wire_format, as_publisher)
        reply = await _answered_and_usable(client, payload)
        # Shown by --hypothesis-show-statistics: how far the frames got.
        event(f"{reply['type']} {reply.get('code', '')}".strip())
        if request_id is not None and reply.get("code") != ErrorCode.INVALID_JSON.value:
            assert reply.get("id") == request_id, reply
        published = (
            [reply] if reply["type"] == "published" and reply["channel"] == OBSERVED_CHANNEL else []
        )
        await _observers_receive_exactly(session.observers, published)

    async def scenario_on_fresh_failure() -> None:
        try:
            await scenario()
        except BaseException:
            # Frames of a failed example may still be queued: the next one starts anew.
            await session.disconnect()
            raise

    caplog.clear()  # one capture for every example: keep only this example's records
    session.run(scenario_on_fresh_failure())
    _nothing_logged_as_error(caplog)


@settings(max_examples=FRAME_EXAMPLES, **FUZZ_SETTINGS)
@given(
    wire_format=st.sampled_from(WIRE_FORMATS),
    as_publisher=st.booleans(),
    payload=st.binary(max_size=300) | st.text(max_size=300),
)
def test_arbitrary_frames(
    fuzz_session: FuzzSession,
    caplog: pytest.LogCaptureFixture,
    wire_format: str,
    as_publisher: bool,
    payload: bytes | str,
) -> None:
    """Any bytes or text, as a binary or a text frame, on any format's connection."""
    _fuzz_one(fuzz_session, caplog, wire_format, as_publisher, payload)


def _structures_for(wire_format: str) -> st.SearchStrategy[dict[str, Any]]:
    # A Protobuf client can only send what the schema's types allow, so its structures
    # are drawn from the schema; JSON and MessagePack clients can send any map.
    if wire_format == "v1.protobuf":
        return well_formed_requests | protobuf_envelopes
    return well_formed_requests | wild_requests | wild_envelopes


@settings(max_examples=STRUCTURE_EXAMPLES, **FUZZ_SETTINGS)
@given(
    format_and_structure=st.sampled_from(WIRE_FORMATS).flatmap(
        lambda wire_format: st.tuples(st.just(wire_format), _structures_for(wire_format))
    ),
    as_publisher=st.booleans(),
)
def test_arbitrary_structures(
    fuzz_session: FuzzSession,
    caplog: pytest.LogCaptureFixture,
    format_and_structure: tuple[str, dict[str, Any]],
    as_publisher: bool,
) -> None:
    """Maps of every request type (``presence`` among them) and of none, with valid and
    wild fields, as the format's own client library writes them."""
    wire_format, structure = format_and_structure
    payload = client_frame(CODECS[wire_format], structure)
    if payload is None:
        return  # the format cannot carry it; arbitrary bytes cover such frames
    request_id = protocol.read_request_id(structure)
    _fuzz_one(fuzz_session, caplog, wire_format, as_publisher, payload, request_id)
