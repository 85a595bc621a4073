"""JSON text read and written on the publish path: the standard library's answers,
most of them computed by orjson.

Measured for a 130-byte publish frame, the standard library took 2.7 µs to read it,
2.0 µs to write its acknowledgement and 1.7 µs to write its data's canonical text:
6.4 µs of the 65-70 µs a node spends on a publish. orjson (a C extension, maintained
and used widely) does the three in 1.1 + 0.8 + 0.6 µs, with the checks below. Where its
answer could differ from the standard library's, the standard library answers instead,
so the text and the values stay exactly what they were:

- reading: orjson refuses what the standard library reads (a lone surrogate escape,
  ``1e400``) and then the standard library reads it, or refuses it with its own words;
  orjson reads an integer beyond 64 bits as a float, so text with a run of 19 digits
  or more is read by the standard library alone;
- writing: orjson refuses what it cannot write (an integer beyond 64 bits, a lone
  surrogate, a key that is not a string), and it writes a float below 1e-4 in another
  form than Python's shortest repr (``1e-7`` for ``1e-07``, ``0.00001`` for
  ``1e-05``), which the canonical text documents and delta clients rebuild: text
  with such a number is written by the standard library (``_small_float_in``).
  orjson writes NaN as ``null`` where the standard library raises; these functions
  are for values ``protocol.validate_data`` checked (no NaN, no Infinity) and
  envelopes the server makes of them.

Checked in push/tests/test_json_text.py against the standard library, value by value.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import orjson


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# The standard library's reader and writer of the wire's JSON dialect.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# Digits to "0", every other byte to a space: a run of 19 zeros after this mapping is a
# number orjson may read as a float where Python reads an integer (past 64 bits).
# (bytes.translate and ``find`` cost a third of a regular expression's search.)
_DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_NINETEEN_DIGITS = b"0" * 19


def loads(text: str) -> Any:
    """``json.loads(text)`` with NaN and Infinity refused: a ``ValueError`` (or a
    ``RecursionError`` for deep nesting) for text that is not such JSON."""
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate, which orjson refuses anyway
        return _DECODER.decode(text)
    # (find, not ``in``: ``bytes in bytes`` first tries the needle as an integer, and
    # the TypeError it raises and clears cost 0.08 us.)
    if raw.translate(_DIGITS_ONLY).find(_NINETEEN_DIGITS) == -1:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library reads it, or says what is wrong in its words
    return _DECODER.decode(text)


def dumps(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"))``: the canonical
    text of a checked value (no NaN or Infinity in it)."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(value)
    if _small_float_in(text):
        return _ENCODER.encode(value)
    return text.decode()


def dumps_bytes(value: Any) -> bytes:
    """``dumps(value).encode()``, for a caller that sends bytes: orjson's UTF-8 as it
    wrote it, not decoded to text and encoded back (0.09 of a REST answer's 0.58 us
    rendering). Like ``encode()``, raises ``UnicodeEncodeError`` for a lone surrogate."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(value).encode()
    if _small_float_in(text):
        return _ENCODER.encode(value).encode()
    return text


# What comes before a value in orjson's compact text, besides its start.
_BEFORE_VALUE = frozenset(b":,[")
_MANTISSA = frozenset(b"0123456789.")
# The longest mantissa orjson writes before ``e-`` (17 digits and a point), with room.
_MANTISSA_AT_MOST = 24
# Places that may hold such a number looked at, 64 and one per 256 bytes of text,
# before the standard library is asked anyway: a batch's answer of 1,000 messages has
# about 250 (in its ids), while a string of "0e-0e-..." has one in every three bytes;
# so the look costs at most about what the standard library's writing would.
_PLACES_AT_LEAST = 64
_BYTES_PER_PLACE = 256


def _small_float_in(text: bytes) -> bool:
    """Whether ``text`` may hold a float orjson writes unlike Python's repr: one below
    1e-4, which it writes with a bare negative exponent (``1e-7`` for ``1e-07``) or in
    full (``0.00001`` for ``1e-05``).

    Only a number counts: ``e-`` after a mantissa, or ``0.0000``, where a value starts.
    A message id is text with ``e-`` in it about one time in four (``...be-...``), and a
    batch's answer holds a hundred of them: looking only for ``e-`` sent every batch's
    answer through the standard library, 20 times slower. Text in a string that looks
    like such a number (``":1e-5"``), or past the places it may look at, is written by
    the standard library too, to the same effect."""
    places, places_at_most = 0, _PLACES_AT_LEAST + len(text) // _BYTES_PER_PLACE
    found = text.find(b"e-")
    while found != -1:
        places += 1
        start, stop = found, max(0, found - _MANTISSA_AT_MOST)
        while start > stop and text[start - 1] in _MANTISSA:
            start -= 1
        if start < found and _starts_value(text, start):
            return True
        found = text.find(b"e-", found + 2)
        if places >= places_at_most and found != -1:
            return True
    found = text.find(b"0.0000")
    while found != -1:
        places += 1
        if _starts_value(text, found) or places >= places_at_most:
            return True
        found = text.find(b"0.0000", found + 6)
    return False


def _starts_value(text: bytes, at: int) -> bool:
    """Whether a number starting at ``at`` (its first digit) starts a value."""
    if at and text[at - 1] == 0x2D:  # a minus sign
        at -= 1
    return at == 0 or text[at - 1] in _BEFORE_VALUE
