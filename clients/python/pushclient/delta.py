"""Applying the server's fossil deltas (``subscribe`` with ``delta: "fossil"``,
docs/protocol.md): ``data_delta`` turns the JSON text of the previous message's data
into this message's, and the result is checked before it is trusted.

python-fossil-delta (Fossil's own C code) applies the delta and checks the output
length the delta announces, but not the checksum that ends every fossil delta: that
check is here, so a delta applied to the wrong base is refused instead of read as data.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import fossil_delta

# The one algorithm this client asks for.
FOSSIL = "fossil"
# The largest data text a delta may make, by default (the client passes its frame limit).
DEFAULT_MAX_DELTA_BYTES = 16 * 1024 * 1024

# Fossil's integers are written in this base-64 alphabet, most significant digit first.
_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_VALUE = {digit: value for value, digit in enumerate(_DIGITS)}


class DeltaMismatch(ValueError):
    """Raised when a delta cannot be applied to the base the client holds: malformed,
    of another length, or the result's checksum differs (the base was not the one the
    server meant)."""


def data_text(data: Any) -> str:
    """The JSON text the server holds for ``data`` (``push.fanout.message.dump_data``):
    the base of the next delta."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def apply_delta(base: str, data_delta: str, *, max_bytes: int = DEFAULT_MAX_DELTA_BYTES) -> str:
    """The JSON text ``data_delta`` (base64) makes of ``base``; ``DeltaMismatch`` when
    it does not apply, its checksum does not match, or it declares more than
    ``max_bytes``: a broken or hostile server could otherwise have the client build (and
    allocate up front) gigabytes from a small base."""
    try:
        delta = base64.b64decode(data_delta, validate=True)
        source = base.encode("utf-8")
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise DeltaMismatch(f"undecodable delta or base: {exc}") from exc
    size, _ = _read_int(delta, 0)
    if size > max_bytes:
        raise DeltaMismatch(f"the delta makes {size} bytes, over the {max_bytes} allowed")
    expected = _declared_checksum(delta)
    try:
        output = fossil_delta.apply_delta(source, delta)
    except Exception as exc:  # the wrapper raises a bare Exception for a bad delta
        raise DeltaMismatch(f"the delta does not apply to this base: {exc}") from exc
    if checksum(output) != expected:
        raise DeltaMismatch("the result's checksum differs: the base was not the server's")
    try:
        return output.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeltaMismatch("the result is not UTF-8") from exc


def checksum(data: bytes) -> int:
    """Fossil's checksum: the sum of the data's big-endian 32-bit words (the last one
    padded with zero bytes), modulo 2**32."""
    padded = data + b"\0" * (-len(data) % 4)
    return sum(struct.unpack(f">{len(padded) // 4}I", padded)) & 0xFFFFFFFF


def _declared_checksum(delta: bytes) -> int:
    """The checksum a fossil delta ends with (``<checksum>;``), read by walking its
    commands: a copy is ``<count>@<offset>,``, an insert ``<count>:`` and that many bytes."""
    _, pos = _read_int(delta, 0)
    if delta[pos : pos + 1] != b"\n":
        raise DeltaMismatch("no length header")
    pos += 1
    while pos < len(delta):
        count, pos = _read_int(delta, pos)
        command = delta[pos : pos + 1]
        pos += 1
        if command == b"@":
            _, pos = _read_int(delta, pos)
            if delta[pos : pos + 1] != b",":
                raise DeltaMismatch("copy command not terminated")
            pos += 1
        elif command == b":":
            pos += count
        elif command == b";":
            return count
        else:
            raise DeltaMismatch(f"unknown command {command!r}")
    raise DeltaMismatch("no checksum")


def _read_int(delta: bytes, pos: int) -> tuple[int, int]:
    value = 0
    start = pos
    while pos < len(delta) and (digit := _VALUE.get(delta[pos])) is not None:
        value = (value << 6) + digit
        pos += 1
    if pos == start:
        raise DeltaMismatch("a number was expected")
    return value, pos
