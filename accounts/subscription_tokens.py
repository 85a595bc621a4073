"""Signed subscription tokens: a back-end that owns its users lets a browser subscribe
to one channel for a short time, without a grant row in our database.

Format (easy to mint in any language): ``<payload>.<signature>``, both base64url
without padding; payload is the JSON ``{"ch": channel, "iat": unix_seconds, "exp":
unix_seconds, "info": {...}}`` (``iat``, when it was issued, and ``info`` optional;
``info`` is shown as the member's info on presence channels); it may also name
``user_id`` (a string or an integer, as in Pusher's ``channel_data``), the member the
connection is on presence channels, so one user's tabs are one member (without it
each connection is a member of its own); signature is HMAC-SHA256
of the payload text with the shared secret (``PUSH_SUBSCRIPTION_TOKEN_SECRET``, by
default a key derived from ``SECRET_KEY`` for this purpose alone:
``manage.py push_secret subscription-token`` prints it).

A token may live at most ``PUSH_SUBSCRIPTION_TOKEN_MAX_TTL_SECS``: one whose ``exp`` is
further than that from its ``iat`` or from now is refused, so a leaked secret or a
careless back-end cannot hand out tokens that outlive every key rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any, TypeGuard

from django.conf import settings

from common.conf import push_settings
from common.errors import ErrorCode, PushError
from common.keys import SUBSCRIPTION_TOKEN_KEY_SALT, purpose_key

MAX_TOKEN_CHARS = 4096
# A presence member's ``user_id`` at most (Pusher's bound on ``channel_data``'s).
MAX_USER_ID_CHARS = 128
# A back-end whose clock runs ahead of ours by up to this still mints tokens of the
# longest lifetime that we accept.
CLOCK_SKEW_SECS = 30


def subscription_token_secret() -> str:
    return purpose_key(
        SUBSCRIPTION_TOKEN_KEY_SALT,
        explicit=push_settings.SUBSCRIPTION_TOKEN_SECRET,
        secret_key=settings.SECRET_KEY,
    )


def _secret() -> bytes:
    return subscription_token_secret().encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(payload: str) -> str:
    return _b64(hmac.new(_secret(), payload.encode(), hashlib.sha256).digest())


def subscription_token_issue(
    *,
    channel: str,
    ttl_secs: int,
    info: dict[str, Any] | None = None,
    user_id: str | int | None = None,
) -> str:
    if ttl_secs > push_settings.SUBSCRIPTION_TOKEN_MAX_TTL_SECS:
        raise ValueError(
            f"ttl_secs {ttl_secs} is over PUSH_SUBSCRIPTION_TOKEN_MAX_TTL_SECS "
            f"({push_settings.SUBSCRIPTION_TOKEN_MAX_TTL_SECS})"
        )
    now = int(time.time())
    claims: dict[str, Any] = {"ch": channel, "iat": now, "exp": now + ttl_secs}
    if info is not None:
        claims["info"] = info
    if user_id is not None:
        claims["user_id"] = user_id
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{payload}.{_sign(payload)}"


def _forbidden(reason: str) -> PushError:
    return PushError(ErrorCode.FORBIDDEN, f"subscription token refused: {reason}")


def subscription_token_verify(token: str, *, channel: str) -> dict[str, Any]:
    """The token's claims if it is genuine, unexpired and for ``channel``."""
    # The format is ASCII only; hmac.compare_digest raises TypeError on a non-ASCII str,
    # so anything else is refused here as the forgery it is, never as a server error.
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1 or not token.isascii():
        raise _forbidden("malformed")
    payload, signature = token.split(".")
    if not hmac.compare_digest(_sign(payload).encode(), signature.encode()):
        raise _forbidden("bad signature")
    try:
        claims = json.loads(_unb64(payload))
    except (ValueError, binascii.Error) as exc:
        raise _forbidden("malformed") from exc
    if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int):
        raise _forbidden("malformed")
    if claims.get("ch") != channel:
        raise _forbidden("issued for another channel")
    now = time.time()
    if claims["exp"] <= now:
        raise _forbidden("expired")
    _check_lifetime(claims, now)
    if "user_id" in claims and not is_member_user_id(claims["user_id"]):
        raise _forbidden(
            f"user_id must be a string or integer of 1 to {MAX_USER_ID_CHARS} characters"
        )
    return claims


def is_member_user_id(user_id: Any) -> TypeGuard[str | int]:
    """What a presence member's ``user_id`` may be, from a signed token or Pusher's
    ``channel_data``: a string or an integer (not a boolean) of 1 to
    ``MAX_USER_ID_CHARS`` characters, so member lists stay small and printable,
    whoever signed them."""
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        return False
    return 0 < len(str(user_id)) <= MAX_USER_ID_CHARS


def _check_lifetime(claims: dict[str, Any], now: float) -> None:
    max_ttl = push_settings.SUBSCRIPTION_TOKEN_MAX_TTL_SECS
    issued = claims.get("iat")
    if issued is not None and (not isinstance(issued, int) or claims["exp"] - issued > max_ttl):
        raise _forbidden(f"lives longer than {max_ttl} s")
    if claims["exp"] - now > max_ttl + CLOCK_SKEW_SECS:
        raise _forbidden(f"lives longer than {max_ttl} s")
