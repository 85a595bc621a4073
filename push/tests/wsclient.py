"""A test client over Channels' ``WebsocketCommunicator`` that speaks any wire format,
so every protocol test runs for JSON, MessagePack and Protobuf alike.

Its job differs from ``tests/wsclient.py`` (a real client against a server process):
this one drives the ASGI application inside the test's own process and event loop, so
a test can use the test database and swap settings, with no server to start."""

from __future__ import annotations

import asyncio
from typing import Any

from channels.testing import WebsocketCommunicator

from push.wire.codecs import CODECS, DEFAULT_CODEC, Codec

RECEIVE_TIMEOUT_SECS = 5.0
# Every negotiable subprotocol: the ``wire_format`` fixture (conftest.py at the root)
# runs a protocol test once for each.
WIRE_FORMATS: list[str] = sorted(CODECS)


class WsClient:
    def __init__(self, communicator: WebsocketCommunicator, codec: Codec) -> None:
        self.communicator = communicator
        self.codec = codec
        self.close_code: int | None = None

    async def send(self, envelope: dict[str, Any]) -> None:
        await self.send_payload(self.codec.encode(envelope))

    async def send_payload(self, payload: str | bytes) -> None:
        # send_input, not send_to: send_to refuses empty frames, which real clients send.
        if isinstance(payload, bytes):
            await self.communicator.send_input({"type": "websocket.receive", "bytes": payload})
        else:
            await self.communicator.send_input({"type": "websocket.receive", "text": payload})

    async def recv(self, timeout: float = RECEIVE_TIMEOUT_SECS) -> dict[str, Any]:
        output = await self.communicator.receive_output(timeout)
        if output["type"] == "websocket.close":
            self.close_code = output.get("code")
            raise ConnectionClosed(self.close_code)
        assert output["type"] == "websocket.send", output
        if self.codec.binary:
            assert output.get("bytes") is not None, "binary format must send binary frames"
            return self.codec.decode(output["bytes"])
        assert output.get("text") is not None, "JSON must be sent as text frames"
        return self.codec.decode(output["text"])

    async def recv_type(self, kind: str, timeout: float = RECEIVE_TIMEOUT_SECS) -> dict[str, Any]:
        """The next envelope of type ``kind``; fails on anything else in between."""
        envelope = await self.recv(timeout)
        assert envelope["type"] == kind, envelope
        return envelope

    async def request(self, envelope: dict[str, Any]) -> dict[str, Any]:
        await self.send(envelope)
        return await self.recv()

    async def expect_nothing(self, wait_secs: float = 0.2) -> None:
        assert await self.communicator.receive_nothing(wait_secs), "unexpected frame"

    async def expect_close(self, timeout: float = RECEIVE_TIMEOUT_SECS) -> int | None:
        while True:
            output = await self.communicator.receive_output(timeout)
            if output["type"] == "websocket.close":
                self.close_code = output.get("code")
                return self.close_code

    async def close(self) -> None:
        await self.communicator.disconnect()
        await asyncio.sleep(0)


class ConnectionClosed(Exception):
    """Raised when the server closed the connection while a frame was expected."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


async def open_client(
    *,
    subprotocol: str | None = None,
    offer: list[str] | None = None,
    token: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    path: str = "/ws/",
    client_address: tuple[str, int] | None = None,
) -> tuple[bool, WsClient, Any]:
    """Connect to the real ASGI application, offering ``subprotocol`` (or the list
    ``offer``); returns (accepted, client, the subprotocol echoed or the close code).
    The client speaks the echoed subprotocol, as a browser's would. ``client_address``
    is the peer the server sees (the scope's ``client``)."""
    communicator = communicator_for(
        subprotocol=subprotocol, offer=offer, token=token, headers=headers, path=path
    )
    if client_address is not None:
        communicator.scope["client"] = client_address
    connected, detail = await communicator.connect(timeout=RECEIVE_TIMEOUT_SECS)
    codec = CODECS.get(detail, DEFAULT_CODEC) if connected and detail else DEFAULT_CODEC
    return connected, WsClient(communicator, codec), detail


def communicator_for(
    *,
    subprotocol: str | None = None,
    offer: list[str] | None = None,
    token: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    path: str = "/ws/",
) -> WebsocketCommunicator:
    """A communicator to the real ASGI application, not yet connected."""
    from realtime_project.asgi import application

    if token is not None:
        path = f"{path}?token={token}"
    if offer is None and subprotocol:
        offer = [subprotocol]
    return WebsocketCommunicator(
        application, path, headers=headers or [], subprotocols=offer or None
    )


async def connected_client(**kwargs: Any) -> WsClient:
    """A client past the handshake and the ``connection_established`` frame."""
    accepted, client, _ = await open_client(**kwargs)
    assert accepted, "handshake refused"
    await client.recv_type("connection_established")
    return client
