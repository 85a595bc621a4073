"""The codec boundary: every wire format behind one interface.

The consumer and the fan-out path ask a ``Codec`` to decode a frame into a plain map
and to encode an envelope or a channel message; nothing else branches on the format.
Codecs are pure (no Django import) and stateless, so one instance serves a node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from push.wire.codecs.base import (
    Codec,
    Payload,
    UnencodableEnvelope,
    UnknownSubprotocol,
    WireMessage,
    undecodable,
)
from push.wire.codecs.json_codec import JsonCodec
from push.wire.codecs.msgpack_codec import MsgpackCodec

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "Codec",
    "Payload",
    "UnencodableEnvelope",
    "UnknownSubprotocol",
    "WireMessage",
    "negotiate",
    "undecodable",
]


def _registry() -> dict[str, Codec]:
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
