"""The subscribe request's context options as the contract words them: rewind (1 to 100,
never with since), occupancy (a boolean), delta (a string; an unknown one is not an
error, the server just does not agree to it)."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import ErrorCode, PushError
from push.wire.protocol import Subscribe, parse_request


def subscribe(**fields: Any) -> Subscribe:
    request = parse_request({"type": "subscribe", "channel": "news", **fields})
    assert isinstance(request, Subscribe)
    return request


def test_options_default_to_absent() -> None:
    request = subscribe()
    assert (request.rewind, request.occupancy, request.delta) == (None, False, None)


def test_options_are_read() -> None:
    request = subscribe(rewind=20, occupancy=True, delta="fossil")
    assert (request.rewind, request.occupancy, request.delta) == (20, True, "fossil")


@pytest.mark.parametrize("rewind", [0, 101, -1, True, 1.5, "3"])
def test_rewind_out_of_range_is_invalid(rewind: Any) -> None:
    with pytest.raises(PushError) as raised:
        subscribe(rewind=rewind)
    assert raised.value.code is ErrorCode.INVALID_MESSAGE


def test_rewind_with_since_is_invalid() -> None:
    with pytest.raises(PushError) as raised:
        subscribe(rewind=1, since=0)
    assert raised.value.code is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize(("field", "value"), [("occupancy", 1), ("delta", 7)])
def test_wrongly_typed_options_are_invalid(field: str, value: Any) -> None:
    with pytest.raises(PushError) as raised:
        subscribe(**{field: value})
    assert raised.value.code is ErrorCode.INVALID_MESSAGE
