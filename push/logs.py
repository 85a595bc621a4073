"""Logging: secrets kept out of every line, and JSON lines when asked for.

Tokens travel in query strings (``?token=`` for clients that cannot set headers), and
servers log paths; ``RedactFilter`` removes them from every record before a handler
formats it. ``JsonFormatter`` writes one JSON object per line (``LOG_JSON=true``), with
any ``extra=`` fields the caller gave.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from push.errors import CloseCode

if TYPE_CHECKING:
    from push.connection import ClientConnection

_SECRET_IN_QUERY = re.compile(r"((?:^|[?&\s\"'])(?:token|key|api_key)=)[^&\s\"']+", re.IGNORECASE)
_SECRET_IN_HEADER = re.compile(r"(Authorization:\s*Token\s+)\S+", re.IGNORECASE)
# LogRecord's own attributes; anything else on a record came in through ``extra=``.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def redact(text: str) -> str:
    return _SECRET_IN_HEADER.sub(r"\1[redacted]", _SECRET_IN_QUERY.sub(r"\1[redacted]", text))


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
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
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


connection_log = logging.getLogger("push.connections")

_CLOSE_REASONS = {
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


def log_connection_closed(
    connection: ClientConnection, peer_code: int | None, *, by_server: bool
) -> None:
    """One line per connection, at its close: who, how long, and why it ended."""
    if not connection_log.isEnabledFor(logging.INFO):
        return
    code = connection.close_code if by_server else peer_code
    reason = _CLOSE_REASONS.get(code, "client closed") if by_server else "client closed"
    connection_log.info(
        "connection %s closed after %.1f s: %s",
        connection.connection_id,
        time.monotonic() - connection.opened_at,
        reason,
        extra={
            "connection_id": str(connection.connection_id),
            "principal": connection.principal.key,
            "ip": connection.ip,
            "wire_format": connection.codec.name,
            "duration_secs": round(time.monotonic() - connection.opened_at, 3),
            "close_code": code,
            "closed_by": "server" if by_server else "client",
            "reason": reason,
            "subscriptions": len(connection.subscriptions),
        },
    )
