"""For your back-end, standard library only: mint signed subscription tokens for
browsers, and verify the webhooks the push server's event worker sends.

Each takes its own secret: ``PUSH_SUBSCRIPTION_TOKEN_SECRET`` and
``PUSH_WEBHOOK_SECRET`` (or, when those are unset, the keys the server derives from
its ``SECRET_KEY``, printed by ``manage.py push_secret subscription-token`` and
``manage.py push_secret webhook``). A webhook receiver holds only the webhook secret,
which cannot mint tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

# How old a webhook's timestamp may be before it is refused as a replay; the server
# stamps every attempt afresh, so this only has to cover clock skew and transit.
WEBHOOK_TOLERANCE_SECS = 300
# The longest presence member ``user_id`` the server takes in a token.
MAX_USER_ID_CHARS = 128


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def subscription_token(
    channel: str,
    *,
    ttl_secs: int,
    secret: str,
    info: dict[str, Any] | None = None,
    user_id: str | int | None = None,
) -> str:
    """A token letting its holder subscribe to ``channel`` for ``ttl_secs`` (the server
    refuses lifetimes over its ``PUSH_SUBSCRIPTION_TOKEN_MAX_TTL_SECS``, 1 h by
    default), and read its REST history and details. On presence channels ``user_id``
    is who the holder is, so that one user's connections (tabs, devices) are one member
    (without it each connection is a member of its own), and ``info`` the member's info.

    Raises ``ValueError`` for a ``user_id`` the server would refuse the token for: it
    must be a string or an integer (not a boolean) of 1 to 128 characters."""
    now = int(time.time())
    claims: dict[str, Any] = {"ch": channel, "iat": now, "exp": now + ttl_secs}
    if info is not None:
        claims["info"] = info
    if user_id is not None:
        claims["user_id"] = _member_user_id(user_id)
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}"


def _member_user_id(user_id: Any) -> str | int:
    # Checked here, where the back-end's mistake is made, rather than as a FORBIDDEN
    # subscribe in someone's browser (the server's own rule, accounts.subscription_tokens).
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
        raise ValueError(f"user_id must be a string or an integer, not {type(user_id).__name__}")
    if not 0 < len(str(user_id)) <= MAX_USER_ID_CHARS:
        raise ValueError(f"user_id must be 1 to {MAX_USER_ID_CHARS} characters")
    return user_id


def webhook_verify(
    body: bytes,
    headers: Mapping[str, str],
    *,
    secret: str,
    tolerance_secs: float = WEBHOOK_TOLERANCE_SECS,
    now: float | None = None,
) -> bool:
    """Whether a webhook request is genuine and fresh: ``X-Push-Signature`` is the HMAC
    of ``<X-Push-Timestamp>.<body>`` and the timestamp is within ``tolerance_secs`` of
    ``now``. Pass the raw body, before any JSON parsing; ``headers`` is matched without
    regard to case. Dedupe accepted events by ``X-Push-Event-Id`` (delivery is at least
    once)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    timestamp = lowered.get("x-push-timestamp", "")
    given = lowered.get("x-push-signature", "")
    if not timestamp.isdigit() or not given.isascii():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_secs:
        return False
    signed = timestamp.encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)
