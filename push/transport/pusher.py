"""The Pusher protocol's WebSocket endpoint, ``/app/<key>`` (docs/pusher.md).

The same consumer loop, node, hub, limits and metrics as our own protocol
(``push.transport.consumers``); what differs is the handshake (an app key and a
protocol version in the URL, Pusher's ``connection_established``), the frames (the
Pusher codec, ``push.wire.pusher``) and the requests, which the Pusher session
services carry out (``push.services.pusher_sessions``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from redis.exceptions import RedisError

from common import metrics
from common.conf import push_settings
from common.errors import CloseCode, ErrorCode, PushError
from push.cluster.address_budgets import UNCHARGED_FRAME_BYTES, large_frame_allowed
from push.fanout.outbox import OutFrame
from push.services.pusher_apps import PusherApp, app_by_key_async
from push.services.pusher_sessions import (
    PusherProblem,
    SubscriptionRefused,
    pusher_client_event,
    pusher_signin,
    pusher_subscribe,
    pusher_unsubscribe,
)
from push.services.runtime import get_node
from push.services.subscriptions import client_ip, session_open
from push.transport.connection import ClientConnection
from push.transport.consumers import PushConsumer, frame_size
from push.transport.frame_reader import read_frames_directly
from push.transport.limits import TokenBucket
from push.transport.server_adapters import bound_unseen_frames
from push.wire import pusher
from push.wire.pusher import PUSHER_CODEC, PusherError

logger = logging.getLogger(__name__)

PATH_PREFIX = "/app/"
# Protocol versions whose frames are the ones served here (pusher-js 8 speaks 7).
SUPPORTED_VERSIONS = range(5, 8)
# A pusher:subscribe past the frame rate waits this long at most for its turn, looking
# this often (``_subscribe_paced``); a frame that names it elsewhere is paced too.
SUBSCRIBE_PACE_MAX_SECS = 2.0
SUBSCRIBE_PACE_POLL_SECS = 0.02
_SUBSCRIBE_MARK = f'"{pusher.SUBSCRIBE}"'

# Our close codes as Pusher's (4000-4099: do not reconnect; 4100-4199: reconnect after
# a back-off; 4200-4299: reconnect now), with the message of the pusher:error sent first.
_PUSHER_CLOSE: dict[int, tuple[int, str]] = {
    CloseCode.GOING_AWAY: (PusherError.GENERIC_RECONNECT, "server going away; reconnect"),
    CloseCode.SERVICE_RESTART: (PusherError.GENERIC_RECONNECT, "server restarting; reconnect"),
    CloseCode.SERVER_ERROR: (PusherError.GENERIC_RECONNECT, "server error; reconnect"),
    CloseCode.TRY_AGAIN_LATER: (PusherError.OVER_CAPACITY, "over capacity; try again later"),
    CloseCode.SLOW_CONSUMER: (PusherError.OVER_CAPACITY, "not reading fast enough"),
    CloseCode.HEARTBEAT_TIMEOUT: (PusherError.PONG_NOT_RECEIVED, "pong reply not received"),
    CloseCode.POLICY: (PusherError.UNAUTHORIZED, "connection closed by the server"),
    CloseCode.TOO_LARGE: (PusherError.UNAUTHORIZED, "message too large"),
}


def app_key_of(scope: Mapping[str, Any]) -> str | None:
    path = scope.get("path") or ""
    key = path[len(PATH_PREFIX) :].rstrip("/") if path.startswith(PATH_PREFIX) else ""
    return key if key and "/" not in key else None


MAX_VERSION_DIGITS = 3


def _version_refusal(scope: Mapping[str, Any]) -> tuple[int, str] | None:
    query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
    version = (query.get("protocol") or [None])[0]
    if version is None:
        return PusherError.NO_VERSION, "no protocol version supplied"
    # ASCII digits, and few: isdigit() alone takes "²", which int() refuses, and
    # thousands of digits, past what int() reads (either raised in the handshake).
    if not version.isascii() or not version.isdigit() or len(version) > MAX_VERSION_DIGITS:
        return PusherError.INVALID_VERSION, "invalid version string format"
    if int(version) not in SUPPORTED_VERSIONS:
        return PusherError.UNSUPPORTED_VERSION, f"unsupported protocol version {version}"
    return None


class PusherConnection(ClientConnection):
    """A client speaking Pusher: our connection, with its app, socket id and the state
    Pusher adds (a signed-in user, presence ids, the client-event rate)."""

    __slots__ = (
        "app",
        "client_event_rate",
        "pinged_at",
        "presence_ids",
        "pusher_user_id",
        "socket_id",
    )

    def __init__(self, *, app: PusherApp, **kwargs: Any) -> None:
        super().__init__(codec=PUSHER_CODEC, **kwargs)
        self.app = app
        self.socket_id = pusher.new_socket_id()
        self.pusher_user_id: str | None = None
        self.presence_ids: dict[str, str] = {}
        rate = push_settings.PUSHER_CLIENT_EVENT_RATE
        self.client_event_rate = TokenBucket(rate, rate)
        self.pinged_at: float | None = None

    def send_frame(self, text: str) -> None:
        self.outbox.push(OutFrame(self.codec.send_event(text), len(text)))

    def refuse(self, code: int, message: str) -> None:
        """``pusher:error`` with ``code``, then close with the same code."""
        if self.is_open:
            self.send_frame(pusher.error_frame(code, message))
        super().close(code)

    def close(self, code: int) -> None:
        pusher_code, message = _PUSHER_CLOSE.get(code, (code, "closed"))
        self.refuse(pusher_code, message)

    def abort(self, code: int) -> None:
        super().abort(_PUSHER_CLOSE.get(code, (code, ""))[0])

    def check_silence(self, now: float, cutoff: float) -> int:
        """Pusher's rule for a quiet client: ping it after ``activity_timeout``, close it
        (4201) when no frame came back within ``PUSHER_PONG_TIMEOUT_SECS``. Returns 1 if
        closed. The node's heartbeat check calls it (every few seconds)."""
        if self.pinged_at is not None and self.pinged_at >= self.last_seen:
            if now - self.pinged_at >= push_settings.PUSHER_PONG_TIMEOUT_SECS:
                self.refuse(PusherError.PONG_NOT_RECEIVED, "pong reply not received")
                return 1
            return 0
        if now - self.last_seen >= push_settings.PUSHER_ACTIVITY_TIMEOUT_SECS:
            self.pinged_at = now
            self.send_frame(pusher.event_frame(pusher.PING, {}))
        return 0


class PusherConsumer(PushConsumer):
    """``PushConsumer``'s loop and close handling, with Pusher's handshake and frames."""

    async def on_connect(self, send: Any) -> bool:
        app = await self._app_or_none()
        try:
            self.node = await get_node()
        except Exception:
            logger.exception("node could not start")
            # Accepted first, as for every refusal here: a close before the accept
            # reaches the client as HTTP 403. 4100-4199: reconnect after a back-off (a
            # node that cannot start is not helped by clients reconnecting at once).
            await send({"type": "websocket.accept"})
            await self._refuse_unaccepted(
                send, PusherError.OVER_CAPACITY, "the server is unavailable; retry later"
            )
            return False
        await send({"type": "websocket.accept"})
        read_frames_directly(send)
        bound_unseen_frames(send)
        if app is None:
            # Accepted first so that the client learns why, as Pusher does.
            await self._refuse_unaccepted(send, PusherError.APP_NOT_FOUND, "app key not found")
            return True
        refusal = _version_refusal(self.scope)
        if refusal is not None:
            await self._refuse_unaccepted(send, *refusal)
            return True
        connection = PusherConnection(
            app=app,
            send=send,
            principal=self.scope["principal"],
            ip=client_ip(self.scope),
            on_closing=self.node.on_connection_closing,
        )
        established = {
            "socket_id": connection.socket_id,
            "activity_timeout": push_settings.PUSHER_ACTIVITY_TIMEOUT_SECS,
        }
        refused = session_open(
            self.node,
            connection,
            greet=lambda: connection.send_frame(
                pusher.event_frame(pusher.CONNECTION_ESTABLISHED, established)
            ),
        )
        if refused is not None:
            if refused == CloseCode.GOING_AWAY:
                # This node is stopping. pusher-js reconnects at once after 42xx, and a
                # balancer that sends it back here would have it loop as fast as the
                # network goes while the node drains: 41xx makes it wait a second.
                connection.refuse(PusherError.OVER_CAPACITY, "server going away; reconnect later")
            else:
                connection.close(refused)
            return True
        self.connection = connection
        return True

    async def _app_or_none(self) -> PusherApp | None:
        key = app_key_of(self.scope)
        if key is None:
            return None
        try:
            return await app_by_key_async(key)
        except Exception as exc:  # the database is down and the apps were never read
            logger.warning("pusher apps could not be read: %s", exc)
            return None

    async def _refuse_unaccepted(self, send: Any, code: int, message: str) -> None:
        await send({"type": "websocket.send", "text": pusher.error_frame(code, message)})
        await send({"type": "websocket.close", "code": code})

    async def on_frame(self, connection: Any, event: dict[str, Any]) -> None:
        connection.last_seen = time.monotonic()
        if not connection.rate.take() and not await _subscribe_paced(connection, event):
            self._over_rate(connection)
            return
        name = None
        frame: Any = None
        try:
            payload = connection.codec.frame_payload(event)
            size = frame_size(payload)
            if size > push_settings.MAX_FRAME_BYTES:
                # Closed, as our own protocol closes 1009 (4009 here: pusher-js must not
                # send it again). Answered with the connection left open, frames of up to
                # four times the limit (what the server passes) went on at the frame rate,
                # never charged to the address's byte budget: 120 MiB in half a second on
                # one connection, read and decoded for nothing.
                raise PusherProblem(
                    PusherError.UNAUTHORIZED,
                    f"frame is larger than {push_settings.MAX_FRAME_BYTES} bytes",
                    close=True,
                )
            if size > UNCHARGED_FRAME_BYTES and not large_frame_allowed(
                connection.address_budget, size
            ):
                self._over_rate(connection)
                return
            frame = connection.codec.decode(payload)
            name = frame.get("event") if isinstance(frame, dict) else None
            if not isinstance(name, str):
                raise PusherProblem(None, "a frame is a JSON object with a string 'event'")
            metrics.FRAMES_RECEIVED.labels(_frame_kind(name)).inc()
            await self._handle(connection, name, frame)
        except SubscriptionRefused as exc:
            connection.send_frame(
                pusher.subscription_error_frame(exc.channel, exc.status, exc.message)
            )
        except PusherProblem as exc:
            if exc.close:
                connection.refuse(exc.code or PusherError.UNAUTHORIZED, exc.message)
            else:
                connection.send_frame(pusher.error_frame(exc.code, exc.message))
        except PushError as exc:
            self._failed(connection, name, frame, exc.http_status, exc.message)
        except (RedisError, OSError) as exc:
            # Redis (presence, the broker) or the database away: the client hears it
            # and may try again; nothing here is a bug to log with a traceback.
            logger.warning("pusher %r on %s failed: %r", name, connection.connection_id, exc)
            self._failed(connection, name, frame, 503, "the server is unavailable; retry")
        except Exception:
            logger.exception("pusher frame %r failed on %s", name, connection.connection_id)
            self._failed(connection, name, frame, 500, "the server could not handle this")

    def _failed(
        self, connection: PusherConnection, name: Any, frame: Any, status: int, message: str
    ) -> None:
        """A request that failed on the server's side: a subscribe is answered with
        ``pusher:subscription_error`` for its channel (pusher-js would otherwise wait
        for the subscription forever), anything else with ``pusher:error``."""
        channel = _data_of(frame).get("channel") if isinstance(frame, dict) else None
        if name == pusher.SUBSCRIBE and isinstance(channel, str):
            connection.send_frame(pusher.subscription_error_frame(channel, status, message))
        else:
            connection.send_frame(pusher.error_frame(None, message))

    async def _handle(self, connection: PusherConnection, name: str, frame: dict[str, Any]) -> None:
        node = self._require_node()
        data = _data_of(frame)
        if name == pusher.PING:
            connection.send_frame(pusher.event_frame(pusher.PONG, {}))
        elif name == pusher.PONG:
            pass  # last_seen moved: that is all a pong is for
        elif name == pusher.SUBSCRIBE:
            # A subscribe may wait on PostgreSQL (the channel's recent messages when the
            # node joins it, a cache channel's last one) and Redis (presence): the frames
            # sent meanwhile are read and held for after it, as during our protocol's
            # resumes. Left unread, they made the client look silent (4201 though it
            # answered the server's pusher:ping) and, under uvicorn, which stops reading
            # the socket while a frame waits, left unread the WebSocket pongs its
            # keepalive asks for (1011 after 40 s, seen with PostgreSQL stalled so long).
            await self._reading_meanwhile(
                connection,
                pusher_subscribe(
                    node,
                    connection,
                    data.get("channel"),
                    auth=data.get("auth"),
                    channel_data=data.get("channel_data"),
                ),
            )
        elif name == pusher.UNSUBSCRIBE:
            await pusher_unsubscribe(node, connection, data.get("channel"))
        elif name == pusher.SIGNIN:
            pusher_signin(connection, data)
        elif name.startswith(pusher.CLIENT_EVENT_PREFIX):
            await pusher_client_event(
                node, connection, name, frame.get("channel"), frame.get("data")
            )
        else:
            raise PusherProblem(None, f"unsupported event {name[:100]!r}")

    def _over_rate(self, connection: PusherConnection) -> None:
        connection.rate_limited_frames += 1
        metrics.ERRORS.labels(ErrorCode.RATE_LIMITED.value).inc()
        if connection.rate_limited_frames > push_settings.RATE_LIMIT_CLOSE_AFTER:
            connection.close(CloseCode.POLICY)
            return
        connection.send_frame(pusher.error_frame(None, "too many messages; slow down"))


async def _subscribe_paced(connection: PusherConnection, event: dict[str, Any]) -> bool:
    """Whether a ``pusher:subscribe`` past the frame rate got a frame's turn by waiting
    for it (at most ``SUBSCRIBE_PACE_MAX_SECS``, while the client stays): pusher-js
    subscribes to all its channels at once when it connects and on every reconnect, and
    never retries one refused with ``pusher:error``, which would stay silent with
    nothing telling the app. The rate still holds: the subscribe waits for its token,
    and the frames behind it wait in the server's bounded queue meanwhile."""
    text = event.get("text")
    if not isinstance(text, str) or _SUBSCRIBE_MARK not in text:
        return False
    deadline = time.monotonic() + SUBSCRIBE_PACE_MAX_SECS
    while not connection.rate.take():
        if connection.gone or time.monotonic() >= deadline:
            return False
        await asyncio.sleep(SUBSCRIBE_PACE_POLL_SECS)
    return True


def _data_of(frame: dict[str, Any]) -> dict[str, Any]:
    """A request's ``data``: an object, or (some clients) the JSON text of one."""
    data = frame.get("data")
    if isinstance(data, str):
        try:
            data = PUSHER_CODEC.decode(data)
        except PushError:
            data = None
    return data if isinstance(data, dict) else {}


def _frame_kind(name: str) -> str:
    # A bounded label: client events are many names, one kind.
    if name.startswith(pusher.CLIENT_EVENT_PREFIX):
        return "pusher:client-event"
    if name in (pusher.PING, pusher.PONG, pusher.SUBSCRIBE, pusher.UNSUBSCRIBE, pusher.SIGNIN):
        return name
    return "pusher:other"
