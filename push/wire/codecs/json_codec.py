"""JSON wire format (``v1.json``, text frames)."""

from __future__ import annotations

from typing import Any

from push.wire import json_text
from push.wire.codecs.base import Codec, Payload, WireMessage, undecodable
from push.wire.protocol import RequestId


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

    def encode_published(self, message: WireMessage, request_id: RequestId | None) -> str:
        # By hand too, the text ``encode`` makes of ``protocol.published``: only the
        # client's request id is encoded (the map and its encoding cost a WebSocket
        # publish ~1 us).
        head = (
            f'{{"type":"published","channel":"{message.channel}","seq":{message.seq},'
            f'"message_id":"{message.message_id}"'
        )
        if request_id is None:
            return head + "}"
        return f'{head},"id":{json_text.dumps(request_id)}}}'
