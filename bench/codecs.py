"""Wire formats side by side: frame size and encode/decode CPU per message, for a
small (100 B), a typical (1 KB) and a large (64 KB) published value.

    python -m bench.codecs            # table, then one JSON line

Encoding is measured as the fan-out pays it: once per message and format on a node,
from the stored canonical JSON text (``ChannelMessage.data_json``) to the frame bytes.
Runs in-process, no server; the figures are CPU time on this machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

ITERATIONS_PER_SIZE = {100: 20_000, 1024: 10_000, 65_536: 500}


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")
    os.environ.setdefault("DEBUG", "1")
    import django

    django.setup()


def _value_of_size(size: int) -> dict[str, Any]:
    """A realistic JSON value (mixed types) of about ``size`` bytes as JSON."""
    value: dict[str, Any] = {"id": 12345, "price": 101.25, "ok": True, "tags": ["a", "b"]}
    filler = size - len(json.dumps(value, separators=(",", ":"))) - len(',"text":""')
    value["text"] = "x" * max(0, filler)
    return value


def _per_call_us(func: Any, iterations: int) -> float:
    started = time.process_time()
    for _ in range(iterations):
        func()
    return (time.process_time() - started) / iterations * 1e6


def measure() -> list[dict[str, Any]]:
    from push.codecs import CODECS
    from push.message import dump_data

    rows = []
    for size, iterations in ITERATIONS_PER_SIZE.items():
        data_json = dump_data(_value_of_size(size))
        for codec in CODECS.values():
            rows.append(_measure_one(codec, data_json, iterations))
    return rows


def _measure_one(codec: Any, data_json: str, iterations: int) -> dict[str, Any]:
    from push.message import ChannelMessage

    def fresh_message() -> ChannelMessage:
        return ChannelMessage(
            channel="bench",
            seq=42,
            message_id="0f4e8a2c-3f9b-4a8e-9d51-1c2b3a4d5e6f",
            data_json=data_json,
            timestamp=1764150000.123456,
        )

    frame = codec.encode_message(fresh_message())
    return {
        "format": codec.subprotocol,
        "value_bytes": len(data_json.encode()),
        "frame_bytes": len(frame.encode() if isinstance(frame, str) else frame),
        "encode_us": round(
            _per_call_us(lambda: codec.encode_message(fresh_message()), iterations), 2
        ),
        "decode_us": round(_per_call_us(lambda: codec.decode(frame), iterations), 2),
    }


def main() -> None:
    _setup_django()
    rows = measure()
    print(f"{'format':<12} {'value B':>8} {'frame B':>8} {'encode us':>10} {'decode us':>10}")
    for row in rows:
        print(
            f"{row['format']:<12} {row['value_bytes']:>8} {row['frame_bytes']:>8}"
            f" {row['encode_us']:>10} {row['decode_us']:>10}"
        )
    json.dump({"bench": "codecs", "rows": rows}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
