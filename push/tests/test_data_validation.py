"""``protocol.validate_data``: a published value is a JSON value every wire format
carries losslessly, whatever types the caller built it from."""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import PushError
from push.wire.protocol import INT64_MIN, MAX_DATA_DEPTH, UINT64_MAX, validate_data


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


def _acceptable(value: Any, depth: int = 0) -> bool:
    """The rule, written plainly."""
    if depth > MAX_DATA_DEPTH:
        return False
    if value is None or isinstance(value, bool | str):
        return True
    if isinstance(value, int):
        return INT64_MIN <= value <= UINT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_acceptable(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(key, str) and _acceptable(item, depth + 1) for key, item in value.items()
        )
    return False


def _accepted(value: Any) -> bool:
    try:
        validate_data(value)
    except PushError:
        return False
    return True


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and the infinities included
    | st.text(max_size=5)
    | st.sampled_from([Level.HIGH, Name("x"), b"bytes", 1j])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        | st.dictionaries(st.integers(0, 3), inner, min_size=1, max_size=2)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(OrderedDict)
    ),
    max_leaves=10,
)


@settings(max_examples=1500, deadline=None)
@given(values)
def test_accepts_exactly_what_the_rule_accepts(value: Any) -> None:
    assert _accepted(value) == _acceptable(value)


def _nested(depth: int) -> Any:
    value: Any = 1
    for n in range(depth):
        value = [value] if n % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (_nested(MAX_DATA_DEPTH), True),
        (_nested(MAX_DATA_DEPTH + 1), False),
        ({"n": UINT64_MAX, "m": INT64_MIN}, True),
        ({"n": UINT64_MAX + 1}, False),
        ([1.5, -0.0, 1e308], True),
        ([math.inf], False),
        ({"x": {1: "a"}}, False),
        ({"level": Level.HIGH, "name": Name("n"), "t": (1, 2)}, True),
        ({"b": b"raw"}, False),
    ],
)
def test_values_at_the_edges(value: Any, accepted: bool) -> None:
    assert _accepted(value) is accepted
