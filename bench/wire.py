"""Wire formats of the load generator: one codec per subprotocol, same maps in all.

The load generator never branches on the format anywhere else: a scenario names a
format ("json", "msgpack", "protobuf") and the client takes its subprotocol, its frame
opcode and its encode/decode functions from here (protobuf: the server's own codec, so
only our server speaks it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

try:  # ujson parses the small envelopes about twice as fast as the stdlib.
    import ujson as _fast_json
except ImportError:  # pragma: no cover - ujson is a nicety, not a need
    _fast_json = json  # type: ignore[misc]  # stdlib json stands in for ujson

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2


@dataclass(frozen=True)
class WireFormat:
    """One wire format: what to offer at the handshake and how to (de)code frames."""

    name: str
    subprotocol: str | None
    opcode: int
    encode: Callable[[dict[str, Any]], bytes]
    decode: Callable[[bytes], Any]


def _json_encode(message: dict[str, Any]) -> bytes:
    return _fast_json.dumps(message).encode()


def _msgpack_encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _msgpack_decode(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False)


def _protobuf_format() -> WireFormat:
    # The server's own codec: the schema and its generated code live in push/proto.
    from push.wire.codecs.protobuf_codec import ProtobufCodec

    codec = ProtobufCodec()
    return WireFormat("protobuf", "v1.protobuf", OPCODE_BINARY, codec.encode, codec.decode)


FORMATS: dict[str, WireFormat] = {
    # No subprotocol offered for JSON: the contract makes JSON the default, and the
    # reference servers need not know subprotocols to be driven.
    "json": WireFormat("json", None, OPCODE_TEXT, _json_encode, _fast_json.loads),
    "msgpack": WireFormat("msgpack", "v1.msgpack", OPCODE_BINARY, _msgpack_encode, _msgpack_decode),
    "protobuf": _protobuf_format(),
}


def get_format(name: str) -> WireFormat:
    """Return the codec called ``name``, or fail with the known names."""
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise ValueError(f"unknown wire format {name!r}; known: {known}") from None
