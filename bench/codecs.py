"""Wire formats side by side: frame size and encode/decode CPU per message, for a
small (100 B), a typical (1 KB) and a large (64 KB) published value of two shapes:
string-heavy (a few fields beside one long string) and mixed (many small fields of
every JSON type, nested: what parsing and packing cost most on).

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


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def _string_heavy_value(size: int) -> dict[str, Any]:
    """A few typed fields and one long string: about ``size`` bytes as JSON."""
    value: dict[str, Any] = {"id": 12345, "price": 101.25, "ok": True, "tags": ["a", "b"]}
    filler = size - _json_bytes(value) - len(',"text":""')
    value["text"] = "x" * max(0, filler)
    return value


def _mixed_value(size: int) -> dict[str, Any]:
    """Nested maps of ints, floats, bools, short strings and lists, with records added
    while the whole stays within ``size`` bytes as JSON."""
    items: list[dict[str, Any]] = []
    value: dict[str, Any] = {"id": 12345, "ok": True, "items": items}
    while True:
        n = len(items)
        item = {
            "n": n,
            "p": 10.5 + n / 4,
            "ok": n % 2 == 0,
            "s": f"k{n}",
            "d": {"w": n, "h": 2.5},
            "t": ["x", n],
        }
        items.append(item)
        if _json_bytes(value) > size:
            items.pop()
            return value


VALUE_SHAPES = {"string-heavy": _string_heavy_value, "mixed": _mixed_value}


def _per_call_us(func: Any, iterations: int) -> float:
    started = time.process_time()
    for _ in range(iterations):
        func()
    return (time.process_time() - started) / iterations * 1e6


def measure() -> list[dict[str, Any]]:
    from push.fanout.message import dump_data
    from push.wire.codecs import CODECS

    rows = []
    for shape, value_of_size in VALUE_SHAPES.items():
        for size, iterations in ITERATIONS_PER_SIZE.items():
            data_json = dump_data(value_of_size(size))
            for codec in CODECS.values():
                rows.append({"shape": shape, **_measure_one(codec, data_json, iterations)})
    return rows


def _measure_one(codec: Any, data_json: str, iterations: int) -> dict[str, Any]:
    from push.fanout.message import ChannelMessage

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
    print(
        f"{'shape':<13} {'format':<12} {'value B':>8} {'frame B':>8}"
        f" {'encode us':>10} {'decode us':>10}"
    )
    for row in rows:
        print(
            f"{row['shape']:<13} {row['format']:<12} {row['value_bytes']:>8}"
            f" {row['frame_bytes']:>8} {row['encode_us']:>10} {row['decode_us']:>10}"
        )
    json.dump({"bench": "codecs", "rows": rows}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
