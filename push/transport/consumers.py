"""The WebSocket consumer: handshake, decode, call a service, reply.

It reads inbound frames in a plain loop instead of Channels' dispatch machinery
(a task and an ``asyncio.wait`` per frame, and a hop to the database thread before
every handler): nothing here touches the database except through services, and the
consumer has no channel-layer channel of its own, because fan-out reaches it through
the node's hub.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from channels.consumer import AsyncConsumer

from accounts.permissions import (
    authorize_presence,
    authorize_publish,
    is_presence_channel,
)
from accounts.principals import ANONYMOUS, Principal
from common import metrics
from common.conf import push_settings
from common.errors import CloseCode, ErrorCode, PushError
from push.cluster.address_budgets import UNCHARGED_FRAME_BYTES, large_frame_allowed
from push.cluster.node import Node
from push.services.publishing import message_publish_submitted
from push.services.runtime import get_node
from push.services.subscriptions import (
    channel_subscribe,
    channel_unsubscribe,
    client_ip,
    presence_list,
    session_closed,
    session_open,
    subscription_delta,
)
from push.transport.connection import ClientConnection
from push.transport.frame_reader import read_frames_directly
from push.transport.server_adapters import bound_unseen_frames
from push.wire import protocol
from push.wire.codecs import UnknownSubprotocol, negotiate
from push.wire.protocol import Heartbeat, Presence, Publish, RequestId, Subscribe, Unsubscribe

if TYPE_CHECKING:
    from push.storage.write_batch import Outcome

logger = logging.getLogger(__name__)

# Publishes of one connection queued at once; a client that sends more waits for
# answers (its frames are not read meanwhile).
PUBLISHES_IN_FLIGHT = 16
# Labelled once: a publish is the hot path (labels() is a lookup under a lock).
_PUBLISHED = metrics.MESSAGES_PUBLISHED.labels("websocket")
_PUBLISH_SECONDS = metrics.REQUEST_SECONDS.labels("publish")


# A refused frame is decoded for its id only up to this size. A refusal must cost less
# than the request it refuses, and decoding is most of a frame's cost: measured, a
# MessagePack frame of 1 MiB of one-byte empty maps took ~90 ms to decode and free, and
# the server passes frames up to four times PUSH_MAX_FRAME_BYTES (~300 MB of objects
# for one of those). 8 KiB of the same decodes in under 1 ms; real requests that get
# refused (heartbeats, subscribes, small publishes) are far smaller.
REFUSED_FRAME_ID_MAX_CHARS = 8192

# While a resume runs (paced by its client's reading and its address's history budget,
# it may take minutes), the client's next frames are read and held for after it, up to
# this many and about this much (characters of a text frame, bytes of a binary one; the
# frame that passes it is held too), then reading stops as before: what a client may
# send meanwhile is a heartbeat every 25 s. Left unread, a frame the client sent made it
# look silent (closed 4001 though it sent its heartbeats) and, under uvicorn, which
# stops reading the socket until the application takes the frame, left its pongs unread
# too (closed 1011, keepalive ping timeout, within a minute). The Pusher endpoint holds
# the frames sent during any of its subscribes the same way (``push.transport.pusher``).
HELD_MAX_FRAMES = 32
HELD_MAX_CHARS = 65_536


def _request_id_of(connection: ClientConnection, event: dict[str, Any]) -> RequestId | None:
    """The request's id, so a refused request is still answered under its id (when the
    frame is small enough to look for it cheaply)."""
    try:
        payload = connection.codec.frame_payload(event)
        # Characters of a text frame or bytes of a binary one: what decoding costs.
        if len(payload) > REFUSED_FRAME_ID_MAX_CHARS:
            return None
        envelope = connection.codec.decode_request(payload)
    except PushError:
        return None
    return protocol.read_request_id(envelope) if isinstance(envelope, Mapping) else None


def _reply_failure(
    connection: ClientConnection, exc: Exception, request_id: RequestId | None
) -> None:
    """The one place a failed request becomes its error reply."""
    if not isinstance(exc, PushError):
        logger.error("request failed on %s", connection.connection_id, exc_info=exc)
        exc = PushError(ErrorCode.UNAVAILABLE, "the server could not handle this request")
    connection.send_error(exc, request_id)
    if exc.close_code is not None:
        connection.close(exc.close_code)


def frame_size(payload: str | bytes) -> int:
    """The payload's size in bytes: exact for bytes, ASCII text, and text from a quarter
    of ``PUSH_MAX_FRAME_BYTES`` up to it; past the limit, a size past it too; under a
    quarter of it, a text frame's characters (at most 4x fewer than its bytes, and
    under the limit either way)."""
    length = len(payload)
    # A str of n characters is n to 4n UTF-8 bytes, n when ASCII (known without a look
    # at them): encoded only when that leaves it open which side of the limit it is.
    limit = push_settings.MAX_FRAME_BYTES
    if isinstance(payload, str) and length <= limit < length * 4 and not payload.isascii():
        return len(payload.encode("utf-8", "surrogatepass"))
    return length


def _too_large() -> PushError:
    return PushError(
        ErrorCode.MESSAGE_TOO_LARGE,
        f"frame is larger than {push_settings.MAX_FRAME_BYTES} bytes",
    )


class PushConsumer(AsyncConsumer):
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        self.connection: ClientConnection | None = None
        self.node: Node | None = None
        # Publishes queued and not yet answered (made on the first publish).
        self.publishing: set[asyncio.Future[Outcome]] | None = None
        self.receive = receive
        # Events read while a request ran (``_reading_meanwhile``), and a read under way.
        self.held: collections.deque[dict[str, Any]] | None = None
        self.held_chars = 0
        self.reading: asyncio.Future[dict[str, Any]] | None = None
        close_code: int | None = None
        try:
            while True:
                if self.held:  # read while a request ran: in the order they came
                    event = self._unhold(self.held)
                elif self.reading is not None:  # a read that request left under way
                    reading, self.reading = self.reading, None
                    event = await reading
                else:
                    event = await receive()
                kind = event["type"]
                if kind == "websocket.receive":
                    if self.connection is not None and self.connection.is_open:
                        await self.on_frame(self.connection, event)
                elif kind == "websocket.connect":
                    if not await self.on_connect(send):
                        return
                elif kind == "websocket.disconnect":
                    close_code = event.get("code")
                    return
        finally:
            if self.reading is not None:
                self.reading.cancel()
            self.on_closed(close_code)

    # ----- connection lifecycle --------------------------------------------------------

    async def on_connect(self, send: Any) -> bool:
        try:
            codec, subprotocol = negotiate(self.scope.get("subprotocols") or [])
        except UnknownSubprotocol:
            await send({"type": "websocket.close", "code": int(CloseCode.POLICY)})
            return False
        try:
            self.node = await get_node()
        except Exception:
            logger.exception("node could not start")
            # Accepted first: a close before the accept reaches the client as HTTP 403,
            # which clients take for a refused token and do not retry.
            await send({"type": "websocket.accept", "subprotocol": subprotocol})
            await send({"type": "websocket.close", "code": int(CloseCode.TRY_AGAIN_LATER)})
            return False
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        read_frames_directly(send)
        bound_unseen_frames(send)
        principal: Principal = self.scope.get("principal") or ANONYMOUS
        node = self.node
        connection = ClientConnection(
            send=send,
            codec=codec,
            principal=principal,
            ip=client_ip(self.scope),
            on_closing=node.on_connection_closing,
        )
        refusal = session_open(node, connection)
        if refusal is not None:
            # Accepted first so the client learns why (1013 is "try again later").
            connection.close(refusal)
            return True
        self.connection = connection
        return True

    def on_closed(self, close_code: int | None) -> None:
        # Nobody is left to answer; publishes already queued are still written.
        for written in list(self.publishing or ()):
            written.cancel()
        if self.connection is not None and self.node is not None:
            session_closed(self.node, self.connection, close_code)

    # ----- inbound frames ----------------------------------------------------------------

    async def on_frame(self, connection: ClientConnection, event: dict[str, Any]) -> None:
        request_id: RequestId | None = None
        connection.last_seen = time.monotonic()
        size = frame_size(_payload_of(event))
        if size > push_settings.MAX_FRAME_BYTES:
            # Before any other check: a frame over the limit closes the connection 1009,
            # over the frame rate or not, of this format's frame type or not. It is not
            # decoded, not even for its id (it may be four times the limit).
            _reply_failure(connection, _too_large(), None)
            return
        if not connection.rate.take():
            self._rate_limited(connection, event)
            return
        try:
            payload = connection.codec.frame_payload(event)
            if size > UNCHARGED_FRAME_BYTES and not large_frame_allowed(
                connection.address_budget, size
            ):
                self._rate_limited(connection, event)  # (not decoded: it is too large)
                return
            envelope = connection.codec.decode_request(payload)
            # (A dict first: an isinstance against the ABC costs more than the test.)
            if type(envelope) is dict or isinstance(envelope, Mapping):
                request_id = protocol.read_request_id(envelope)
            request = protocol.parse_request(envelope)
            kind = _REQUEST_TYPES[type(request)]
            _FRAMES_RECEIVED[kind].inc()
            if type(request) is Publish:  # answered from a callback (see there)
                if not self._queue_publish(connection, request):
                    await self.start_publish(connection, request)
                return
            started = time.perf_counter()
            await self._handlers[type(request)](self, connection, request)
            metrics.REQUEST_SECONDS.labels(kind).observe(time.perf_counter() - started)
        except Exception as exc:
            _reply_failure(connection, exc, request_id)

    def _rate_limited(self, connection: ClientConnection, event: dict[str, Any]) -> None:
        connection.rate_limited_frames += 1
        if connection.rate_limited_frames > push_settings.RATE_LIMIT_CLOSE_AFTER:
            connection.close(CloseCode.POLICY)
            return
        connection.send_error(
            PushError(ErrorCode.RATE_LIMITED, "too many messages; slow down"),
            _request_id_of(connection, event),
        )

    async def handle_subscribe(self, connection: ClientConnection, request: Subscribe) -> None:
        node = self._require_node()
        delta = subscription_delta(node, connection, request.channel, request.delta)
        answered = False

        def reply(seq: int, recovered: bool | None) -> None:
            nonlocal answered
            answered = True
            connection.send_envelope(
                protocol.subscribed(
                    channel=request.channel,
                    seq=seq,
                    recovered=recovered,
                    request_id=request.id,
                    delta=delta,
                )
            )

        subscribing = channel_subscribe(
            node,
            connection,
            request.channel,
            since=request.since,
            token=request.token,
            reply=reply,
            rewind=request.rewind,
            occupancy=request.occupancy,
            delta=delta,
        )
        try:
            if request.since is None and request.rewind is None:
                await subscribing  # no replay: done within the waits its limits bound
            else:
                await self._reading_meanwhile(connection, subscribing)
        except Exception:
            subscription = connection.subscriptions.get(request.channel)
            if not (answered and subscription is not None and subscription.active):
                raise
            # ``subscribed`` went out and the subscription stands: what failed after it
            # (Redis under the presence join, or its announcement) is logged, not made a
            # second answer to a request the client has settled. The node's presence
            # repair puts the member back once Redis answers again.
            logger.warning(
                "subscribe of %s to %s failed after it was answered",
                connection.connection_id,
                request.channel,
                exc_info=True,
            )

    # ----- frames read while a request runs -----------------------------------------------

    async def _reading_meanwhile(
        self, connection: ClientConnection, request: Coroutine[Any, Any, None]
    ) -> None:
        """Carry out ``request`` while the client's next frames are read and held, in
        order, for after it (``HELD_MAX_FRAMES``); each one read counts as the client
        heard from. The request ends as it would awaited (its error is raised here), or
        is cancelled, and its cancellation done, before this returns: when the client
        left (the disconnect is read), and when the consumer is (the server gave up)."""
        handling = asyncio.ensure_future(request)
        try:
            while not handling.done() and self._may_hold_more():
                reading = self.reading
                if reading is None:
                    reading = self.reading = asyncio.ensure_future(self.receive())
                await asyncio.wait((handling, reading), return_when=asyncio.FIRST_COMPLETED)
                if reading.done():
                    self.reading = None
                    self._hold(connection, reading.result())
            if not self._holds_disconnect():
                await handling
        finally:
            if not handling.done():
                handling.cancel()
                await asyncio.wait((handling,))
            if not handling.cancelled():
                handling.exception()  # retrieved: raised above, or its client left

    def _holds_disconnect(self) -> bool:
        held = self.held
        return held is not None and bool(held) and held[-1]["type"] == "websocket.disconnect"

    def _may_hold_more(self) -> bool:
        held = self.held
        if not held:
            return True
        # (Nothing comes after a disconnect.)
        return (
            len(held) < HELD_MAX_FRAMES
            and self.held_chars < HELD_MAX_CHARS
            and not self._holds_disconnect()
        )

    def _hold(self, connection: ClientConnection, event: dict[str, Any]) -> None:
        if self.held is None:
            self.held = collections.deque()
        self.held.append(event)
        if event["type"] == "websocket.receive":
            connection.last_seen = time.monotonic()
            self.held_chars += _payload_length(event)

    def _unhold(self, held: collections.deque[dict[str, Any]]) -> dict[str, Any]:
        event = held.popleft()
        if event["type"] == "websocket.receive":
            self.held_chars -= _payload_length(event)
        return event

    async def handle_presence(self, connection: ClientConnection, request: Presence) -> None:
        # A member of the channel sees who else is there; others need the presence right.
        subscribed = request.channel in connection.subscriptions
        if not (subscribed and is_presence_channel(request.channel)):
            authorize_presence(connection.principal, request.channel)
        members = await presence_list(self._require_node(), request.channel)
        connection.send_envelope(
            protocol.presence(channel=request.channel, members=members, request_id=request.id)
        )

    async def handle_unsubscribe(self, connection: ClientConnection, request: Unsubscribe) -> None:
        if not await channel_unsubscribe(self._require_node(), connection, request.channel):
            raise PushError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {request.channel!r}")
        connection.send_envelope(
            protocol.unsubscribed(channel=request.channel, request_id=request.id)
        )

    async def start_publish(self, connection: ClientConnection, request: Publish) -> None:
        """Queue a publish and go on reading frames; a callback answers once it committed.

        A publisher may so have several publishes in flight, which the node's write
        pipeline commits together (one round trip per request would cap a connection
        at one publish per commit). Each is queued here, in frame order, so one
        connection's publishes to a channel get seqs in the order it sent them. Past
        ``PUBLISHES_IN_FLIGHT`` the connection stops reading until one is answered:
        what one client holds stays bounded. (A recent-only channel's publishes are
        queued the same way, by the node's Redis store, ``push.storage.recent_store``.)

        No task per publish: the answer is a callback on the write's own future, and
        the answers of one write batch go out in one write to the socket
        (``ClientConnection.send_published_soon``).
        """
        authorize_publish(connection.principal, request.channel)
        publishing = self.publishing
        if publishing is None:
            publishing = self.publishing = set()
        while len(publishing) >= PUBLISHES_IN_FLIGHT:
            await asyncio.wait(publishing, return_when=asyncio.FIRST_COMPLETED)
        self._submit_publish(connection, request, publishing)

    def _queue_publish(self, connection: ClientConnection, request: Publish) -> bool:
        """``start_publish`` without a coroutine, when the connection has room for one
        more publish in flight (as it mostly has); False, having done nothing, when it
        has not, and ``start_publish`` must wait for an answer first."""
        publishing = self.publishing
        if publishing is not None and len(publishing) >= PUBLISHES_IN_FLIGHT:
            return False
        authorize_publish(connection.principal, request.channel)
        if publishing is None:
            publishing = self.publishing = set()
        self._submit_publish(connection, request, publishing)
        return True

    def _submit_publish(
        self,
        connection: ClientConnection,
        request: Publish,
        publishing: set[asyncio.Future[Outcome]],
    ) -> None:
        started = time.perf_counter()
        written = message_publish_submitted(
            channel=request.channel,
            data=request.data,
            publisher_id=connection.principal.user_id,
            checked=True,  # parse_request validated the channel's name and the data
        )
        publishing.add(written)
        written.add_done_callback(
            functools.partial(self._answer_publish, connection, request.id, started)
        )

    def _answer_publish(
        self,
        connection: ClientConnection,
        request_id: RequestId | None,
        started: float,
        written: asyncio.Future[Outcome],
    ) -> None:
        if self.publishing is not None:
            self.publishing.discard(written)
        if written.cancelled():  # the client left: nobody to answer
            return
        failure = written.exception()
        if isinstance(failure, Exception):  # a bug in a task's write: answered, logged
            _reply_failure(connection, failure, request_id)
            return
        outcome = written.result()
        if isinstance(outcome, PushError):
            _reply_failure(connection, outcome, request_id)
            return
        message = outcome.messages[0]
        _PUBLISHED.inc()
        _PUBLISH_SECONDS.observe(time.perf_counter() - started)
        connection.send_published_soon(message, request_id)

    async def handle_heartbeat(self, connection: ClientConnection, request: Heartbeat) -> None:
        connection.send_envelope(
            protocol.heartbeat_ack(timestamp=time.time(), request_id=request.id)
        )

    def _require_node(self) -> Node:
        if self.node is None:  # set in on_connect, before any frame is read
            raise RuntimeError("frame handled before the connection was accepted")
        return self.node

    _handlers: dict[type, Callable[[Any, ClientConnection, Any], Awaitable[None]]] = {
        Subscribe: handle_subscribe,
        Unsubscribe: handle_unsubscribe,
        Heartbeat: handle_heartbeat,
        Presence: handle_presence,
    }


def _payload_of(event: dict[str, Any]) -> str | bytes:
    """A ``websocket.receive`` event's payload, text or binary, whatever this
    connection's format takes."""
    payload = event.get("text")
    if payload is None:
        payload = event.get("bytes") or b""
    return payload


def _payload_length(event: dict[str, Any]) -> int:
    return len(_payload_of(event))


_REQUEST_TYPES = {
    Subscribe: "subscribe",
    Unsubscribe: "unsubscribe",
    Publish: "publish",
    Heartbeat: "heartbeat",
    Presence: "presence",
}
# Labelled once, as ``_PUBLISHED``: every frame counts in one of these.
_FRAMES_RECEIVED = {kind: metrics.FRAMES_RECEIVED.labels(kind) for kind in _REQUEST_TYPES.values()}
