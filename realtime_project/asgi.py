"""ASGI entry point: HTTP to Django, WebSocket to the push consumer, ``/sse/`` to the
Server-Sent Events stream.

WebSockets pass the origin check (browsers only; a client without ``Origin`` is not a
browser and is allowed) and token or session authentication before the consumer, in
``push.entry``.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from django.conf import settings  # noqa: E402

from push.conf import push_settings  # noqa: E402
from push.entry import WebSocketEntry  # noqa: E402
from push.node import tune_garbage_collector  # noqa: E402
from push.sse import SSE_PATHS, SseEntry  # noqa: E402

websocket_entry = WebSocketEntry(settings.ALLOWED_ORIGINS)
sse_entry = SseEntry(settings.ALLOWED_ORIGINS)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """HTTP to Django, WebSocket to the push consumer (what ProtocolTypeRouter does,
    without one more frame held for every connection)."""
    if scope["type"] == "websocket":
        return await websocket_entry(scope, receive, send)
    if scope["type"] == "http" and scope["path"] in SSE_PATHS:
        return await sse_entry(scope, receive, send)
    return await django_asgi_app(scope, receive, send)


tune_garbage_collector(
    gen0_threshold=push_settings.GC_GEN0_THRESHOLD, freeze=push_settings.GC_FREEZE
)
