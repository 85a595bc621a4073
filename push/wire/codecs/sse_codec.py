"""Server-Sent Events framing of the JSON envelopes (the ``/sse/`` fallback stream).

An SSE stream is receive-only and not negotiated by subprotocol, so this codec is not
in ``CODECS``; it sits behind the same interface so the hub fans out to SSE streams
exactly as to WebSockets: each message is encoded once, for every SSE stream.

A message event is encoded without its ``id:`` line and closing blank line: the id is
the stream's own cursor (the last seq of every channel it carries), which each stream
appends to the shared bytes (``push.transport.sse``).
"""

from __future__ import annotations

from typing import Any

from common.errors import ErrorCode, PushError
from push.wire.codecs import DEFAULT_CODEC
from push.wire.codecs.base import Codec, Payload, WireMessage


class SseCodec(Codec):
    name = "sse"
    subprotocol = ""
    binary = True  # frames are bytes of the HTTP body

    def decode(self, payload: Payload) -> Any:
        raise PushError(ErrorCode.INVALID_MESSAGE, "an SSE stream is receive-only")

    def encode(self, envelope: dict[str, Any]) -> bytes:
        return _event(envelope["type"], DEFAULT_CODEC.encode(envelope)) + b"\n"

    def encode_message(self, message: WireMessage) -> bytes:
        # JSON escapes CR and LF inside strings, so the envelope is one ``data:`` line.
        return _event("message", DEFAULT_CODEC.encode_message(message))

    def send_event(self, payload: Payload) -> dict[str, Any]:
        return {"type": "http.response.body", "body": payload, "more_body": True}


def _event(kind: str, data_json: str) -> bytes:
    return f"event: {kind}\ndata: {data_json}\n".encode()


SSE_CODEC = SseCodec()
