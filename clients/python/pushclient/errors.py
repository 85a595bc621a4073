"""The client's exceptions."""

from __future__ import annotations

from typing import Any


class PushError(Exception):
    """Raised when the server answers a request with an ``error`` envelope."""

    def __init__(self, code: str, message: str, envelope: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.envelope = envelope


class ConnectionLost(PushError):
    """Raised for a request in flight when its connection drops (it may or may not
    have been carried out: a WebSocket publish carries no idempotency key)."""

    def __init__(self, message: str = "the connection was lost") -> None:
        super().__init__("CONNECTION_LOST", message)


class RequestTimeout(PushError, TimeoutError):
    """Raised when a request gets no reply within ``request_timeout_secs`` (code
    ``TIMEOUT``; it may or may not have been carried out). Also a ``TimeoutError``."""

    def __init__(self, message: str) -> None:
        super().__init__("TIMEOUT", message)


class ConnectionClosed(PushError):
    """Raised when the client is closed for good: by ``close()``, a terminal close code
    (1000, 1008, 1009) or a refused handshake."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__("CONNECTION_CLOSED", message)
        self.close_code = close_code


class NotConnected(PushError):
    """Raised when a request that is not queued (publish, unsubscribe) is made while
    the client is not connected."""

    def __init__(self, state: str) -> None:
        super().__init__("NOT_CONNECTED", f"not connected (state {state})")


class TokenProviderFailed(PushError):
    """Raised when a subscription's token provider raises, gives no token (not a
    non-empty string) or does not answer within ``request_timeout_secs`` (code
    ``TOKEN_PROVIDER_FAILED``; the provider's own exception is its ``__cause__``)."""

    def __init__(self, channel: str, reason: str) -> None:
        message = f"the token provider of {channel!r} failed: {reason}"
        super().__init__("TOKEN_PROVIDER_FAILED", message)
