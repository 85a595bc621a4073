"""Failed authentications per client address: a bad token or an unknown session costs a
database query, and DRF authenticates before it throttles, so without this count a
client could try keys (or flood the database) as fast as it can send.

After ``PUSH_AUTH_FAILURES_PER_MIN`` failures from one address within a minute, that
address's credentials are no longer checked until the minute is over: REST answers 429
``RATE_LIMITED``, a WebSocket handshake is closed 1013 and an SSE request answered 429
(try again later: a valid credential behind the same address is not called invalid).
The counters live in the shared cache (Redis when configured), so the budget holds
across nodes; while the cache is unreachable nothing is counted, never refused.
"""

from __future__ import annotations

import logging

from django.core.cache import cache
from redis.exceptions import RedisError

from accounts.counters import count
from common.addresses import address_block
from common.conf import push_settings
from common.errors import ErrorCode, PushError

logger = logging.getLogger(__name__)

WINDOW_SECS = 60


def auth_failure_key(address: str | None) -> str:
    # Per IPv6 /64, as the address budgets: a host picks any address of its /64, so a
    # count per exact address let it try (and look up) a new made-up key each time.
    return f"auth-failures:{address_block(address) if address else address}"


def auth_failures_limit(address: str | None) -> int:
    """The failures ``address`` may have this minute; 0 when it is not counted."""
    limit = push_settings.AUTH_FAILURES_PER_MIN
    return limit if address and limit > 0 else 0


def auth_failures_exceeded(address: str | None) -> bool:
    """Whether ``address`` used up its failures for this minute."""
    limit = auth_failures_limit(address)
    if not limit:
        return False
    try:
        return int(cache.get(auth_failure_key(address)) or 0) >= limit
    except RedisError as exc:
        logger.warning("could not read the failed authentications of %s: %s", address, exc)
        return False


def auth_failure_record(address: str | None) -> None:
    """Count one failed authentication from ``address``; the window starts at the first."""
    if not address:
        return
    try:
        count(auth_failure_key(address), WINDOW_SECS)
    except RedisError as exc:
        logger.warning("could not count a failed authentication of %s: %s", address, exc)


def too_many_failures() -> PushError:
    return PushError(
        ErrorCode.RATE_LIMITED,
        f"too many failed authentications from this address; retry within {WINDOW_SECS} s",
    )
