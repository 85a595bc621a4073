"""MessagePack wire format (``v1.msgpack``, binary frames): the same maps as JSON."""

from __future__ import annotations

from typing import Any

import msgpack

from push.wire.codecs.base import Codec, Payload, undecodable


class MsgpackCodec(Codec):
    name = "msgpack"
    subprotocol = "v1.msgpack"
    binary = True

    def decode(self, payload: Payload) -> Any:
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "surrogatepass")
        try:
            _check_complete(payload)
            # Non-string keys and extension types decode here and are refused by the
            # protocol's validation with a precise message instead.
            return msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises many unrelated types on bad input
            raise undecodable(f"{type(exc).__name__}: {exc}"[:200]) from exc

    def encode(self, envelope: dict[str, Any]) -> bytes:
        return msgpack.packb(envelope, use_bin_type=True)


def _check_complete(payload: bytes) -> None:
    """Raise unless ``payload`` starts with one whole MessagePack value, before any
    object is made of it.

    msgpack's decoder allocates each array at the length its header declares (up to the
    frame's length) before reading its items, and only then finds them missing: a frame
    of nested array headers that each declare 8,000 items, and no items, made 1,024
    lists of 8,000 slots (64 MB, ~150 ms) out of 8 KiB. Skipping the value makes no
    object (C code, a microsecond for a small frame) and fails at the first item
    missing; a whole value has at least one byte per item, so decoding it then holds
    at most a few times the frame's size."""
    unpacker = msgpack.Unpacker(max_buffer_size=len(payload))
    unpacker.feed(payload)
    unpacker.skip()
