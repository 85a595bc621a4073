"""The client's side of the wire formats: JSON text frames or MessagePack binary ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Format:
    name: str
    subprotocol: str

    def encode(self, envelope: dict[str, Any]) -> str | bytes:
        if self.name == "msgpack":
            import msgpack

            return msgpack.packb(envelope, use_bin_type=True)
        # ensure_ascii off: the server reads UTF-8, and escapes only make frames larger.
        return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))

    def decode(self, frame: str | bytes) -> Any:
        if self.name == "msgpack":
            import msgpack

            return msgpack.unpackb(frame, raw=False)
        return json.loads(frame)


FORMATS = {
    "json": Format("json", "v1.json"),
    "msgpack": Format("msgpack", "v1.msgpack"),
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose one of {sorted(FORMATS)}") from None
