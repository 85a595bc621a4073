"""The wire contract's envelopes, independent of the wire format.

A codec turns a frame into a plain map; ``parse_request`` turns that map into one of
the frozen request types below, or raises ``PushError`` with the contract's code.
Server envelopes are built here too, as plain maps that every codec encodes.
No Django import: this module is tested without an event loop or a database.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import ErrorCode, PushError

RequestId = str | int

MAX_REQUEST_ID_CHARS = 64
MAX_CHANNEL_NAME_CHARS = 100
# Deep enough for any real payload, shallow enough that walking it never recurses
# anywhere near Python's stack limit.
MAX_DATA_DEPTH = 64
INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1
# ``rewind`` asks for at most this many of a channel's last messages.
MAX_REWIND = 100

_CHANNEL_NAME = re.compile(r"[A-Za-z0-9_\-.:@]{1,100}", re.ASCII)

# How an unknown ``type`` is named in its error: a bounded repr, made without walking
# the whole value. Repeated in full, a MessagePack frame's ``type`` of 8 KiB of NULs
# (one byte each, four characters as ``\x00``) was answered with 32 KiB, a list of
# zeros three times its size.
_SHOWN_TYPE = reprlib.Repr()
_SHOWN_TYPE.maxstring = 64
_SHOWN_TYPE.maxother = 64


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: str
    since: int | None = None
    token: str | None = None
    id: RequestId | None = None
    # The channel's last N stored messages first (instead of ``since``), then live.
    rewind: int | None = None
    # Also receive ``occupancy`` events (subscribers across all nodes).
    occupancy: bool = False
    # The delta algorithm asked for ("fossil"); the server agrees in ``subscribed``.
    delta: str | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: str
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    channel: str
    data: Any
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Presence:
    channel: str
    id: RequestId | None = None


Request = Subscribe | Unsubscribe | Publish | Heartbeat | Presence


def validate_channel_name(name: object, *, field: str = "channel") -> str:
    if not isinstance(name, str):
        raise PushError(ErrorCode.INVALID_MESSAGE, f"'{field}' must be a string", field=field)
    if _CHANNEL_NAME.fullmatch(name) is None:
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"'{field}' must be 1 to {MAX_CHANNEL_NAME_CHARS} characters of A-Z a-z 0-9 _ - . : @",
            field=field,
        )
    return name


def validate_channel_name_once(name: object, valid: set[str]) -> str:
    """``validate_channel_name`` for the items of a batch, which name a few channels
    many times each: ``valid`` holds the names checked so far, and gains this one."""
    if isinstance(name, str) and name in valid:
        return name
    checked = validate_channel_name(name)
    valid.add(checked)
    return checked


def read_request_id(envelope: Mapping[str, Any]) -> RequestId | None:
    """The request's ``id`` if it is a valid one, else None (so errors can echo it).

    Only an id that every wire format can send back is valid: a JSON string may hold
    a lone surrogate (``"\\ud800"``), which no UTF-8 frame can carry, so echoing it
    would fail the reply (and once failed the whole connection with 1011)."""
    value = envelope.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS and is_utf8_safe(value):
        return value
    return None


def is_utf8_safe(text: str) -> bool:
    """True when ``text`` encodes as UTF-8, i.e. holds no lone surrogate."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_request_id(envelope: Mapping[str, Any]) -> RequestId | None:
    if "id" not in envelope or envelope["id"] is None:
        return None
    request_id = read_request_id(envelope)
    if request_id is None:
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"'id' must be an integer or a string of at most {MAX_REQUEST_ID_CHARS} characters"
            " (valid Unicode)",
            field="id",
        )
    return request_id


def _optional_since(envelope: Mapping[str, Any]) -> int | None:
    since = envelope.get("since")
    if since is None:
        return None
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise PushError(
            ErrorCode.INVALID_MESSAGE, "'since' must be a non-negative integer", field="since"
        )
    return since


def _optional_rewind(envelope: Mapping[str, Any]) -> int | None:
    rewind = envelope.get("rewind")
    if rewind is None:
        return None
    if isinstance(rewind, bool) or not isinstance(rewind, int) or not 1 <= rewind <= MAX_REWIND:
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"'rewind' must be an integer from 1 to {MAX_REWIND}",
            field="rewind",
        )
    if envelope.get("since") is not None:
        raise PushError(
            ErrorCode.INVALID_MESSAGE, "'since' and 'rewind' cannot be combined", field="rewind"
        )
    return rewind


def _optional_flag(envelope: Mapping[str, Any], name: str) -> bool:
    value = envelope.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise PushError(ErrorCode.INVALID_MESSAGE, f"'{name}' must be a boolean", field=name)
    return value


def _optional_delta(envelope: Mapping[str, Any]) -> str | None:
    """The delta algorithm asked for. One the server does not know is not an error: the
    subscription goes ahead with full data, and ``subscribed`` does not echo it."""
    delta = envelope.get("delta")
    if delta is None:
        return None
    if not isinstance(delta, str):
        raise PushError(ErrorCode.INVALID_MESSAGE, "'delta' must be a string", field="delta")
    return delta


def _optional_token(envelope: Mapping[str, Any]) -> str | None:
    token = envelope.get("token")
    if token is None:
        return None
    if not isinstance(token, str):
        raise PushError(ErrorCode.INVALID_MESSAGE, "'token' must be a string", field="token")
    return token


def validate_data(value: Any) -> Any:
    """Check that ``value`` is a JSON value every wire format carries losslessly."""
    _check_value(value, 0)
    return value


# The exact types a JSON parser makes that need no look inside: checked by one set
# look-up (every value of every published message passes here; ``isinstance`` in turn
# cost 11 calls for a small object).
_PLAIN_SCALARS = frozenset({str, bool, type(None)})


def _check_value(value: Any, depth: int) -> None:
    if depth > MAX_DATA_DEPTH:
        raise PushError(
            ErrorCode.INVALID_MESSAGE, f"'data' nests deeper than {MAX_DATA_DEPTH}", field="data"
        )
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return
    if kind is int:
        _check_int(value)
        return
    if kind is float:
        _check_float(value)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                _check_key(key)
            _check_value(item, depth + 1)
        return
    if kind is list:
        for item in value:
            _check_value(item, depth + 1)
        return
    _check_other(value, depth)


def _check_key(key: Any) -> None:
    if not isinstance(key, str):
        raise PushError(
            ErrorCode.INVALID_MESSAGE, "'data' object keys must be strings", field="data"
        )


def _check_int(value: int) -> None:
    if not INT64_MIN <= value <= UINT64_MAX:
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            "'data' holds an integer outside the 64-bit range",
            field="data",
        )


def _check_float(value: float) -> None:
    if not math.isfinite(value):
        raise PushError(ErrorCode.INVALID_MESSAGE, "'data' holds NaN or Infinity", field="data")


def _check_other(value: Any, depth: int) -> None:
    """A number, or a value of another type than a JSON parser makes (a subclass, a
    tuple: what application code may hand to ``push.publish``)."""
    if value is None or value is True or value is False or isinstance(value, str):
        return
    if isinstance(value, int):
        _check_int(value)
        return
    if isinstance(value, float):
        _check_float(value)
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_value(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_key(key)
            _check_value(item, depth + 1)
        return
    raise PushError(
        ErrorCode.INVALID_MESSAGE,
        f"'data' holds a {type(value).__name__}, which JSON cannot carry",
        field="data",
    )


def _parse_subscribe(envelope: Mapping[str, Any], request_id: RequestId | None) -> Subscribe:
    return Subscribe(
        channel=validate_channel_name(envelope.get("channel")),
        since=_optional_since(envelope),
        token=_optional_token(envelope),
        id=request_id,
        rewind=_optional_rewind(envelope),
        occupancy=_optional_flag(envelope, "occupancy"),
        delta=_optional_delta(envelope),
    )


def _parse_unsubscribe(envelope: Mapping[str, Any], request_id: RequestId | None) -> Unsubscribe:
    return Unsubscribe(channel=validate_channel_name(envelope.get("channel")), id=request_id)


def _parse_publish(envelope: Mapping[str, Any], request_id: RequestId | None) -> Publish:
    channel = validate_channel_name(envelope.get("channel"))
    if "data" not in envelope:
        raise PushError(ErrorCode.INVALID_MESSAGE, "'data' is required", field="data")
    return Publish(channel=channel, data=validate_data(envelope["data"]), id=request_id)


def _parse_heartbeat(envelope: Mapping[str, Any], request_id: RequestId | None) -> Heartbeat:
    return Heartbeat(id=request_id)


def _parse_presence(envelope: Mapping[str, Any], request_id: RequestId | None) -> Presence:
    return Presence(channel=validate_channel_name(envelope.get("channel")), id=request_id)


_PARSERS: dict[str, Callable[[Mapping[str, Any], RequestId | None], Request]] = {
    "presence": _parse_presence,
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "publish": _parse_publish,
    "heartbeat": _parse_heartbeat,
}


def parse_request(envelope: Any) -> Request:
    """Validate a decoded client envelope; raise ``PushError`` naming what is wrong."""
    if not isinstance(envelope, Mapping):
        raise PushError(ErrorCode.INVALID_MESSAGE, "an envelope must be a map")
    request_id = _check_request_id(envelope)
    kind = envelope.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        if kind is None:
            raise PushError(ErrorCode.UNKNOWN_MESSAGE_TYPE, "'type' is missing", field="type")
        raise PushError(
            ErrorCode.UNKNOWN_MESSAGE_TYPE,
            f"unknown message type {_SHOWN_TYPE.repr(kind)}",
            field="type",
        )
    return parser(envelope, request_id)


# ----- server envelopes ---------------------------------------------------------------


def _with_id(envelope: dict[str, Any], request_id: RequestId | None) -> dict[str, Any]:
    if request_id is not None:
        envelope["id"] = request_id
    return envelope


def connection_established(
    *, connection_id: str, server_id: str, heartbeat_interval: int, timestamp: float
) -> dict[str, Any]:
    return {
        "type": "connection_established",
        "connection_id": connection_id,
        "server_id": server_id,
        "heartbeat_interval": heartbeat_interval,
        "timestamp": timestamp,
    }


def subscribed(
    *,
    channel: str,
    seq: int,
    recovered: bool | None,
    request_id: RequestId | None,
    delta: str | None = None,
) -> dict[str, Any]:
    envelope: dict[str, Any] = {"type": "subscribed", "channel": channel, "seq": seq}
    if recovered is not None:
        envelope["recovered"] = recovered
    if delta is not None:
        envelope["delta"] = delta
    return _with_id(envelope, request_id)


def occupancy(*, channel: str, subscribers: int) -> dict[str, Any]:
    return {"type": "occupancy", "channel": channel, "subscribers": subscribers}


def unsubscribed(*, channel: str, request_id: RequestId | None) -> dict[str, Any]:
    return _with_id({"type": "unsubscribed", "channel": channel}, request_id)


def published(
    *, channel: str, seq: int, message_id: str, request_id: RequestId | None
) -> dict[str, Any]:
    envelope = {"type": "published", "channel": channel, "seq": seq, "message_id": message_id}
    return _with_id(envelope, request_id)


def heartbeat_ack(*, timestamp: float, request_id: RequestId | None) -> dict[str, Any]:
    return _with_id({"type": "heartbeat_ack", "timestamp": timestamp}, request_id)


def error(
    *,
    code: ErrorCode,
    message: str,
    request_id: RequestId | None = None,
    channel: str | None = None,
) -> dict[str, Any]:
    """``channel`` names the channel an error is about when no request caused it (a
    subscription the server ended, one channel of an SSE stream); clients may ignore it."""
    envelope: dict[str, Any] = {"type": "error", "code": code.value, "message": message}
    if channel is not None:
        envelope["channel"] = channel
    return _with_id(envelope, request_id)


def body_too_large(limit: int) -> dict[str, Any]:
    """The answer (HTTP 413) to a request body past the largest a node reads."""
    return error(
        code=ErrorCode.MESSAGE_TOO_LARGE,
        message=f"the request body is larger than {limit} bytes",
    )


def presence(
    *, channel: str, members: list[dict[str, Any]], request_id: RequestId | None
) -> dict[str, Any]:
    return _with_id({"type": "presence", "channel": channel, "members": members}, request_id)


def presence_change(*, kind: str, channel: str, member: dict[str, Any]) -> dict[str, Any]:
    """A ``join`` or ``leave`` pushed to the channel's subscribers."""
    return {"type": kind, "channel": channel, "member": member}
