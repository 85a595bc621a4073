"""The codec boundary: every wire format behind one interface.

The consumer and the fan-out path ask a ``Codec`` to decode a frame into a plain map
and to encode an envelope or a channel message; nothing else branches on the format.
Codecs are pure (no Django import) and stateless, so one instance serves a node.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from common.errors import ErrorCode, PushError
from push.fanout.message import ChannelMessage

if TYPE_CHECKING:
    from push.wire.codecs.json_codec import JsonCodec

Payload = str | bytes


class Codec(abc.ABC):
    name: ClassVar[str]
    subprotocol: ClassVar[str]
    binary: ClassVar[bool]

    @abc.abstractmethod
    def decode(self, payload: Payload) -> Any:
        """Turn one frame into a plain value; raise ``PushError(INVALID_JSON)``."""

    @abc.abstractmethod
    def encode(self, envelope: dict[str, Any]) -> Payload:
        """Encode a server envelope (a plain map of the contract)."""

    def encode_message(self, message: ChannelMessage) -> Payload:
        return self.encode(message.envelope())

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


def _registry() -> dict[str, Codec]:
    from push.wire.codecs.json_codec import JsonCodec
    from push.wire.codecs.msgpack_codec import MsgpackCodec

    codecs: list[Codec] = [JsonCodec(), MsgpackCodec()]
    try:
        from push.wire.codecs.protobuf_codec import ProtobufCodec
    except ImportError:  # pragma: no cover - generated module missing
        pass
    else:
        codecs.append(ProtobufCodec())
    return {codec.subprotocol: codec for codec in codecs}


CODECS: dict[str, Codec] = _registry()
# JSON: a text codec, so what it encodes is a str.
DEFAULT_CODEC = cast("JsonCodec", CODECS["v1.json"])


def negotiate(offered: Iterable[str]) -> tuple[Codec, str | None]:
    """Pick the codec for a handshake: the first offered subprotocol we know.

    No offer means JSON with nothing echoed; an offer of only unknown names is refused.
    """
    offered = list(offered)
    if not offered:
        return DEFAULT_CODEC, None
    for name in offered:
        codec = CODECS.get(name.strip())
        if codec is not None:
            return codec, codec.subprotocol
    raise UnknownSubprotocol(", ".join(offered))
