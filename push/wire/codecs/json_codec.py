"""JSON wire format (``v1.json``, text frames)."""

from __future__ import annotations

import json
from typing import Any, NoReturn

from push.wire.codecs.base import Codec, Payload, WireMessage, undecodable


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


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
            return _decoder.decode(payload)
        except (ValueError, RecursionError) as exc:
            raise undecodable(str(exc)[:200]) from exc

    def encode(self, envelope: dict[str, Any]) -> str:
        return _encoder.encode(envelope)

    def encode_message(self, message: WireMessage) -> str:
        # Built by hand: data_json is already canonical JSON, so the published value is
        # never parsed again; channel names and message ids are plain ASCII.
        return (
            f'{{"type":"message","channel":"{message.channel}","seq":{message.seq},'
            f'"message_id":"{message.message_id}","data":{message.data_json},'
            f'"timestamp":{message.timestamp!r}}}'
        )
