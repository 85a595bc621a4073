"""Error codes of the wire contract and the one exception that carries them.

Each transport turns a ``PushError`` into its reply in exactly one place: the
WebSocket consumer's ``except`` and DRF's exception handler (``push.api.exceptions``).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    INVALID_JSON = "INVALID_JSON"
    UNKNOWN_MESSAGE_TYPE = "UNKNOWN_MESSAGE_TYPE"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    FORBIDDEN = "FORBIDDEN"
    NOT_SUBSCRIBED = "NOT_SUBSCRIBED"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    # Not in the contract's table: a dependency (PostgreSQL, Redis) is down. The
    # request was not carried out and may be retried; the connection stays open.
    UNAVAILABLE = "UNAVAILABLE"
    NOT_FOUND = "NOT_FOUND"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_LARGE = 1009
    SERVER_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    HEARTBEAT_TIMEOUT = 4001
    SLOW_CONSUMER = 4002


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.UNKNOWN_MESSAGE_TYPE: 400,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_SUBSCRIBED: 400,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.NOT_FOUND: 404,
}

# Codes after which the WebSocket is closed; every other error leaves it open.
_CLOSE_CODE: dict[ErrorCode, CloseCode] = {
    ErrorCode.MESSAGE_TOO_LARGE: CloseCode.TOO_LARGE,
}


class PushError(Exception):
    """Raised when a request cannot be carried out; carries the contract's error code."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        # The position of the refused item in a batch request (the batch publish).
        self.index = index

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self.code]

    @property
    def close_code(self) -> CloseCode | None:
        return _CLOSE_CODE.get(self.code)

    def __repr__(self) -> str:
        return f"PushError({self.code.value}, {self.message!r})"
