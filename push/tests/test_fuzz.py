"""Property-based fuzzing of every decoder through the real consumer: arbitrary bytes,
text and structures get an error envelope in the connection's own format, the
connection stays usable, and nothing reaches another client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from push.codecs import UnencodableEnvelope
from push.tests.conftest import WIRE_FORMATS
from push.tests.wsclient import WsClient, connected_client

pytestmark = pytest.mark.django_db(transaction=True)

FUZZ_EXAMPLES = 150
REPLY_TYPES = {"error", "subscribed", "unsubscribed", "heartbeat_ack", "published"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
envelopes = st.dictionaries(
    st.sampled_from(["type", "channel", "since", "data", "id", "token"]) | st.text(max_size=8),
    st.sampled_from(["subscribe", "unsubscribe", "publish", "heartbeat", "presence"]) | json_values,
    max_size=6,
)


class FuzzSession:
    """One event loop and one set of connections for every example of a test."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.clients: dict[str, WsClient] = {}
        self.observer: WsClient | None = None

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(coroutine)

    async def client(self, wire_format: str) -> WsClient:
        if self.observer is None:
            self.observer = await connected_client()
            await self.observer.request({"type": "subscribe", "channel": "fuzz"})
        if wire_format not in self.clients:
            self.clients[wire_format] = await connected_client(subprotocol=wire_format)
        return self.clients[wire_format]

    async def close(self) -> None:
        from push.node import stop_node

        for client in [*self.clients.values(), self.observer]:
            if client is not None:
                await client.close()
        await stop_node()


@pytest.fixture
def fuzz_session(settings):  # type: ignore[no-untyped-def]
    # Hundreds of frames a second from one connection: above the default rate limit,
    # which has tests of its own.
    settings.PUSH = {"RATE_BURST": 1_000_000, "RATE_PER_SEC": 1_000_000}
    session = FuzzSession()
    yield session
    session.run(session.close())
    session.runner.close()


async def _answered_and_usable(client: WsClient, observer: WsClient | None) -> None:
    reply = await client.recv()
    assert reply["type"] in REPLY_TYPES, reply
    if reply["type"] == "subscribed":
        await client.request({"type": "unsubscribe", "channel": reply["channel"]})
    ack = await client.request({"type": "heartbeat", "id": "still-there"})
    assert ack["type"] == "heartbeat_ack" and ack["id"] == "still-there"
    assert observer is not None
    await observer.expect_nothing(0.0)


@settings(
    max_examples=FUZZ_EXAMPLES * 2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    wire_format=st.sampled_from(WIRE_FORMATS),
    payload=st.binary(max_size=300) | st.text(max_size=300),
)
def test_arbitrary_frames(
    fuzz_session: FuzzSession, wire_format: str, payload: bytes | str
) -> None:
    """Any bytes or text, as a binary or a text frame, on any format's connection."""

    async def scenario() -> None:
        client = await fuzz_session.client(wire_format)
        await client.send_payload(payload)
        await _answered_and_usable(client, fuzz_session.observer)

    fuzz_session.run(scenario())


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(wire_format=st.sampled_from(WIRE_FORMATS), envelope=envelopes)
def test_arbitrary_structures(
    fuzz_session: FuzzSession, wire_format: str, envelope: dict[str, Any]
) -> None:
    async def scenario() -> None:
        client = await fuzz_session.client(wire_format)
        try:
            payload = client.codec.encode(envelope)
        except (UnencodableEnvelope, ValueError, OverflowError, TypeError):
            return  # the format cannot carry it; arbitrary bytes cover such frames
        await client.send_payload(payload)
        await _answered_and_usable(client, fuzz_session.observer)

    fuzz_session.run(scenario())
