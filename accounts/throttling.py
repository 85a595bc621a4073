"""REST throttling per credential: each user or service token has its own budget, and
anonymous callers share one per IP address (an IPv6 address's whole /64, which one
host can pick addresses from, as every other limit per address). Counters live in the
shared cache (Redis when configured), so the budget holds across nodes.

Service tokens are back-ends publishing for many users: they have a rate scope of
their own (``service``, ``PUSH_REST_SERVICE_RATE``), unthrottled when it is unset."""

from __future__ import annotations

import time
from typing import Any

from redis.exceptions import RedisError
from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle

from accounts.authentication import request_principal
from accounts.counters import count
from accounts.principals import Principal
from common.addresses import address_block
from common.errors import ErrorCode, PushError

# The throttle rate scope (DEFAULT_THROTTLE_RATES) of each kind of principal.
_SCOPES = {"anonymous": "anonymous", "user": "principal", "service": "service"}


class PrincipalRateThrottle(SimpleRateThrottle):
    scope = "principal"

    def allow_request(self, request: Request, view: Any) -> bool:
        principal = request_principal(request)
        self.scope = _SCOPES.get(principal.kind, "principal")
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        return self._count_in_window(key)

    def counts(self, principal: Principal) -> bool:
        """Whether this throttle counts ``principal``'s requests: a round trip to the
        shared cache, so not on the event loop (a service token without a rate of
        its own is not counted)."""
        return self.get_rate_of(_SCOPES.get(principal.kind, "principal")) is not None

    def _count_in_window(self, key: str) -> bool:
        """Count the request in the current fixed window of ``duration`` seconds.

        DRF's own throttle reads its history list, appends and writes it back: requests
        that arrive together read the same list and all but one are forgotten (measured
        by the abuse suite: 810 anonymous requests answered in under a minute against a
        budget of 600). ``add`` and ``incr`` are atomic in Redis, so every request
        counts; a fixed window lets a client spend at most two budgets across a window's
        edge, never more. One round trip (``accounts.counters``)."""
        num_requests, duration = self.num_requests, self.duration
        if num_requests is None or duration is None:  # no rate: allow_request returned
            return True
        self.now = self.timer()
        allowed, self._retry_after = count_in_window(key, num_requests, duration, self.now)
        return allowed

    def wait(self) -> float | None:
        return getattr(self, "_retry_after", None)

    def get_rate(self) -> str | None:
        return self.get_rate_of(self.scope)

    @staticmethod
    def get_rate_of(scope: str) -> str | None:
        # Read the rates when asked, not once at import as DRF's class attribute does,
        # so settings changed at runtime (and in tests) apply.
        from rest_framework.settings import api_settings

        return api_settings.DEFAULT_THROTTLE_RATES.get(scope)  # type: ignore[return-value]  # the stubs say a number; DRF's rates are strings ("60/min")

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        principal = request_principal(request)
        return f"throttle_{self.scope}_{_ident(principal, self.get_ident(request))}"


def count_in_window(key: str, num_requests: int, duration: int, now: float) -> tuple[bool, float]:
    """Count one request under ``key`` in the current fixed window (see
    ``PrincipalRateThrottle._count_in_window``): whether it is within ``num_requests``,
    and the seconds until the window ends."""
    window = int(now // duration)
    count_now = count(f"{key}:{window}", timeout=duration + 1)
    return count_now <= num_requests, (window + 1) * duration - now


def principal_within_rate(principal: Principal, address: str | None) -> bool:
    """The REST budget of ``principal`` (anonymous: of its address) for a request
    outside DRF (Pusher's authorization endpoints): the same scopes, rates and
    counters as ``PrincipalRateThrottle``, so both draw on one budget."""
    from rest_framework.settings import api_settings

    scope = _SCOPES.get(principal.kind, "principal")
    rate = api_settings.DEFAULT_THROTTLE_RATES.get(scope)
    if rate is None:
        return True
    num_requests, duration = SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]  # parse_rate reads nothing of self
    if num_requests is None or duration is None:
        return True
    key = f"throttle_{scope}_{_ident(principal, address)}"
    try:
        allowed, _ = count_in_window(key, num_requests, duration, time.time())
    except RedisError as exc:
        # What the REST API answers when its throttle cannot count (push.api.exceptions):
        # a dependency that is down, not a server error.
        raise PushError(ErrorCode.UNAVAILABLE, "Redis unavailable; retry later") from exc
    return allowed


def _ident(principal: Principal, address: str | None) -> str | None:
    """Whose budget a request draws on: its principal's, or an anonymous one's address
    block (an IPv6 /64: counted per exact address, one host could send each request
    from a new one)."""
    if principal.is_authenticated:
        return principal.key
    return address_block(address) if address else address
