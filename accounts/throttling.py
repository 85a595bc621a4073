"""REST throttling per credential: each user or service token has its own budget, and
anonymous callers share one per IP address. Counters live in the shared cache (Redis
when configured), so the budget holds across nodes.

Service tokens are back-ends publishing for many users: they have a rate scope of
their own (``service``, ``PUSH_REST_SERVICE_RATE``), unthrottled when it is unset."""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle

from accounts.authentication import request_principal

# The throttle rate scope (DEFAULT_THROTTLE_RATES) of each kind of principal.
_SCOPES = {"anonymous": "anonymous", "user": "principal", "service": "service"}


class PrincipalRateThrottle(SimpleRateThrottle):
    scope = "principal"

    def allow_request(self, request: Request, view: Any) -> bool:
        principal = request_principal(request)
        self.scope = _SCOPES.get(principal.kind, "principal")
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)

    def get_rate(self) -> str | None:
        # Read the rates when asked, not once at import as DRF's class attribute does,
        # so settings changed at runtime (and in tests) apply.
        from rest_framework.settings import api_settings

        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)  # type: ignore[no-any-return]

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        principal = request_principal(request)
        ident = principal.key if principal.is_authenticated else self.get_ident(request)
        return f"throttle_{self.scope}_{ident}"
