"""Where a request comes from: the origin check for WebSocket handshakes and SSE
streams as the contract words it, the ``Host`` check, and the client's address and
scheme behind trusted proxies.

Channels' ``OriginValidator`` refuses a handshake without ``Origin``; the contract
allows it (a client that sends none is not a browser, and a browser always sends one),
so only a present ``Origin`` is checked against the allowed origins.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlparse

from channels.security.websocket import OriginValidator

from common.hosts import host_header_allowed


class BrowserOriginValidator(OriginValidator):
    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)

    def allows(self, scope: dict[str, Any]) -> bool:
        """Whether the request's ``Origin`` (WebSocket handshake or SSE) may connect."""
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                return self.valid_origin(urlparse(value.decode("latin-1")))
        return True


def host_allowed(scope: dict[str, Any]) -> bool:
    """Whether the request's ``Host`` is an allowed one, as Django's ``get_host()``
    decides for views (WebSocket and SSE never reach one). A request without ``Host``
    passes: every browser sends one (HTTP/1.1 and WebSocket require it), and a
    DNS-rebinding page can only make a browser send its own name."""
    for name, value in scope.get("headers", ()):
        if name == b"host":
            return host_header_allowed(value)
    return True


def forwarded_client(scope: dict[str, Any], trusted_proxies: int) -> tuple[str, int] | None:
    """The client's address: the socket peer's, or behind ``trusted_proxies`` proxies
    the ``X-Forwarded-For`` entry the outermost of them appended (DRF's ``NUM_PROXIES``
    rule). Entries left of it are whatever the client sent, so they are never taken:
    a client that could choose its address would escape every per-address limit."""
    peer = scope.get("client")
    if trusted_proxies <= 0:
        return tuple(peer) if peer else None
    entries: list[str] = []
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            entries += [e.strip() for e in value.decode("latin-1").split(",") if e.strip()]
    chosen = entries[-min(trusted_proxies, len(entries))] if entries else ""
    try:
        # The registry stores addresses as such: anything else is no address.
        return str(ipaddress.ip_address(_without_port(chosen))), 0
    except ValueError:
        return tuple(peer) if peer else None


def _without_port(entry: str) -> str:
    """An ``X-Forwarded-For`` entry's address: some proxies (Azure's gateways, IIS ARR)
    append the client's port, ``203.0.113.5:51000`` or ``[2001:db8::1]:51000``. Taken
    for no address, every client behind such a proxy fell back to the proxy's own and
    shared one budget, which one client could spend for all of them."""
    if entry.startswith("["):
        return entry[1 : entry.find("]")] if "]" in entry else entry
    if entry.count(":") == 1:  # IPv4 with a port (an IPv6 address has several colons)
        return entry.split(":", 1)[0]
    return entry


def forwarded_scheme(scope: dict[str, Any]) -> str:
    """The scheme the client used, from the trusted proxy's ``X-Forwarded-Proto`` (the
    last one, the nearest proxy's), so links Django builds (history's ``next``) and
    ``is_secure()`` match what the client sees."""
    proto = None
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-proto":
            proto = value.decode("latin-1").split(",")[-1].strip().lower()
    secure = proto in ("https", "wss")
    if proto is None:
        return str(scope.get("scheme", "http"))
    if scope["type"] == "websocket":
        return "wss" if secure else "ws"
    return "https" if secure else "http"
