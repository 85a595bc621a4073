"""Which ``Host`` a request may name: the rule of Django's ``get_host()``, for requests
answered without a Django view (WebSocket, SSE, the REST fast path)."""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.http.request import split_domain_port, validate_host


def allowed_hosts() -> list[str]:
    """``ALLOWED_HOSTS``; with ``DEBUG`` and none set, localhost, as Django allows."""
    if settings.DEBUG and not settings.ALLOWED_HOSTS:
        return [".localhost", "127.0.0.1", "[::1]"]
    return list(settings.ALLOWED_HOSTS)


def host_header_allowed(value: bytes) -> bool:
    """Whether a ``Host`` header of this value names one of ``allowed_hosts()``."""
    hosts = _kept_hosts()
    if len(value) > MAX_KEPT_HOST_BYTES:
        return _host_allowed(value, hosts)
    return _kept_host_allowed(value, hosts)


def _host_allowed(value: bytes, hosts: tuple[str, ...]) -> bool:
    domain, _port = split_domain_port(value.decode("latin-1"))
    return bool(domain) and validate_host(domain, list(hosts))


# Clients send a handful of Host values, each asked about on every request, so the
# answers are kept: at most 256 of them (a client sending a new one each time only
# turns the oldest out), of at most a host name's length and a port each.
MAX_KEPT_HOST_BYTES = 260
_kept_host_allowed = functools.lru_cache(maxsize=256)(_host_allowed)


# ``allowed_hosts()`` as a tuple, until DEBUG or ALLOWED_HOSTS change: asked on every
# request and handshake, its three reads of Django's settings (~0.33 us each through
# their lazy object) were most of the check's ~1 us.
@functools.cache
def _kept_hosts() -> tuple[str, ...]:
    return tuple(allowed_hosts())


def _hosts_changed(setting: str, **kwargs: Any) -> None:
    if setting in ("DEBUG", "ALLOWED_HOSTS"):
        _kept_hosts.cache_clear()


setting_changed.connect(_hosts_changed, dispatch_uid="common-hosts-allowed")
