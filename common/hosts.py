"""Which ``Host`` a request may name: the rule of Django's ``get_host()``, for requests
answered without a Django view (WebSocket, SSE, the REST fast path)."""

from __future__ import annotations

from django.conf import settings
from django.http.request import split_domain_port, validate_host


def allowed_hosts() -> list[str]:
    """``ALLOWED_HOSTS``; with ``DEBUG`` and none set, localhost, as Django allows."""
    if settings.DEBUG and not settings.ALLOWED_HOSTS:
        return [".localhost", "127.0.0.1", "[::1]"]
    return list(settings.ALLOWED_HOSTS)


def host_header_allowed(value: bytes) -> bool:
    """Whether a ``Host`` header of this value names one of ``allowed_hosts()``."""
    domain, _port = split_domain_port(value.decode("latin-1"))
    return bool(domain) and validate_host(domain, allowed_hosts())
