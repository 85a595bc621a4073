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
            # Non-string keys and extension types decode here and are refused by the
            # protocol's validation with a precise message instead.
            return msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises many unrelated types on bad input
            raise undecodable(f"{type(exc).__name__}: {exc}"[:200]) from exc

    def encode(self, envelope: dict[str, Any]) -> bytes:
        return msgpack.packb(envelope, use_bin_type=True)
