"""Signed subscription tokens on the client's side (docs/protocol.md, "Signed
subscription tokens"): asking a subscription's token provider for one, and reading when
it expires, so that the client asks for a fresh one before the server ends the
subscription. The client never verifies a token: only the server holds the key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pushclient.errors import TokenProviderFailed

# Called with the channel for every subscribe the client sends for it.
TokenProvider = Callable[[str], str | Awaitable[str]]

# A subscription whose token comes from a provider is extended with a fresh token at 90%
# of the token's lifetime, and at least this long before its ``exp`` (half-way through a
# token shorter than twice this): the server ends it within its revocation check
# interval after ``exp``, and a provider may take a round trip to the back-end.
TOKEN_REFRESH_LEAD_SECS = 5.0
# Never sooner after a token was obtained: a provider whose tokens look expired already
# (a back-end's clock far behind) is asked once a second at most, never in a loop.
MIN_TOKEN_REFRESH_SECS = 1.0


def token_claims(token: str) -> dict[str, Any] | None:
    """The payload of ``<payload>.<signature>`` (base64url JSON), not verified; None when
    it does not read as a JSON object."""
    payload = token.split(".", 1)[0]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def token_refresh_delay_secs(token: str, now: float | None = None) -> float | None:
    """How long after obtaining ``token`` to ask for a fresh one; None when it names no
    ``exp``. Over the token's lifetime, ``exp - iat``, so that a client clock that is off
    does not matter (``exp`` minus now without ``iat``): at 90% of it, and at least
    ``TOKEN_REFRESH_LEAD_SECS`` before ``exp`` (half-way for a short one)."""
    claims = token_claims(token) or {}
    exp, iat = _number(claims.get("exp")), _number(claims.get("iat"))
    if exp is None:
        return None
    if iat is not None and iat <= exp:
        lifetime = exp - iat
    else:
        lifetime = exp - (time.time() if now is None else now)
    lead = max(0.1 * lifetime, min(TOKEN_REFRESH_LEAD_SECS, lifetime / 2))
    return max(MIN_TOKEN_REFRESH_SECS, lifetime - lead)


async def token_from(provider: TokenProvider, channel: str, *, timeout_secs: float) -> str:
    """The provider's token for ``channel``. Raises ``TokenProviderFailed`` when it raises,
    gives anything but a non-empty string, or takes longer than ``timeout_secs``: a
    back-end that hangs must not leave the channel silent for good after a reconnect.
    A plain function runs on the event loop (and cannot be timed out): one that waits
    on the network should be a coroutine function."""
    timeout = asyncio.timeout(timeout_secs)
    try:
        async with timeout:
            token = provider(channel)
            if inspect.isawaitable(token):
                token = await token
    except Exception as exc:
        reason = f"no token within {timeout_secs} s" if timeout.expired() else _describe(exc)
        raise TokenProviderFailed(channel, reason) from exc
    if not isinstance(token, str) or not token:
        # Never the value itself: it may be a token in the wrong shape.
        given = "an empty string" if token == "" else type(token).__name__
        raise TokenProviderFailed(channel, f"it gave {given}, not a token")
    return token


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
