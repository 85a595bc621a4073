"""The interface every wire format implements, and what the codecs share.

``WireMessage`` is what a codec needs of a channel message: the wire layer sits below
fan-out, so it names the fields it encodes instead of importing ``ChannelMessage``.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Protocol

from common.errors import ErrorCode, PushError
from push.wire.protocol import RequestId, published

Payload = str | bytes


class WireMessage(Protocol):
    """A channel message as a codec encodes it (``push.fanout.message.ChannelMessage``)."""

    channel: str
    seq: int
    message_id: str
    # The published value as canonical JSON text, and parsed (on first use).
    data_json: str
    timestamp: float

    @property
    def data(self) -> Any: ...

    def envelope(self) -> dict[str, Any]: ...


class Codec(abc.ABC):
    name: ClassVar[str]
    subprotocol: ClassVar[str]
    binary: ClassVar[bool]

    @abc.abstractmethod
    def decode(self, payload: Payload) -> Any:
        """Turn one frame into a plain value; raise ``PushError(INVALID_JSON)``."""

    def decode_request(self, payload: Payload) -> Any:
        """``decode`` for a frame a client sent, which the server reads as a request: a
        format may leave out what only server envelopes carry (``decode`` reads every
        envelope, for clients and tests)."""
        return self.decode(payload)

    @abc.abstractmethod
    def encode(self, envelope: dict[str, Any]) -> Payload:
        """Encode a server envelope (a plain map of the contract)."""

    def encode_message(self, message: WireMessage) -> Payload:
        return self.encode(message.envelope())

    def encode_published(self, message: WireMessage, request_id: RequestId | None) -> Payload:
        """The ``published`` acknowledgement of ``message`` to request ``request_id``."""
        return self.encode(
            published(
                channel=message.channel,
                seq=message.seq,
                message_id=message.message_id,
                request_id=request_id,
            )
        )

    def send_event(self, payload: Payload) -> dict[str, Any]:
        """The ASGI ``websocket.send`` event carrying one encoded frame."""
        if self.binary:
            return {"type": "websocket.send", "bytes": payload}
        return {"type": "websocket.send", "text": payload}

    def frame_payload(self, event: dict[str, Any]) -> Payload:
        """The payload of an inbound ``websocket.receive`` event, if of this format's
        frame type; a text frame on a binary connection (or the reverse) is an error."""
        payload = event.get("bytes") if self.binary else event.get("text")
        if payload is None:
            expected = "binary" if self.binary else "text"
            raise PushError(
                ErrorCode.INVALID_JSON, f"this connection's format takes {expected} frames"
            )
        return payload


class UnencodableEnvelope(ValueError):
    """Raised when a map given to ``encode`` has a field or value the format cannot hold
    (in protobuf: an unknown ``type``, a field of the wrong type, an id that is neither a
    string nor a 64-bit integer, ``data`` that is not a JSON value)."""


def undecodable(detail: str) -> PushError:
    return PushError(ErrorCode.INVALID_JSON, f"frame does not decode: {detail}")


class UnknownSubprotocol(Exception):
    """Raised when a client offers subprotocols and none of them is a known format."""
