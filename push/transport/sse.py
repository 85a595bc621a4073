"""Server-Sent Events: the receive-only fallback for clients that cannot hold a WebSocket.

``GET /sse/?channel=news&channel=chat`` opens one stream for several channels, with the
WebSocket's authentication (``?token=``, ``Authorization: Token``, or the session
cookie) and permissions. The stream is a ``ClientConnection`` like any WebSocket: the
same hub fans out to it, the same bounded outbox and slow-consumer policy apply, the
same registry, limits, drain and metrics see it. Only the framing differs
(``push.wire.codecs.sse_codec``) and the cursor: every ``message`` event carries ``id:`` =
the last seq delivered on every channel of the stream (``news:43,chat:7``), which the
browser sends back as ``Last-Event-ID`` when it reconnects, and which resumes each
channel exactly as ``subscribe`` with ``since`` does.

A channel the client may read only through a signed subscription token takes it in
``?subscription_token=<channel>:<token>`` (one per channel; or the same entries in the
``X-Subscription-Token`` header), verified as the WebSocket's ``subscribe`` verifies its
``token``. At the token's ``exp`` the node's revocation check ends that channel with the
WebSocket's ``error``; a stream cannot be given a fresh token, so the client opens a new
one with a fresh token and its cursor.

Every problem after the response started is an ``error`` event naming its channel;
a fatal one (no channel could be subscribed) ends the stream. A request that cannot
become a stream is refused before it starts, as a WebSocket handshake would be, with
the error envelope as JSON: 403 (token or origin, or more channels than a connection
may subscribe), 400 (channel, cursor, or a subscription token for a channel the stream
does not name), 405 (not GET), 429 (the address failed authentication too often, or is
over its handshake budget), 503 (the database cannot check the token, or the node is not ready).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from accounts.middleware import resolve_principal
from accounts.permissions import SUBSCRIPTION_TOKEN_HEADER as REST_SUBSCRIPTION_TOKEN_HEADER
from accounts.principals import Principal
from common import metrics
from common.conf import push_settings
from common.errors import CloseCode, ErrorCode, PushError
from push.cluster.node import Node
from push.fanout.outbox import Outbox, OutFrame
from push.services.admission import handshake_allowed, shed_anonymous
from push.services.runtime import get_node
from push.services.subscriptions import (
    channel_subscribe,
    channel_unsubscribe,
    client_ip,
    session_closed,
    session_open,
    subscription_authorize,
)
from push.storage.history_modes import is_recent
from push.transport.connection import CLOSE_FLUSH_SECS, ClientConnection
from push.transport.origin import BrowserOriginValidator
from push.transport.server_adapters import drop_if_still_open
from push.wire import protocol
from push.wire.codecs import DEFAULT_CODEC
from push.wire.codecs.sse_codec import SSE_CODEC
from push.wire.protocol import MAX_CHANNEL_NAME_CHARS, validate_channel_name

logger = logging.getLogger(__name__)

SSE_PATHS = frozenset({"/sse/", "/sse"})
RESPONSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    # nginx: pass each event on at once instead of buffering the response.
    (b"x-accel-buffering", b"no"),
]
PING_FRAME = OutFrame(SSE_CODEC.send_event(b": ping\n\n"), 8)
END_OF_STREAM = {"type": "http.response.body", "body": b"", "more_body": False}


# ----- the cursor ----------------------------------------------------------------------


def cursor_format(cursor: dict[str, int]) -> str:
    return ",".join(f"{channel}:{seq}" for channel, seq in cursor.items())


# A seq is a PostgreSQL bigint: at most 2**63 - 1, 19 digits. Longer digit strings
# are refused before int() reads them (past 4300 digits int() itself raises).
MAX_SEQ_DIGITS = 19
MAX_SEQ = 2**63 - 1
# One cursor entry at most: a channel name, ':', a seq and ','.
MAX_CURSOR_ENTRY_CHARS = MAX_CHANNEL_NAME_CHARS + MAX_SEQ_DIGITS + 2


def cursor_parse(text: str, *, max_entries: int | None = None) -> dict[str, int]:
    """``news:43,chat:7`` -> {"news": 43, "chat": 7}. Channel names may hold ``:``
    (``user:42``), so the seq is what follows the last one; they never hold ``,``.

    With ``max_entries`` (the channels a stream may hold), a longer text is refused
    before it is split: what a cursor makes the node read is bounded by that."""
    if max_entries is not None and len(text) > max_entries * MAX_CURSOR_ENTRY_CHARS:
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"the cursor names more than {max_entries} channels",
            field="since",
        )
    cursor: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        channel, _, seq = part.rpartition(":")
        if (
            not seq.isascii()
            or not seq.isdigit()
            or len(seq) > MAX_SEQ_DIGITS
            or int(seq) > MAX_SEQ
        ):
            raise PushError(
                ErrorCode.INVALID_MESSAGE,
                f"cursor entry {part[:120]!r} is not <channel>:<seq> (seq: at most"
                f" {MAX_SEQ_DIGITS} digits)",
                field="since",
            )
        cursor[validate_channel_name(channel, field="since")] = int(seq)
    return cursor


# ----- the request ---------------------------------------------------------------------


@dataclass(frozen=True)
class StreamRequest:
    channels: list[str]
    since: dict[str, int]
    # ``?rewind=N``: each channel without a cursor entry starts N messages back.
    rewind: int | None = None
    # Signed subscription tokens by channel (``?subscription_token=<channel>:<token>``).
    tokens: dict[str, str] = field(default_factory=dict)


def _rewind_param(params: dict[str, list[str]]) -> int | None:
    values = params.get("rewind")
    if not values:
        return None
    text = values[-1]
    # ASCII digits, and few: isdigit() alone takes "²", which int() refuses, and
    # thousands of digits, past what int() reads (a ValueError, answered 500).
    if (
        not text.isascii()
        or not text.isdigit()
        or len(text) > len(str(protocol.MAX_REWIND))
        or not 1 <= int(text) <= protocol.MAX_REWIND
    ):
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"'rewind' must be an integer from 1 to {protocol.MAX_REWIND}",
            field="rewind",
        )
    return int(text)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


# Where a stream carries signed subscription tokens: a query parameter, since a
# browser's EventSource sets no header, repeated once per channel, each
# ``<channel>:<token>``. A token is base64url and ``.`` only, so its channel is what
# comes before the last ``:`` (channel names may hold ``:``, as ``user:42``). Other
# clients may send the same entries in the header, comma-separated (a channel name
# never holds a comma), and so keep them out of access logs.
SUBSCRIPTION_TOKEN_PARAM = "subscription_token"  # noqa: S105 (a parameter name)
# The header of REST reads (accounts.permissions), as ASGI names it.
SUBSCRIPTION_TOKEN_HEADER = REST_SUBSCRIPTION_TOKEN_HEADER.lower().encode()


def _token_entry_error(message: str) -> PushError:
    return PushError(ErrorCode.INVALID_MESSAGE, message, field=SUBSCRIPTION_TOKEN_PARAM)


def stream_tokens(
    params: dict[str, list[str]], scope: dict[str, Any], channels: list[str]
) -> dict[str, str]:
    """The stream's signed subscription tokens by channel. At most one per channel the
    stream names (so tokens count against the same limit as channels); a token for a
    channel the stream does not name, or a second one for a channel, is refused, as the
    mistake it is, before the stream starts. Each token is verified later, when its
    channel is subscribed, exactly as a WebSocket subscribe verifies it."""
    entries = list(params.get(SUBSCRIPTION_TOKEN_PARAM, []))
    header = _header(scope, SUBSCRIPTION_TOKEN_HEADER)
    if header is not None:
        entries += [entry.strip() for entry in header.split(",") if entry.strip()]
    if len(entries) > len(channels):
        raise _token_entry_error(
            f"{len(entries)} subscription tokens for a stream of {len(channels)} channels:"
            " at most one per channel"
        )
    named = set(channels)
    tokens: dict[str, str] = {}
    for entry in entries:
        channel, _, token = entry.rpartition(":")
        if not channel or not token:
            raise _token_entry_error(
                f"'{SUBSCRIPTION_TOKEN_PARAM}' must be <channel>:<token>, one per channel"
            )
        if channel not in named:
            raise _token_entry_error(
                f"a subscription token for {channel[:MAX_CHANNEL_NAME_CHARS]!r}, which the"
                " stream does not name in 'channel'"
            )
        if channel in tokens:
            raise _token_entry_error(f"two subscription tokens for {channel!r}")
        tokens[channel] = token
    return tokens


def stream_request(scope: dict[str, Any]) -> StreamRequest:
    """The channels and resume cursor of a stream request. ``Last-Event-ID`` wins over
    ``?since=``: a browser reconnects to the same URL and sends the newer cursor.
    ``?rewind=`` applies only to channels the cursor does not name, so a reconnect
    resumes where it was instead of rewinding again, and a stream can resume some
    channels and rewind the ones it adds."""
    params = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    channels = list(dict.fromkeys(params.get("channel", [])))
    if not channels:
        raise PushError(
            ErrorCode.INVALID_MESSAGE, "name at least one channel: ?channel=", field="channel"
        )
    max_entries = push_settings.MAX_SUBSCRIPTIONS_PER_CONNECTION
    if len(channels) > max_entries:
        # Past the subscription limit every channel was still read (its latest seq),
        # refused one by one, and kept in the cursor: each message event's id line
        # carried them all, written again for every event of the stream.
        raise PushError(
            ErrorCode.FORBIDDEN,
            f"subscription limit of {max_entries} reached: a stream names at most"
            f" {max_entries} channels",
            field="channel",
        )
    for channel in channels:
        validate_channel_name(channel)
    since_text = _header(scope, b"last-event-id")
    if since_text is None:
        since_values = params.get("since")
        since_text = since_values[-1] if since_values else ""
    rewind = _rewind_param(params)
    return StreamRequest(
        channels=channels,
        since=cursor_parse(since_text, max_entries=max_entries),
        rewind=rewind,
        tokens=stream_tokens(params, scope, channels),
    )


# ----- the stream ----------------------------------------------------------------------


class SseOutbox(Outbox):
    """An outbox that writes each message event's ``id:`` line from this stream's
    cursor after the shared bytes of the event."""

    __slots__ = ("cursor",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor: dict[str, int] = {}

    def push(self, frame: OutFrame) -> bool:
        return super().push(self._with_cursor(frame))

    def push_many(self, frames: list[OutFrame]) -> bool:
        return super().push_many([self._with_cursor(frame) for frame in frames])

    def _with_cursor(self, frame: OutFrame) -> OutFrame:
        channel = frame.channel
        if channel is None:
            return frame
        cursor = self.cursor
        cursor[channel] = frame.seq  # type: ignore[assignment]  # a channel frame has a seq
        id_line = f"id: {cursor_format(cursor)}\n\n".encode()
        return _CursorFrame(frame.event["body"], id_line, frame.droppable)


class _CursorFrame(OutFrame):
    """A message event of one stream: the event's bytes, shared by every stream that
    carries it, and this stream's ``id:`` line, joined only when written. Joined when
    queued, every stream that stopped reading held its own copy of each event in its
    queue (up to the send queue's 8 MiB each: a thousand stalled streams on a busy
    channel, 8 GB), where WebSocket connections share one."""

    __slots__ = ("_body", "_id_line")

    def __init__(self, body: bytes, id_line: bytes, droppable: bool) -> None:
        # Not OutFrame's: its event (and wire) are made when written, never kept.
        self._body = body
        self._id_line = id_line
        self.size = len(body) + len(id_line)
        self.droppable = droppable
        self.channel = None  # its cursor is written: no other outbox adds one
        self.seq = None

    @property
    def event(self) -> dict[str, Any]:  # type: ignore[override]  # read-only: made when written
        return SSE_CODEC.send_event(self._body + self._id_line)

    @property
    def wire(self) -> bytes:
        return b"%x\r\n%b%b\r\n" % (self.size, self._body, self._id_line)


class SseConnection(ClientConnection):
    outbox_class = SseOutbox
    ends_without_subscriptions = True
    __slots__ = ("finished",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(codec=SSE_CODEC, **kwargs)
        # Resolved once the response has ended, by the server (close) or the client.
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def cursor(self) -> dict[str, int]:
        return self.outbox.cursor  # type: ignore[attr-defined]  # outbox_class is SseOutbox

    async def _send_close(self, code: int) -> None:
        try:
            # Bounded: a reader that stopped reading would hold the end of the stream
            # (and this connection) forever.
            await asyncio.wait_for(self._send(END_OF_STREAM), CLOSE_FLUSH_SECS)
        except Exception as exc:  # the client is gone already, or stalled
            logger.debug("end of stream %s failed: %s", self.connection_id, exc)
            # Not after a clean end: the connection may then serve the next request.
            drop_if_still_open(self._send, after_secs=0)
        finally:
            self.end()

    def end(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


class SseEntry:
    def __init__(self, allowed_origins: list[str]) -> None:
        self.origins = BrowserOriginValidator(None, allowed_origins)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("method") != "GET":
            return await _refuse(send, 405, PushError(ErrorCode.INVALID_MESSAGE, "use GET"))
        try:
            request = stream_request(scope)
            principal = await self._authenticate(scope)
        except PushError as exc:
            return await _refuse(send, exc.http_status, exc)
        if not await handshake_allowed(scope, principal):
            return await _refuse(send, 429, OVER_HANDSHAKE_BUDGET)
        if shed_anonymous(principal, "sse"):
            return await _refuse(send, 503, OVERLOADED)
        try:
            node = await get_node()
        except Exception:
            logger.exception("node could not start")
            return await _refuse(send, 503, PushError(ErrorCode.UNAVAILABLE, "not ready"))
        connection = SseConnection(
            send=send,
            principal=principal,
            ip=client_ip(scope),
            on_closing=node.on_connection_closing,
        )
        await send({"type": "http.response.start", "status": 200, "headers": RESPONSE_HEADERS})
        refusal = session_open(node, connection)
        if refusal is not None:
            connection.send_error(_REFUSALS[refusal], None)
            connection.close(refusal)
            return await _until_finished(connection, receive)
        try:
            _streams_ping(connection)
            await _subscribe_all(node, connection, request)
            if not connection.subscriptions and connection.is_open:
                # Nothing to stream: the errors above were fatal, so the stream ends.
                connection.close(CloseCode.POLICY)
            await _until_finished(connection, receive)
        finally:
            _streams.discard(connection)
            session_closed(node, connection, None)
            connection.end()

    async def _authenticate(self, scope: dict[str, Any]) -> Principal:
        """The WebSocket handshake's checks, refused the same way (403)."""
        if not self.origins.allows(scope):
            raise PushError(ErrorCode.FORBIDDEN, "this origin may not open streams")
        principal = await resolve_principal(scope)
        if principal is None:
            raise PushError(ErrorCode.FORBIDDEN, "the token is not valid (or was revoked)")
        return principal


OVER_HANDSHAKE_BUDGET = PushError(
    ErrorCode.RATE_LIMITED, "too many connections from this address; try again later"
)
OVERLOADED = PushError(ErrorCode.UNAVAILABLE, "the node is overloaded; try again later")
_REFUSALS = {
    CloseCode.GOING_AWAY: PushError(ErrorCode.UNAVAILABLE, "this node is restarting; reconnect"),
    CloseCode.TRY_AGAIN_LATER: PushError(
        ErrorCode.RATE_LIMITED, "too many connections; try again later"
    ),
}


async def _subscribe_all(node: Node, connection: SseConnection, request: StreamRequest) -> None:
    """Subscribe every channel of the stream from a known seq, so the cursor names every
    channel from the first event on: a channel the client gave no seq for starts at
    its latest seq, read up front, instead of wherever its turn to subscribe comes.

    A recent channel whose latest seq the read did not give (Redis failed for it while
    it answered for the durable ones, or the channel's lease is missing) has no known
    seq: taken as 0 it would replay the whole window, messages from before the stream.
    It starts where the node is when its turn comes, and joins the cursor then."""
    allowed = [c for c in request.channels if _permitted(connection, c, request.tokens.get(c))]
    fresh = [channel for channel in allowed if channel not in request.since]
    try:
        latest = await node.hub.history.latest_seqs(fresh) if fresh else {}
    except Exception as exc:
        logger.warning("stream start failed: %s", exc)
        connection.send_error(PushError(ErrorCode.UNAVAILABLE, "history is unavailable"), None)
        return
    cursor = connection.cursor
    back = request.rewind or 0
    for channel in allowed:
        if channel in request.since:
            cursor[channel] = request.since[channel]
        elif channel in latest or not is_recent(channel):
            # A durable channel is left out of ``latest`` when it has no message yet.
            cursor[channel] = max(0, latest.get(channel, 0) - back)
    for channel in allowed:
        since = cursor.get(channel)
        try:
            await channel_subscribe(
                node,
                connection,
                channel,
                since=since,
                rewind=(back or None) if since is None else None,
                token=request.tokens.get(channel),
                reply=_reply_for(connection, request, channel, since, back),
            )
        except PushError as exc:
            # The cursor keeps naming the channel where the client was: a browser that
            # reconnects (with the ``Last-Event-ID`` of a later event) resumes it from
            # there. Dropped, the channel would start at its latest seq then, and what
            # was published meanwhile be skipped without a trace.
            connection.send_error(exc, None, channel=channel)
            await _end_failed_subscription(node, connection, channel)
        except Exception:
            # A dependency failed in a way no PushError names (Redis under a presence
            # join): this channel is told, and the stream goes on with its other
            # channels instead of breaking off.
            logger.exception("subscribing a stream to %s failed", channel)
            connection.send_error(_SUBSCRIBE_FAILED, None, channel=channel)
            await _end_failed_subscription(node, connection, channel)


_SUBSCRIBE_FAILED = PushError(ErrorCode.UNAVAILABLE, "the server could not subscribe this channel")


async def _end_failed_subscription(node: Node, connection: SseConnection, channel: str) -> None:
    """A channel whose subscribe failed after its subscription was made (Redis failed
    the presence join) ends with the error just sent: a WebSocket's ``subscribed`` went
    out first and the subscription stands, but a stream has no such answer, and its
    error must mean the channel is not streamed. Its presence leaves with it, so the
    node's repair does not put back a member for a stream told it failed. (Ended right
    after the error, with no await between: no message of the channel follows it.)"""
    if channel in connection.subscriptions:
        await channel_unsubscribe(node, connection, channel)


def _permitted(connection: SseConnection, channel: str, token: str | None) -> bool:
    """Checked before the stream reads where its channels are, so a refused channel
    costs no read; ``channel_subscribe`` asks the same again (a token costs one HMAC)."""
    try:
        subscription_authorize(connection.principal, channel, token=token)
    except PushError as exc:
        connection.send_error(exc, None, channel=channel)
        return False
    return True


def _reply_for(
    connection: SseConnection, request: StreamRequest, channel: str, since: int | None, back: int
) -> Callable[[int, bool | None], None]:
    if channel in request.since:
        return _resume_reply(connection, channel)
    if since is not None:
        return _no_reply
    return _cursor_from_reply(connection.cursor, channel, back)


def _no_reply(seq: int, recovered: bool | None) -> None:
    """A channel the stream started at its latest seq (or ``rewind`` before it): the
    cursor already says where it is."""


def _resume_reply(connection: SseConnection, channel: str) -> Callable[[int, bool | None], None]:
    """A channel started from a seq: the cursor already says where it is, so no
    ``subscribed`` event, unless the resume is not whole (history trimmed past the
    cursor, or a cursor past the channel's latest seq). A WebSocket client learns that
    from ``recovered: false``; a stream gets the same ``subscribed`` envelope as an
    event, before any message of the channel, or the gap would reach it unannounced."""

    def reply(seq: int, recovered: bool | None) -> None:
        if recovered is False:
            connection.send_envelope(
                protocol.subscribed(channel=channel, seq=seq, recovered=False, request_id=None)
            )

    return reply


def _cursor_from_reply(
    cursor: dict[str, int], channel: str, back: int
) -> Callable[[int, bool | None], None]:
    """For a channel subscribed without a seq: its cursor starts at the seq the hub
    starts it from (the latest it has, ``back`` before it for a rewind), before any of
    its messages reaches the stream."""

    def reply(seq: int, recovered: bool | None) -> None:
        cursor[channel] = max(0, seq - back)

    return reply


async def _until_finished(connection: SseConnection, receive: Any) -> None:
    """Wait until the server ended the stream or the client went away."""
    client_gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({client_gone, connection.finished}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        client_gone.cancel()


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _refuse(send: Any, status: int, exc: PushError) -> None:
    """Refuse before the stream starts, with the error envelope as JSON."""
    metrics.ERRORS.labels(exc.code.value).inc()
    body = DEFAULT_CODEC.encode(protocol.error(code=exc.code, message=exc.message)).encode()
    headers = [(b"content-type", b"application/json")]
    if status == 405:
        headers.append((b"allow", b"GET"))
    if status in (429, 503):
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ----- the heartbeat -------------------------------------------------------------------

# Open streams of this process, pinged every heartbeat interval by one task.
_streams: set[SseConnection] = set()
_pinger: asyncio.Task[None] | None = None


def _streams_ping(connection: SseConnection) -> None:
    global _pinger
    _streams.add(connection)
    loop = asyncio.get_running_loop()
    if _pinger is None or _pinger.done() or _pinger.get_loop() is not loop:
        _pinger = loop.create_task(_ping_forever(), name="push-sse-ping")


async def _ping_forever() -> None:
    """``: ping`` on every stream each heartbeat interval, so proxies never see an idle
    stream; it also stands for the client's heartbeat, which an SSE client cannot send.
    A reader that stopped reading fills its outbox with pings and is dropped as slow."""
    while True:
        await asyncio.sleep(push_settings.HEARTBEAT_INTERVAL_SECS)
        now = time.monotonic()
        for connection in list(_streams):
            if connection.is_open:
                connection.last_seen = now
                connection.outbox.push(PING_FRAME)
