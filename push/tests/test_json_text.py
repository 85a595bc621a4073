"""``push.wire.json_text`` gives the standard library's answers, text for text and
value for value, wherever orjson would give another."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from push.fanout.message import new_message_ids
from push.wire import json_text

STANDARD_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _standard_loads(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b) and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=-1e-3, max_value=1e-3)
    | st.text()  # lone surrogates included
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=2000, deadline=None)
@given(values)
def test_dumps_writes_the_standard_librarys_text(value: Any) -> None:
    try:
        expected = STANDARD_ENCODER.encode(value)
    except (ValueError, TypeError) as exc:
        with pytest.raises(type(exc)):
            json_text.dumps(value)
        return
    assert json_text.dumps(value) == expected


@settings(max_examples=2000, deadline=None)
@given(values)
def test_dumps_bytes_is_the_text_of_dumps_in_utf8(value: Any) -> None:
    try:
        expected = json_text.dumps(value).encode()
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError for a lone surrogate
        with pytest.raises(type(exc)):
            json_text.dumps_bytes(value)
        return
    assert json_text.dumps_bytes(value) == expected


@settings(max_examples=2000, deadline=None)
@given(values)
def test_loads_reads_what_the_standard_library_reads(value: Any) -> None:
    # Text as the standard library writes it: lone surrogates as escapes, long ints.
    text = json.dumps(value, ensure_ascii=bool(hash(str(value)) % 2))
    assert _same(json_text.loads(text), _standard_loads(text))


@pytest.mark.parametrize(
    "text",
    [
        "1e400",  # orjson refuses; Python reads inf (which validation then refuses)
        "-1e400",
        "123456789012345678901234567890",  # orjson would read a float
        "-9223372036854775809",  # one past int64, 19 digits
        "18446744073709551615",  # the largest uint64
        '"\\ud800"',
        '"\\udc00\\ud800"',
        '"\ud800"',  # the surrogate itself in the text (canonical text of such data)
        '{"n": 1234567890123456789, "s": "1234567890123456789"}',  # 19 digits, in range
        '{"a": 1, "a": 2}',
        "-0",
        "-0.0",
        "1E5",
        " [1, 2] ",
        '"\\u0000"',
    ],
)
def test_loads_gives_the_standard_librarys_value(text: str) -> None:
    assert _same(json_text.loads(text), _standard_loads(text))


@pytest.mark.parametrize(
    "text", ["NaN", "[Infinity]", "-Infinity", "[1,]", "\ufeff{}", '"\t"', "", "{", "[" * 5000]
)
def test_loads_refuses_what_the_standard_library_refuses(text: str) -> None:
    with pytest.raises((ValueError, RecursionError)):
        _standard_loads(text)
    with pytest.raises((ValueError, RecursionError)):
        json_text.loads(text)


def test_every_double_is_written_as_pythons_repr() -> None:
    # Bit patterns across the whole range, and decimals around the repr's switches.
    doubles = [
        struct.unpack("<d", struct.pack("<Q", n * 0x9E3779B97F4A7C15 % 2**64))[0]
        for n in range(20_000)
    ]
    doubles += [
        sign * m * 10.0**e for sign in (1, -1) for m in (1, 1.5, 9.999) for e in range(-330, 308)
    ]
    for value in doubles:
        if math.isfinite(value):
            assert json_text.dumps(value) == repr(value), value


@pytest.mark.parametrize("small", [1e-07, -1.5e-300, 5e-05, -1e-05, 2.5e-10])
def test_a_small_float_is_written_as_python_writes_it_wherever_it_is(small: float) -> None:
    for holder in (
        small,
        [small],
        {"a": small},
        [1, "x", {"k": [None, small]}],
        {"e-": "0.0000", "3e-": small},
    ):
        assert json_text.dumps(holder) == STANDARD_ENCODER.encode(holder)
        assert json_text.dumps_bytes(holder) == STANDARD_ENCODER.encode(holder).encode()


def test_answers_with_message_ids_are_not_written_twice() -> None:
    """A publish's answer (ids with ``e-`` in them about one time in four, a timestamp
    whose fraction may begin ``.0000``) holds no small float: orjson's text stands."""
    answers = [
        {"seq": 7, "message_id": message_id, "timestamp": 1764950000.000012}
        for message_id in new_message_ids(2000)
    ]
    assert any(b"e-" in orjson.dumps(answer) for answer in answers)
    assert not any(json_text._small_float_in(orjson.dumps(answer)) for answer in answers)
    assert json_text._small_float_in(b'{"note":"at :1e-5"}')  # looks like one: written twice


def test_text_full_of_look_alikes_is_written_by_the_standard_library() -> None:
    """A client's string of "0e-0e-..." has a place to look at in every three bytes:
    past a bound the standard library writes it, so the look stays bounded."""
    value = {"data": "0e-" * 10_000, "n": [1e-07]}
    assert json_text.dumps(value) == STANDARD_ENCODER.encode(value)
    assert json_text._small_float_in(orjson.dumps({"data": "0e-" * 10_000}))
