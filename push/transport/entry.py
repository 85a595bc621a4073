"""WebSocket entry: origin check, authentication and routing in one coroutine frame.

This does what Channels' ``OriginValidator`` -> auth middleware -> ``URLRouter`` ->
``as_asgi()`` chain does, with the same classes' rules, but without a suspended
coroutine frame and a copy of the scope per layer: each layer stays alive for the
whole life of the connection, and measured here the chain cost ~3 KB per idle
connection, a seventh of the budget for one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels.security.websocket import WebsocketDenier

from accounts.middleware import resolve_principal
from common.conf import push_settings
from common.errors import CloseCode, PushError
from push.services.admission import handshake_allowed, shed_anonymous
from push.transport.consumers import PushConsumer
from push.transport.origin import BrowserOriginValidator
from push.transport.pusher import PusherConsumer, app_key_of
from push.transport.server_adapters import bound_inbound, close_with_any_code
from push.wire.pusher import PusherError, error_frame

WEBSOCKET_PATHS = frozenset({"/ws/", "/ws"})
# Frames a connection may have waiting for its consumer before the server stops
# reading its socket (daphne; see ``bound_inbound``): as many as the old websockets
# implementation of uvicorn queues. Bytes: one frame of the size limit.
INBOUND_MAX_FRAMES = 32
# How long a handshake's credentials may take to check (a token or a session read on the
# database's threads, which a loaded node may keep waiting): past it the client is told
# to try again later (1013), as when the database is down. Without it, uvicorn kept such
# a handshake waiting for as long as the check took, and daphne's autobahn dropped it
# unanswered after its own 5 s (the abuse suite's handshake attackers under daphne saw
# "did not receive a valid HTTP response" now and then).
ADMISSION_DEADLINE_SECS = 4.0


class WebSocketEntry:
    def __init__(self, allowed_origins: list[str]) -> None:
        self.origins = BrowserOriginValidator(None, allowed_origins)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        pusher = scope.get("path") not in WEBSOCKET_PATHS and app_key_of(scope) is not None
        if not (pusher or scope.get("path") in WEBSOCKET_PATHS) or not self.origins.allows(scope):
            return await WebsocketDenier()(scope, receive, send)
        try:
            async with asyncio.timeout(ADMISSION_DEADLINE_SECS):
                principal = await resolve_principal(scope)
        except (PushError, TimeoutError):
            return await _try_again_later(receive, send, pusher=pusher)
        if principal is None:
            return await WebsocketDenier()(scope, receive, send)
        if not await handshake_allowed(scope, principal) or shed_anonymous(principal, "websocket"):
            # The address over its handshake budget, or the node overloaded (anonymous
            # clients wait): before the consumer, the greeting, the registry and the
            # events a connection costs.
            return await _try_again_later(receive, send, pusher=pusher)
        # The server made this scope for this connection alone: adding to it in place
        # is safe and saves the copy.
        scope["principal"] = principal
        scope["user"] = principal.user
        receive = bound_inbound(
            receive,
            send,
            max_frames=INBOUND_MAX_FRAMES,
            max_bytes=push_settings.MAX_FRAME_BYTES,
        )
        consumer = PusherConsumer() if pusher else PushConsumer()
        return await consumer(scope, receive, send)


async def _try_again_later(receive: Any, send: Any, *, pusher: bool) -> None:
    """The token could not be checked (the database is down or too slow, or the address
    failed too often), the address is over its handshake budget, or the node is
    overloaded and the client anonymous: accept and close with 1013, so the client
    retries later instead of reading 403 as a bad token. A Pusher client is
    told the same in Pusher's words (``pusher:error`` 4100, over capacity, and close
    4100: reconnect after a back-off), as its connection would be."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    code = int(CloseCode.TRY_AGAIN_LATER)
    if pusher:
        code = PusherError.OVER_CAPACITY
        text = error_frame(code, "over capacity; try again later")
        await send({"type": "websocket.send", "text": text})
    if not close_with_any_code(send, code):
        await send({"type": "websocket.close", "code": code})
