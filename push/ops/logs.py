"""Logging: secrets kept out of every line, and JSON lines when asked for.

Tokens travel in query strings (``?token=`` for clients that cannot set headers), and
servers log paths; a webhook URL can carry a user and password. ``RedactFilter``
removes them from every record before a handler formats it: the message, the string
values of ``extra=`` fields and the exception text. ``JsonFormatter`` writes one JSON
object per line (``LOG_JSON=true``), with any ``extra=`` fields the caller gave.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Sized
from typing import Any, Protocol
from urllib.parse import unquote_plus

from common.errors import CloseCode

# Any ``name=value`` that starts a query parameter (or a word); the name is compared
# after percent-decoding, as the server decodes it: ``?%74oken=`` is a token too.
_QUERY_PARAM = re.compile(r"((?:^|[?&\s\"'])([^=&?\s\"']+)=)[^&\s\"']+")
# ``subscription_token``: an SSE stream's signed subscription tokens (push.transport.sse).
_SECRET_NAMES = frozenset({"token", "key", "api_key", "subscription_token"})
_SECRET_IN_HEADER = re.compile(r"(Authorization:\s*Token\s+)\S+", re.IGNORECASE)
# The user and password of a URL (``https://user:password@host/``: a webhook URL's basic
# auth, which httpx logs with every request).
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^\s/?#@\"']+@", re.IGNORECASE)
# LogRecord's own attributes; anything else on a record came in through ``extra=``.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def redact(text: str) -> str:
    text = _URL_USERINFO.sub(r"\1[redacted]@", text)
    return _SECRET_IN_HEADER.sub(r"\1[redacted]", _QUERY_PARAM.sub(_redact_param, text))


def _redact_param(match: re.Match[str]) -> str:
    name = match.group(2)
    if "%" in name or "+" in name:
        name = unquote_plus(name)
    if name.lower() in _SECRET_NAMES:
        return match.group(1) + "[redacted]"
    return match.group(0)


def _redact_value(value: Any) -> Any:
    """``value`` with every string inside it redacted (lists, tuples and dicts too)."""
    if isinstance(value, str):
        return redact(value)
    # Exact types only: a named tuple or a dict subclass is not rebuilt like this.
    if type(value) in (list, tuple):
        return type(value)(_redact_value(v) for v in value)
    if type(value) is dict:
        return {k: _redact_value(v) for k, v in value.items()}
    return value


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        for name, value in list(record.__dict__.items()):
            if name not in _STANDARD_ATTRS:
                setattr(record, name, _redact_value(value))
        if record.exc_info and not record.exc_text:
            # Formatters print exc_text when it is set, so the traceback's own text (a
            # URL with its query string in an exception message) is cleaned here once.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class SampledClientNoise(logging.Filter):
    """Let each of the server's warnings that any client can cause at will through at
    most once per ``interval_secs``, the next one saying how many were left out.

    uvicorn logs "Invalid HTTP request received." for every connection whose request
    does not parse, before anything of ours can refuse it: measured, one anonymous
    client sending a line of garbage on new connections made 6,600 such lines a second
    (600 KB a second of log, 50 GB a day), each costing the node its formatting too."""

    MESSAGES = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})

    def __init__(self, interval_secs: float = 10.0) -> None:
        super().__init__()
        self.interval_secs = interval_secs
        # Message -> (when it was last let through, how many were left out since).
        self._sampled: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args or record.msg not in self.MESSAGES:
            return True
        now = time.monotonic()
        let_through_at, left_out = self._sampled.get(record.msg, (-self.interval_secs, 0))
        if now - let_through_at < self.interval_secs:
            self._sampled[record.msg] = (let_through_at, left_out + 1)
            return False
        self._sampled[record.msg] = (now, 0)
        if left_out:
            record.msg = (
                f"{record.msg} ({left_out} more since the last such line, not logged: "
                f"at most one every {self.interval_secs:g} s)"
            )
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS})
        if record.exc_text:
            entry["exception"] = redact(record.exc_text)
        elif record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


connection_log = logging.getLogger("push.connections")

_CLOSE_REASONS: dict[int | None, str] = {
    CloseCode.NORMAL: "normal",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.POLICY: "policy",
    CloseCode.TOO_LARGE: "frame too large",
    CloseCode.SERVER_ERROR: "server error",
    CloseCode.SERVICE_RESTART: "service restart",
    CloseCode.TRY_AGAIN_LATER: "try again later",
    CloseCode.HEARTBEAT_TIMEOUT: "heartbeat timeout",
    CloseCode.SLOW_CONSUMER: "slow consumer",
}


class LoggedConnection(Protocol):
    """What a connection's log lines tell of it (``ClientConnection`` is one): logging
    sits below every other part of push, so it names the fields instead of importing."""

    @property
    def connection_id(self) -> uuid.UUID: ...

    @property
    def principal(self) -> Any:  # accounts.principals.Principal: key and user_id
        ...

    @property
    def ip(self) -> str | None: ...

    @property
    def codec(self) -> Any:  # push.wire.codecs.Codec: its name is the wire format
        ...

    @property
    def close_code(self) -> int | None: ...

    @property
    def opened_at(self) -> float: ...

    @property
    def subscriptions(self) -> Sized: ...


def _who(connection: LoggedConnection, server_id: str) -> dict[str, Any]:
    """The fields both lines of a connection carry, so its open and close pair up."""
    return {
        "connection_id": str(connection.connection_id),
        "principal": connection.principal.key,
        "user_id": connection.principal.user_id,
        "ip": connection.ip,
        "node": server_id,
        "wire_format": connection.codec.name,
    }


def log_connection_opened(connection: LoggedConnection, *, server_id: str) -> None:
    """One line per connection, when it is admitted: who, from where, on which node."""
    if not connection_log.isEnabledFor(logging.INFO):
        return
    connection_log.info(
        "connection %s opened: %s from %s on %s (%s)",
        connection.connection_id,
        connection.principal.key,
        connection.ip,
        server_id,
        connection.codec.name,
        extra=_who(connection, server_id),
    )


def log_connection_closed(
    connection: LoggedConnection, peer_code: int | None, *, by_server: bool, server_id: str
) -> None:
    """One line per connection, at its close: who, how long, and why it ended."""
    if not connection_log.isEnabledFor(logging.INFO):
        return
    code = connection.close_code if by_server else peer_code
    reason = _CLOSE_REASONS.get(code, "client closed") if by_server else "client closed"
    duration = time.monotonic() - connection.opened_at
    connection_log.info(
        "connection %s closed after %.1f s: code %s, %s",
        connection.connection_id,
        duration,
        code,
        reason,
        extra={
            **_who(connection, server_id),
            "duration_secs": round(duration, 3),
            "close_code": code,
            "closed_by": "server" if by_server else "client",
            "reason": reason,
            "subscriptions": len(connection.subscriptions),
        },
    )
