"""JSON wire format (``v1.json``, text frames)."""

from __future__ import annotations

from typing import Any

from push.wire import json_text
from push.wire.codecs.base import Codec, Payload, WireMessage, undecodable


class JsonCodec(Codec):
    name = "json"
    subprotocol = "v1.json"
    binary = False

    def decode(self, payload: Payload) -> Any:
        if isinstance(payload, bytes):
            try:
                payload = payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise undecodable("not UTF-8") from exc
        try:
            return json_text.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise undecodable(str(exc)[:200]) from exc

    def encode(self, envelope: dict[str, Any]) -> str:
        return json_text.dumps(envelope)

    def encode_message(self, message: WireMessage) -> str:
        # Built by hand: data_json is already canonical JSON, so the published value is
        # never parsed again; channel names and message ids are plain ASCII.
        return (
            f'{{"type":"message","channel":"{message.channel}","seq":{message.seq},'
            f'"message_id":"{message.message_id}","data":{message.data_json},'
            f'"timestamp":{message.timestamp!r}}}'
        )
