"""Origin check for WebSocket handshakes and SSE streams, as the contract words it.

Channels' ``OriginValidator`` refuses a handshake without ``Origin``; the contract
allows it (a client that sends none is not a browser, and a browser always sends one),
so only a present ``Origin`` is checked against the allowed origins.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from channels.security.websocket import OriginValidator


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
