"""The asyncio client of the push server's wire contract, version 1 (docs/protocol.md).

Same semantics as the JavaScript client (``push/static/push/pushclient.js``): requests
carry an ``id`` and their awaitables settle on the reply with that id; the client
reconnects with capped exponential backoff and full jitter, resubscribes every channel
with ``since`` = the last seq it delivered, drops duplicates, repairs gaps from the REST
history, and sends the contract's heartbeat, reconnecting when two intervals pass
without a frame. A subscription may carry a signed subscription token, or a provider of
them that it asks for each subscribe it sends and again before the token expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed as WebSocketClosed
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from pushclient.backoff import DEFAULT_BASE_DELAY_SECS, DEFAULT_MAX_DELAY_SECS, backoff_delay
from pushclient.delta import FOSSIL, DeltaMismatch, apply_delta, data_text
from pushclient.errors import (
    ConnectionClosed,
    ConnectionLost,
    NotConnected,
    PushError,
    RequestTimeout,
    TokenProviderFailed,
)
from pushclient.formats import get_format
from pushclient.history import GetJson, api_url_for, fetch_page, get_json, retry_after_secs
from pushclient.state import State, check_transition, is_terminal_close
from pushclient.tokens import TokenProvider, token_from, token_refresh_delay_secs

logger = logging.getLogger("pushclient")

Handler = Callable[[dict[str, Any]], Awaitable[None] | None]
Listener = Callable[[dict[str, Any]], None]

DEFAULT_REQUEST_TIMEOUT_SECS = 10.0
DEFAULT_HEARTBEAT_SECS = 25.0
# What the client takes of a greeting's heartbeat_interval: a server (or a proxy) that
# sent 0, a negative or a tiny interval made it send heartbeats in a tight loop.
MIN_HEARTBEAT_SECS = 0.1
DEFAULT_OPEN_TIMEOUT_SECS = 10.0
# The backoff starts again at its base only after a connection that stayed up this long:
# a node that greets and closes at once (a server error, a slow consumer's replay that
# overflows again) would otherwise have all its clients knock again within the base
# delay, over and over, instead of backing off as they do while it refuses them.
DEFAULT_STABLE_AFTER_SECS = 5.0
# The largest frame read from the server: 16 times its default frame limit (a message's
# data is at most PUSH_MAX_FRAME_BYTES, 1 MiB by default, plus its envelope). A larger
# one (a broken or hostile server) closes the connection with 1009 before it is held.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
# Our own close code for a silent connection, the same as the server's heartbeat timeout.
HEARTBEAT_TIMEOUT_CLOSE = 4001
# A refused handshake with these statuses is the contract's "invalid token": retrying
# with the same token cannot help, as with close code 1008.
_AUTH_REFUSED_STATUSES = frozenset({401, 403})
_POLICY_CLOSE = 1008
# Reads of a gap's messages before the client gives the range up as unrecovered: a node
# restarting answers again within a few backoff delays; a refusal never will.
GAP_FETCH_ATTEMPTS = 3
# Messages of one channel held while its gap is read from the history. A channel that
# goes on at its pace while the history is slow (retries, a Retry-After of seconds) would
# otherwise make the client hold all of it; past the bound messages are not kept, and
# are read from the history too once the held ones are delivered.
DEFAULT_MAX_HELD_MESSAGES = 1000
# Refusals of a subscribe that say "not now" (a dependency down, a budget spent): a
# subscription the client already holds is asked for again after a backoff delay.
_TRY_AGAIN_CODES = frozenset({"RATE_LIMITED", "UNAVAILABLE"})


@dataclass(eq=False)
class Subscription:
    """One channel this client receives; kept across reconnects until unsubscribed."""

    channel: str
    handler: Handler | None
    # The last seq delivered to the handler (or the channel's seq when we joined): the
    # resume point sent as ``since`` after a reconnect.
    last_seq: int | None
    ready: asyncio.Future[dict[str, Any]]
    seq: int | None = None
    recovered: bool | None = None
    # While a gap is being repaired: the messages that arrived meanwhile, by seq (which
    # also drops duplicates); None when delivery is not held back.
    held: dict[int, dict[str, Any]] | None = None
    # The highest seq not kept in ``held`` because it was full: read from the history.
    held_past: int = 0
    repair: asyncio.Task[None] | None = None
    # Asked on the first subscribe only: a reconnect resumes with ``since`` instead.
    rewind: int | None = None
    # True from a rewind's ``subscribed`` until its first message: the server may hold
    # fewer than asked (history trimmed), so that message starts the run.
    rewinding: bool = False
    replay_until: int | None = None
    occupancy: bool = False
    # The last ``occupancy`` count, when asked for.
    subscribers: int | None = None
    # Delta compression: asked for (subscribe(delta=True)), and agreed by the server's
    # ``subscribed``. ``base`` is (seq, JSON text of data) of the channel's last message
    # frame, what the server's next delta applies to. A delta that does not apply
    # resubscribes (``resync``); twice in a row and deltas are not asked for again.
    delta: bool = False
    delta_agreed: bool = False
    base: tuple[int, str] | None = None
    resync: asyncio.Task[None] | None = None
    delta_failures: int = 0
    # A resubscribe refused for now (_TRY_AGAIN_CODES): the task that asks again, and
    # how many times in a row it was refused.
    retry: asyncio.Task[None] | None = None
    refusals: int = 0
    # A signed subscription token: a string, or a provider called with the channel for
    # every subscribe the client sends for it (the first, each after a reconnect, and
    # one before the token's ``exp`` that extends the subscription).
    token: str | TokenProvider | None = None
    # The provider call in flight, and the task that asks it again before ``exp``.
    token_task: asyncio.Task[None] | None = None
    refresh: asyncio.Task[None] | None = None
    # Subscriptions the server ended by itself (a token expired) recovered in a row:
    # each waits a longer backoff, so tokens that end at once make no loop.
    endings: int = 0
    # The connection on which the server holds this subscription (its ``subscribed``
    # came): a subscribe sent there again extends it, with no replay and its delta
    # base kept.
    held_on: ClientConnection | None = None

    @property
    def delivered(self) -> int:
        """The last seq delivered, 0 before any."""
        return self.last_seq or 0


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[dict[str, Any]] | None
    subscription: Subscription | None = None
    # A subscribe of a subscription the server holds on this connection: it extends it.
    extending: bool = False
    # With a token from a provider: when (loop time) to ask it for a fresh one.
    refresh_at: float | None = None


@dataclass
class _ConnectionEnd:
    code: int | None
    reason: str = ""
    # A refused handshake's Retry-After (a load balancer's 429 or 503), in seconds.
    retry_after_secs: float = 0.0


def _with_token(url: str, token: str | None) -> str:
    if not token:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "token"] + [("token", token)]
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass(eq=False)
class _Events:
    listeners: dict[str, list[Listener]] = field(default_factory=dict)

    def on(self, event: str, listener: Listener) -> Callable[[], None]:
        self.listeners.setdefault(event, []).append(listener)
        return lambda: self.listeners[event].remove(listener)

    def emit(self, event: str, detail: dict[str, Any]) -> None:
        for listener in list(self.listeners.get(event, ())):
            try:
                listener(detail)
            except Exception:
                # One broken listener must not stop the others or the connection.
                logger.exception("a %r listener failed", event)


class PushClient:
    """``async with PushClient(url, token=...) as client: await client.subscribe(...)``.

    Events (``client.on(name, listener)``, the listener gets one dict): ``state``
    {state, previous}, ``open`` (the connection_established envelope), ``close``
    {code, reason, will_reconnect, delay_secs}, ``message`` (every message), ``gap``
    {channel, from, to, expected, received}, ``unrecovered`` {channel, since, seq},
    ``error`` {code, message, envelope}.
    """

    # Reads the REST history for gap repair; a test replaces it (DRF's ``timer`` idiom).
    get_json: GetJson = staticmethod(get_json)

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        format: str = "json",
        base_delay_secs: float = DEFAULT_BASE_DELAY_SECS,
        max_delay_secs: float = DEFAULT_MAX_DELAY_SECS,
        request_timeout_secs: float = DEFAULT_REQUEST_TIMEOUT_SECS,
        open_timeout_secs: float = DEFAULT_OPEN_TIMEOUT_SECS,
        heartbeat_interval_secs: float | None = None,
        rand: Callable[[], float] = random.random,
        api_url: str | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_held_messages: int = DEFAULT_MAX_HELD_MESSAGES,
        stable_after_secs: float = DEFAULT_STABLE_AFTER_SECS,
    ) -> None:
        self.url = url
        # Where gaps are read from: the REST root next to the WebSocket by default.
        self.api_url = api_url or api_url_for(url)
        self.token = token
        self.format = get_format(format)
        self.base_delay_secs = base_delay_secs
        self.max_delay_secs = max_delay_secs
        self.request_timeout_secs = request_timeout_secs
        self.open_timeout_secs = open_timeout_secs
        self.max_frame_bytes = max_frame_bytes
        self.max_held_messages = max_held_messages
        self.stable_after_secs = stable_after_secs
        # None: use the interval the server announces in connection_established.
        self.heartbeat_interval_secs = heartbeat_interval_secs
        # The jitter source: uniform in [0, 1). A test passes a fixed sequence.
        self.rand = rand

        self.server_id: str | None = None
        self.connection_id: str | None = None
        self.attempt = 0
        # When the current connection's connection_established came (loop time).
        self._established_at: float | None = None
        self._state = State.DISCONNECTED
        self._events = _Events()
        self._subscriptions: dict[str, Subscription] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._ws: ClientConnection | None = None
        self._heartbeat_secs: float | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._connect_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        # Fire-and-forget tasks, held here until done (asyncio keeps only weak ones).
        self._background: set[asyncio.Task[Any]] = set()

    # ----- state and events ------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def on(self, event: str, listener: Listener) -> Callable[[], None]:
        """Listen to an event; returns a function that removes the listener."""
        return self._events.on(event, listener)

    def _set_state(self, target: State) -> None:
        if target == self._state:
            return
        check_transition(self._state, target)
        previous, self._state = self._state, target
        self._events.emit("state", {"state": target.value, "previous": previous.value})

    def last_seq(self, channel: str) -> int | None:
        subscription = self._subscriptions.get(channel)
        return subscription.last_seq if subscription else None

    # ----- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> PushClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (and keep reconnecting); returns on ``connection_established``.

        Raises ``ConnectionClosed`` if the client closes for good first.
        """
        if self._state == State.CONNECTED:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connect_waiters.append(waiter)
        if self._state == State.DISCONNECTED:
            self._closing = False
            self.attempt = 0
            self._set_state(State.CONNECTING)
            self._run_task = asyncio.create_task(self._run(), name="pushclient")
        await waiter

    async def close(self) -> None:
        """Close for good: no reconnect; requests in flight fail with ``ConnectionClosed``."""
        self._closing = True
        task, self._run_task = self._run_task, None
        if task is asyncio.current_task():
            # Called from a handler, on the read loop itself, which cannot wait for
            # itself: it sees ``_closing`` when the handler returns, and closes the
            # socket on its way out.
            pass
        elif task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._finish(_ConnectionEnd(1000, "client closed"))

    async def _run(self) -> None:
        try:
            await self._reconnect_forever()
        except Exception as exc:
            # A bug here must not leave callers waiting on a client that no longer runs.
            logger.exception("the connection loop failed")
            self._finish(_ConnectionEnd(None, f"client error: {exc!r}"))

    async def _reconnect_forever(self) -> None:
        while True:
            end = await self._one_connection()
            self._count_attempts()
            if self._closing or is_terminal_close(end.code):
                self._finish(end)
                return
            # Not sooner than a refusal asked: sooner is refused again.
            delay = max(self._backoff(self.attempt), min(end.retry_after_secs, self.max_delay_secs))
            self.attempt += 1
            self._set_state(State.RECONNECTING)
            self._events.emit(
                "close",
                {
                    "code": end.code,
                    "reason": end.reason,
                    "will_reconnect": True,
                    "delay_secs": delay,
                },
            )
            await asyncio.sleep(delay)

    def _count_attempts(self) -> None:
        """Start the backoff again at its base after a connection that stayed up."""
        established_at, self._established_at = self._established_at, None
        now = asyncio.get_running_loop().time()
        if established_at is not None and now - established_at >= self.stable_after_secs:
            self.attempt = 0

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(
            attempt, base_secs=self.base_delay_secs, max_secs=self.max_delay_secs, rand=self.rand
        )

    def _finish(self, end: _ConnectionEnd) -> None:
        was_open = self._state != State.DISCONNECTED
        if was_open:
            self._set_state(State.DISCONNECTED)
        for subscription in self._subscriptions.values():
            _stop_repair(subscription)
        error = ConnectionClosed(f"connection closed ({end.code}) {end.reason}".strip(), end.code)
        self._fail_pending(error, keep_subscribes=False)
        for subscription in self._subscriptions.values():
            if not subscription.ready.done():
                subscription.ready.set_exception(error)
        for waiter in self._connect_waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._connect_waiters.clear()
        if was_open:
            self._events.emit(
                "close", {"code": end.code, "reason": end.reason, "will_reconnect": False}
            )

    async def _one_connection(self) -> _ConnectionEnd:
        try:
            ws = await connect(
                _with_token(self.url, self.token),
                subprotocols=[Subprotocol(self.format.subprotocol)],
                open_timeout=self.open_timeout_secs,
                # The contract's heartbeat does the liveness check; no proxy: we talk
                # to the server directly.
                ping_interval=None,
                max_size=self.max_frame_bytes,
                compression=None,
                proxy=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            code = _POLICY_CLOSE if status in _AUTH_REFUSED_STATUSES else None
            reason = f"handshake refused with HTTP {status}"
            return _ConnectionEnd(code, reason, retry_after_secs(exc.response))
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return _ConnectionEnd(None, f"{type(exc).__name__}: {exc}")
        self._ws = ws
        try:
            return await self._read_frames(ws)
        finally:
            self._ws = None
            self._stop_heartbeat()
            self._fail_pending(ConnectionLost(), keep_subscribes=True)
            # Shielded: close() cancels this task, and the socket must still be closed.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(ws.close())

    async def _read_frames(self, ws: ClientConnection) -> _ConnectionEnd:
        while not self._closing:
            # Before connection_established the open timeout applies; after it, two
            # heartbeat intervals without any frame mean a dead connection that TCP
            # has not noticed yet (a laptop lid, a NAT that forgot us).
            silence = 2 * self._heartbeat_secs if self._heartbeat_secs else self.open_timeout_secs
            try:
                frame = await asyncio.wait_for(ws.recv(), silence)
            except TimeoutError:
                ws.transport.abort()
                return _ConnectionEnd(HEARTBEAT_TIMEOUT_CLOSE, "heartbeat timeout")
            except WebSocketClosed as exc:
                received = exc.rcvd
                if exc.sent is not None and exc.sent.code == 1009:
                    # Ours: a frame over max_frame_bytes. Its resume would bring it again.
                    reason = f"a frame from the server was over {self.max_frame_bytes} bytes"
                    return _ConnectionEnd(1009, reason)
                if received is None:
                    return _ConnectionEnd(None, "the connection dropped")
                return _ConnectionEnd(received.code, received.reason)
            try:
                envelope = self.format.decode(frame)
            # TypeError: a text frame for msgpack; RecursionError: JSON nested too deep.
            except (ValueError, TypeError, RecursionError) as exc:
                self._events.emit("error", {"code": "UNDECODABLE", "message": str(exc)})
                continue
            if not isinstance(envelope, dict):
                continue
            try:
                await self._dispatch(ws, envelope)
            except (KeyError, TypeError, ValueError) as exc:
                # A field missing or of the wrong type (a broken server or proxy): this
                # frame is skipped, not the connection loop ended for good. A message
                # skipped shows as a gap, repaired from the history.
                message = f"{envelope.get('type')!r} envelope: {type(exc).__name__}: {exc}"
                self._events.emit(
                    "error", {"code": "INVALID_ENVELOPE", "message": message, "envelope": envelope}
                )
        return _ConnectionEnd(1000, "client closed")

    # ----- inbound envelopes -----------------------------------------------------------

    async def _dispatch(self, ws: ClientConnection, envelope: dict[str, Any]) -> None:
        kind = envelope.get("type")
        if kind == "connection_established":
            await self._on_established(ws, envelope)
        elif kind == "message":
            await self._on_message(envelope)
        elif kind == "subscribed":
            self._on_subscribed(envelope)
        elif kind == "occupancy":
            self._on_occupancy(envelope)
        elif kind == "error":
            self._on_error(envelope)
        else:
            self._settle(envelope)

    async def _on_established(self, ws: ClientConnection, envelope: dict[str, Any]) -> None:
        self.server_id = envelope.get("server_id")
        self.connection_id = envelope.get("connection_id")
        self._established_at = asyncio.get_running_loop().time()
        self._heartbeat_secs = self.heartbeat_interval_secs or _server_heartbeat_secs(
            envelope.get("heartbeat_interval")
        )
        # One heartbeat task per connection: a repeated greeting replaces it.
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self._heartbeat_task = asyncio.create_task(self._send_heartbeats(ws, self._heartbeat_secs))
        self._set_state(State.CONNECTED)
        self._events.emit("open", envelope)
        for subscription in list(self._subscriptions.values()):
            await self._send_subscribe(ws, subscription)
        for waiter in self._connect_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._connect_waiters.clear()

    async def _on_message(self, message: dict[str, Any]) -> None:
        subscription = self._subscriptions.get(message.get("channel", ""))
        if subscription is None:
            return
        if subscription.delta_agreed or message.get("delta"):
            undeltaed = self._undelta(subscription, message)
            if undeltaed is None:
                return
            message = undeltaed
        seq = message["seq"]
        if subscription.held is not None:
            # A gap is being repaired: the repair delivers this one in its turn.
            if len(subscription.held) < self.max_held_messages:
                subscription.held[seq] = message
            else:
                subscription.held_past = max(subscription.held_past, seq)
            return
        if subscription.rewinding:
            _start_rewound(subscription, seq)
        last = subscription.last_seq
        # A resume may overlap what was already delivered: never hand a seq twice.
        if last is not None and seq <= last:
            return
        if last is not None and seq > last + 1:
            held = subscription.held = {seq: message}
            subscription.held_past = 0
            subscription.repair = asyncio.create_task(
                self._repair_gaps(subscription, held), name=f"pushclient-gap-{seq}"
            )
            return
        await self._deliver(subscription, message)

    # ----- delta compression ------------------------------------------------------------

    def _undelta(
        self, subscription: Subscription, message: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The message with ``data`` (a delta applied to the base), remembering its text
        as the next base; None when it is dropped: a resubscription is on its way, or a
        delta does not apply, which starts one. A wrong base never yields data."""
        if subscription.resync is not None:
            return None  # the old subscription's last frames: the replay resends them
        seq = message["seq"]
        if not message.get("delta"):
            if "data" in message:
                subscription.base = (seq, data_text(message["data"]))
            return message
        base = subscription.base
        try:
            if base is None or base[0] != seq - 1:
                raise DeltaMismatch(f"a delta for seq {seq} without the message before it")
            text = apply_delta(base[1], message["data_delta"], max_bytes=self.max_frame_bytes)
            data = json.loads(text)
        except (DeltaMismatch, KeyError, TypeError, ValueError) as exc:
            self._delta_failed(subscription, seq, exc)
            return None
        subscription.base = (seq, text)
        subscription.delta_failures = 0
        full = {k: v for k, v in message.items() if k not in ("delta", "data_delta")}
        full["data"] = data
        return full

    def _delta_failed(self, subscription: Subscription, seq: int, exc: Exception) -> None:
        """Resubscribe with ``since`` = the last seq delivered: the server replays the
        rest in full, then deltas follow from the replay's last message. A second
        failure in a row drops delta for this subscription (something between us and
        the server changes the data's text), so the channel keeps working without."""
        subscription.base = None
        subscription.delta_failures += 1
        if subscription.delta_failures >= 2:
            subscription.delta = False
        # Unsubscribed next: the subscribe after it is a new subscription, not an extension.
        subscription.held_on = None
        self._events.emit(
            "error",
            {
                "code": "DELTA_MISMATCH",
                "message": f"{subscription.channel!r} seq {seq}: {exc}; resubscribing",
                "envelope": None,
            },
        )
        subscription.resync = asyncio.create_task(
            self._resubscribe(subscription), name=f"pushclient-resync-{seq}"
        )

    async def _resubscribe(self, subscription: Subscription) -> None:
        try:
            await self._request({"type": "unsubscribe", "channel": subscription.channel})
        except (ConnectionLost, ConnectionClosed, NotConnected):
            return  # the connection dropped: the reconnect subscribes again with since
        except PushError:
            # Refused (NOT_SUBSCRIBED) or not answered in time: the server handles a
            # connection's frames in order, so the subscribe below still comes after
            # the unsubscribe, whatever became of it; without it the channel is silent.
            pass
        finally:
            subscription.resync = None
        ws = self._ws
        if ws is not None and self._subscriptions.get(subscription.channel) is subscription:
            await self._send_subscribe(ws, subscription)

    async def _deliver(self, subscription: Subscription, message: dict[str, Any]) -> None:
        if self._subscriptions.get(subscription.channel) is not subscription:
            return  # unsubscribed meanwhile (by a handler, during a repair's run)
        subscription.last_seq = message["seq"]
        self._events.emit("message", message)
        if subscription.handler is None:
            return
        try:
            result = subscription.handler(message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("the handler of %r failed", subscription.channel)

    # ----- gap repair --------------------------------------------------------------------

    async def _repair_gaps(self, subscription: Subscription, held: dict[int, Any]) -> None:
        """Hold the channel's delivery, read each missing range from the REST history,
        then hand everything over in seq order.

        The server delivers in order without gaps, so a gap means frames were lost on
        the way: a drop-oldest channel whose reader fell behind, or a bug. Messages
        arriving meanwhile wait in ``held``; the read loop keeps reading other channels.
        """
        try:
            while self._subscriptions.get(subscription.channel) is subscription:
                await self._deliver_held_run(subscription, held)
                after = subscription.delivered
                if held:
                    received = min(held)
                    until = received - 1
                    self._events.emit(
                        "gap",
                        {
                            "channel": subscription.channel,
                            "from": after + 1,
                            "to": until,
                            "expected": after + 1,
                            "received": received,
                        },
                    )
                elif subscription.held_past > after:
                    # Received while ``held`` was full, and not kept: read back as well.
                    until = subscription.held_past
                else:
                    subscription.held = subscription.repair = None
                    return
                await self._fill_from_history(subscription, until)
            # Dropped meanwhile (a handler unsubscribed, with no await that let the
            # cancellation in): nothing more to deliver, and the loop must not spin.
            subscription.held = subscription.repair = None
        except Exception:
            # A bug here must not hold the channel back for good; a resume after the
            # next reconnect replays from the last seq delivered.
            logger.exception("repairing a gap of %r failed", subscription.channel)
            subscription.held = subscription.repair = None

    async def _fill_from_history(self, subscription: Subscription, until: int) -> None:
        """Deliver the seqs after the last delivered up to ``until`` from the history, a
        page at a time; what it does not have (trimmed) or will not give is given up."""
        while (after := subscription.delivered) < until:
            if self._subscriptions.get(subscription.channel) is not subscription:
                return  # dropped meanwhile: nothing more to read for it
            page = await self._fetch_missing(subscription, after, until)
            if not page:
                break
            for message in page:
                if message["seq"] > subscription.delivered + 1:
                    self._give_up(subscription, message["seq"] - 1)
                if message["seq"] > subscription.delivered:
                    await self._deliver(subscription, message)
        if subscription.delivered < until:
            self._give_up(subscription, until)

    async def _deliver_held_run(self, subscription: Subscription, held: dict[int, Any]) -> None:
        """Deliver the held messages that follow on from the last seq, then forget the
        ones at or below it (duplicates from a resume or from the history read)."""
        while (message := held.pop(subscription.delivered + 1, None)) is not None:
            await self._deliver(subscription, message)
        for seq in [seq for seq in held if seq <= subscription.delivered]:
            del held[seq]

    async def _fetch_missing(
        self, subscription: Subscription, after: int, until: int
    ) -> list[dict[str, Any]]:
        failure: Exception | None = None
        retry_after = 0.0
        for attempt in range(GAP_FETCH_ATTEMPTS):
            if attempt:
                # Not sooner than the server asked (429, 503): sooner is refused again.
                await asyncio.sleep(max(self._backoff(attempt - 1), retry_after))
            try:
                return await asyncio.to_thread(
                    fetch_page,
                    self.get_json,
                    self.api_url,
                    subscription.channel,
                    after=after,
                    until=until,
                    token=self.token,
                    timeout_secs=self.request_timeout_secs,
                    subscription_token=await self._history_token(subscription),
                )
            except (OSError, ValueError, KeyError, TypeError, TokenProviderFailed) as exc:
                failure = exc
                retry_after = min(retry_after_secs(exc), self.max_delay_secs)
        message = f"reading seqs {after + 1}-{until} of {subscription.channel!r}: {failure}"
        self._events.emit(
            "error", {"code": "GAP_REPAIR_FAILED", "message": message, "envelope": None}
        )
        return []

    async def _history_token(self, subscription: Subscription) -> str | None:
        """The signed subscription token a history read of ``subscription`` carries: a
        channel the client holds only by token is read only with it. A provider is asked
        for a fresh one for each read, as for each subscribe: the one it gave last may
        have expired since (a gap found after a long outage)."""
        token = subscription.token
        if callable(token):
            return await token_from(
                token, subscription.channel, timeout_secs=self.request_timeout_secs
            )
        return token

    def _give_up(self, subscription: Subscription, until: int) -> None:
        """Move past seqs the history no longer has (trimmed) or would not give: the
        application hears ``unrecovered``, as for a resume answered ``recovered: false``."""
        self._events.emit(
            "unrecovered",
            {"channel": subscription.channel, "since": subscription.last_seq, "seq": until},
        )
        subscription.last_seq = until

    def _subscription_replied(self, reply: dict[str, Any]) -> Subscription | None:
        """The subscription a reply to a subscribe is for, while the application still
        holds it: a late reply to a request of a subscription it unsubscribed since is
        not the business of a newer one of the same channel."""
        request = self._pending.get(reply["id"]) if "id" in reply else None
        subscription = request.subscription if request is not None else None
        if (
            subscription is None
            or self._subscriptions.get(subscription.channel) is not subscription
        ):
            return None
        return subscription

    def _on_subscribed(self, reply: dict[str, Any]) -> None:
        subscription = self._subscription_replied(reply)
        if subscription is not None:
            request = self._pending[reply["id"]]
            subscription.held_on = self._ws
            if request.extending:
                # Extended with a fresh token: the subscription lives on, as it should.
                subscription.endings = 0
            self._schedule_refresh(subscription, request.refresh_at)
            if subscription.last_seq is None and subscription.rewind:
                # The last ``rewind`` messages up to the reply's seq come first.
                subscription.last_seq = max(0, reply["seq"] - subscription.rewind)
                subscription.replay_until = reply["seq"]
                subscription.rewinding = reply["seq"] > subscription.last_seq
            # Without `since` the reply's seq is the channel's latest: live messages follow.
            elif subscription.last_seq is None:
                subscription.last_seq = reply["seq"]
            subscription.delta_agreed = reply.get("delta") == FOSSIL
            subscription.refusals = 0
            if reply.get("recovered") is False:
                # History was trimmed past `since`: the application refetches the state
                # up to the reply's seq over REST, and the handler goes on after it. What
                # the server still replays up to it would reach the application twice,
                # and what a repair held is covered by the refetch too. A cursor past the
                # reply's seq (the channel's history was reset) goes back to it: the
                # seqs after it are new messages, not ones delivered.
                self._events.emit(
                    "unrecovered",
                    {
                        "channel": subscription.channel,
                        "since": subscription.last_seq,
                        "seq": reply["seq"],
                    },
                )
                if subscription.repair is not None:
                    subscription.repair.cancel()
                subscription.held = subscription.repair = None
                subscription.last_seq = reply["seq"]
        self._settle(reply)

    def _on_occupancy(self, envelope: dict[str, Any]) -> None:
        subscription = self._subscriptions.get(envelope.get("channel", ""))
        if subscription is not None:
            subscription.subscribers = envelope.get("subscribers")
        self._events.emit("occupancy", envelope)

    def _on_error(self, envelope: dict[str, Any]) -> None:
        error = PushError(envelope.get("code", "ERROR"), envelope.get("message", ""), envelope)
        request = self._pending.get(envelope["id"]) if "id" in envelope else None
        if request is None:
            # Without ``id`` but naming a channel the server holds for us: it ended that
            # subscription by itself (a grant removed, a signed token expired).
            ended = None if "id" in envelope else self._subscriptions.get(envelope.get("channel"))
            if ended is not None and ended.held_on is not None and ended.held_on is self._ws:
                self._on_subscription_ended(ended, error)
            else:
                self._emit_error(error)
            return
        subscription = request.subscription
        if subscription is not None and self._subscription_replied(envelope) is None:
            # Refused after the application unsubscribed: nothing to drop or retry.
            self._settle(envelope, error)
            return
        if subscription is not None and subscription.ready.done():
            # A subscription the application holds, asked for again (a reconnect, a
            # delta resync, a fresh token): it must not end without a word.
            self._pending.pop(envelope["id"], None)
            if error.code in _TRY_AGAIN_CODES and self._ws is not None:
                self._emit_error(error)
                self._subscribe_again(self._ws, subscription)
                return
            # A refused fresh token: the server still holds the subscription until the
            # old one's ``exp``, and is told to stop now rather than deliver to nobody.
            self._end(subscription, error, tell_server=request.extending)
            return
        if subscription is not None:
            # A refused subscribe must not be sent again on every reconnect.
            self._drop(subscription)
        self._settle(envelope, error)

    def _emit_error(self, error: PushError) -> None:
        self._events.emit(
            "error", {"code": error.code, "message": error.message, "envelope": error.envelope}
        )

    def _on_subscription_ended(self, subscription: Subscription, error: PushError) -> None:
        """The server ended a subscription by itself. With a token provider the client
        asks it for a fresh token and subscribes again from the last seq delivered,
        after a backoff that grows while such endings follow each other; the
        application hears of it only if that fails. Without one the subscription is
        dropped and the error told."""
        subscription.held_on = None
        if subscription.refresh is not None:
            subscription.refresh.cancel()
            subscription.refresh = None
        if not callable(subscription.token) or self._ws is None:
            self._end(subscription, error)
            return
        delay = self._backoff(subscription.endings)
        subscription.endings += 1
        self._subscribe_later(self._ws, subscription, delay)

    def _end(
        self, subscription: Subscription, error: PushError, *, tell_server: bool = False
    ) -> None:
        """A subscription the application held is gone for good (the server ended or
        refused it, and the client will not ask again): the error, then ``ended``, which
        names the channel, so that the application need not read it from the error."""
        self._drop(subscription, tell_server=tell_server)
        self._emit_error(error)
        self._events.emit(
            "ended",
            {"channel": subscription.channel, "code": error.code, "message": error.message},
        )

    def _drop(self, subscription: Subscription, *, tell_server: bool = False) -> None:
        """Forget a subscription the server refused or ended: not asked for again after
        a reconnect, and a new ``subscribe`` of its channel sends a new request."""
        if self._subscriptions.get(subscription.channel) is not subscription:
            return
        del self._subscriptions[subscription.channel]
        _stop_repair(subscription)
        if tell_server:
            task = asyncio.create_task(
                self._unsubscribe_quietly(subscription.channel),
                name=f"pushclient-unsubscribe-{subscription.channel}",
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _unsubscribe_quietly(self, channel: str) -> None:
        with contextlib.suppress(PushError):
            await self._request({"type": "unsubscribe", "channel": channel})

    def _subscribe_again(self, ws: ClientConnection, subscription: Subscription) -> None:
        """Ask again, after a backoff delay, for a subscription refused for now."""
        delay = self._backoff(subscription.refusals)
        subscription.refusals += 1
        self._subscribe_later(ws, subscription, delay)

    def _subscribe_later(
        self, ws: ClientConnection, subscription: Subscription, delay: float
    ) -> None:
        if subscription.retry is not None:
            subscription.retry.cancel()
        subscription.retry = asyncio.create_task(
            self._send_subscribe_after(ws, subscription, delay),
            name=f"pushclient-resubscribe-{subscription.channel}",
        )

    async def _send_subscribe_after(
        self, ws: ClientConnection, subscription: Subscription, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        subscription.retry = None
        if self._ws is ws and self._subscriptions.get(subscription.channel) is subscription:
            await self._send_subscribe(ws, subscription)

    def _settle(self, reply: dict[str, Any], error: PushError | None = None) -> None:
        request = self._pending.pop(reply["id"], None) if "id" in reply else None
        if request is None:
            return
        target = request.future
        if request.subscription is not None:
            target = request.subscription.ready
        if target is None or target.done():
            return
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(reply)

    def _fail_pending(self, error: PushError, *, keep_subscribes: bool) -> None:
        for request_id, request in list(self._pending.items()):
            # A subscribe in flight is sent again after the reconnect; its caller waits.
            if keep_subscribes and request.subscription is not None:
                del self._pending[request_id]
                continue
            del self._pending[request_id]
            if request.future is not None and not request.future.done():
                request.future.set_exception(error)

    # ----- requests --------------------------------------------------------------------

    def _take_id(self) -> int:
        request_id, self._next_id = self._next_id, self._next_id + 1
        return request_id

    async def _send(self, ws: ClientConnection, envelope: dict[str, Any]) -> None:
        await ws.send(self.format.encode(envelope))

    async def _send_subscribe(self, ws: ClientConnection, subscription: Subscription) -> None:
        """Send a subscribe for ``subscription``: at once, or, with a token provider,
        from a task of its own once the provider has given a token (so that a slow
        back-end holds neither the read loop nor the other channels' resubscribes)."""
        provider = subscription.token
        if not callable(provider):
            await self._send_subscribe_with(ws, subscription, provider)
            return
        if subscription.token_task is not None:
            subscription.token_task.cancel()  # superseded: this subscribe is the one sent
        subscription.token_task = asyncio.create_task(
            self._send_subscribe_with_fresh_token(ws, subscription, provider),
            name=f"pushclient-token-{subscription.channel}",
        )

    async def _send_subscribe_with_fresh_token(
        self, ws: ClientConnection, subscription: Subscription, provider: TokenProvider
    ) -> None:
        try:
            token = await token_from(
                provider, subscription.channel, timeout_secs=self.request_timeout_secs
            )
        except TokenProviderFailed as exc:
            if subscription.token_task is asyncio.current_task():
                subscription.token_task = None
            if self._subscriptions.get(subscription.channel) is subscription:
                self._token_failed(ws, subscription, exc)
            return
        if subscription.token_task is asyncio.current_task():
            subscription.token_task = None
        if self._ws is not ws or self._subscriptions.get(subscription.channel) is not subscription:
            return  # the connection changed: the reconnect subscribes it again
        delay = token_refresh_delay_secs(token)
        refresh_at = None if delay is None else asyncio.get_running_loop().time() + delay
        await self._send_subscribe_with(ws, subscription, token, refresh_at=refresh_at)

    def _token_failed(
        self, ws: ClientConnection, subscription: Subscription, error: TokenProviderFailed
    ) -> None:
        """A first subscribe fails for its caller; a subscription already held is asked
        for again after a backoff delay that grows with each failure in a row."""
        if not subscription.ready.done():
            subscription.ready.set_exception(error)
            return
        self._emit_error(error)
        self._subscribe_again(ws, subscription)

    async def _send_subscribe_with(
        self,
        ws: ClientConnection,
        subscription: Subscription,
        token: str | None,
        *,
        refresh_at: float | None = None,
    ) -> None:
        envelope: dict[str, Any] = {"type": "subscribe", "channel": subscription.channel}
        if subscription.last_seq is not None:
            envelope["since"] = subscription.last_seq
        elif subscription.rewind:
            envelope["rewind"] = subscription.rewind
        if subscription.occupancy:
            envelope["occupancy"] = True
        if subscription.delta:
            envelope["delta"] = FOSSIL
        if token:
            envelope["token"] = token
        # Held by the server on this connection: the subscribe extends it (a fresh
        # token), and its deltas go on from the base. Otherwise a new subscription on
        # the server: its deltas start after a full message. (``since`` is sent either
        # way: should the server have ended it meanwhile, this resumes it without a gap.)
        extending = subscription.held_on is not None and subscription.held_on is ws
        if not extending:
            subscription.base = None
        envelope["id"] = request_id = self._take_id()
        self._pending[request_id] = _Pending(
            future=None, subscription=subscription, extending=extending, refresh_at=refresh_at
        )
        with contextlib.suppress(WebSocketClosed):  # the reconnect sends it again
            await self._send(ws, envelope)

    def _schedule_refresh(self, subscription: Subscription, refresh_at: float | None) -> None:
        """Extend the subscription with a fresh token from its provider shortly before
        the token expires (``token_refresh_delay_secs``), on the connection that holds it."""
        if subscription.refresh is not None:
            subscription.refresh.cancel()
            subscription.refresh = None
        ws = self._ws
        if refresh_at is not None and ws is not None:
            subscription.refresh = asyncio.create_task(
                self._refresh_at(ws, subscription, refresh_at),
                name=f"pushclient-refresh-{subscription.channel}",
            )

    async def _refresh_at(
        self, ws: ClientConnection, subscription: Subscription, refresh_at: float
    ) -> None:
        await asyncio.sleep(max(0.0, refresh_at - asyncio.get_running_loop().time()))
        subscription.refresh = None
        held = self._subscriptions.get(subscription.channel) is subscription
        if held and self._ws is ws and self._state == State.CONNECTED:
            await self._send_subscribe(ws, subscription)

    async def _request(self, envelope: dict[str, Any]) -> dict[str, Any]:
        ws = self._ws
        if self._state != State.CONNECTED or ws is None:
            raise NotConnected(self._state.value)
        request_id = self._take_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(future=future)
        try:
            await self._send(ws, {**envelope, "id": request_id})
            return await asyncio.wait_for(future, self.request_timeout_secs)
        except WebSocketClosed as exc:
            raise ConnectionLost() from exc
        except TimeoutError as exc:
            kind = envelope["type"]
            message = f"no reply to {kind!r} within {self.request_timeout_secs} s"
            raise RequestTimeout(message) from exc
        finally:
            self._pending.pop(request_id, None)

    async def subscribe(
        self,
        channel: str,
        handler: Handler | None = None,
        *,
        since: int | None = None,
        rewind: int | None = None,
        occupancy: bool = False,
        delta: bool = False,
        token: str | TokenProvider | None = None,
    ) -> Subscription:
        """Receive ``channel``: ``handler(message)`` gets every message once, in seq order.

        Returns when the server answers ``subscribed`` (waiting for the connection if it
        is not up). ``since`` resumes from a seq the caller stored; ``rewind=N`` (1 to
        100) starts with the channel's last N messages instead. ``occupancy=True`` also
        asks for the channel's subscriber count: ``occupancy`` events and
        ``subscription.subscribers``. ``delta`` asks for fossil deltas (less traffic for
        a large state that changes a little); they are applied here, so the handler
        always sees ``data``. Raises ``PushError`` (for example FORBIDDEN) or
        ``ConnectionClosed``.

        ``token`` is a signed subscription token for the channel (a ``private-`` or
        ``presence-`` one your back-end lets the client into): a string, or a provider,
        a function or coroutine function of the channel, that the client calls for
        every subscribe it sends: this one, each one after a reconnect, and one shortly
        before the token's ``exp``, which extends the subscription. A provider that
        raises, gives no token or does not answer within ``request_timeout_secs`` fails
        this call with ``TokenProviderFailed``; later on it is asked again after a
        backoff delay. Given again for a channel already subscribed, the new token is
        the one used from now on, and extends the subscription at once. The REST history
        reads that repair a gap carry it too (a provider is asked for a fresh one for
        each), so a channel held only by token loses nothing to a gap.
        """
        if token is not None and not (callable(token) or (isinstance(token, str) and token)):
            raise TypeError("token must be a non-empty string or a function that gives one")
        existing = self._subscriptions.get(channel)
        if existing is not None:
            existing.handler = handler
            if token is not None:
                await self._replace_token(existing, token)
            # Shielded: this caller giving up must not fail the subscribe for the others.
            await asyncio.shield(existing.ready)
            return existing
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        subscription = Subscription(
            channel,
            handler,
            since,
            ready,
            rewind=rewind,
            occupancy=occupancy,
            delta=delta,
            token=token,
        )
        self._subscriptions[channel] = subscription
        try:
            if self._state == State.CONNECTED and self._ws is not None:
                await self._send_subscribe(self._ws, subscription)
            reply = await asyncio.shield(ready)
        except BaseException:
            # Failed (closed for good) or given up by the caller (a timeout around this
            # call): not held, so a late reply delivers nothing to a caller told it
            # failed, and a later subscribe of the channel asks the server again.
            if self._subscriptions.get(channel) is subscription:
                del self._subscriptions[channel]
                _stop_repair(subscription)
            ready.cancel()
            raise
        subscription.seq = reply["seq"]
        subscription.recovered = reply.get("recovered")
        return subscription

    async def _replace_token(self, subscription: Subscription, token: str | TokenProvider) -> None:
        subscription.token = token
        ws = self._ws
        if ws is not None and subscription.held_on is ws and self._state == State.CONNECTED:
            await self._send_subscribe(ws, subscription)

    async def latest(
        self,
        channel: str,
        on_value: Callable[[Any, dict[str, Any]], Any],
        *,
        occupancy: bool = False,
    ) -> Subscription:
        """For dashboards: ``on_value(data, message)`` gets the channel's latest value at
        once (when it has one), then every new value, with no gap between the two
        (``rewind=1``). Returns as ``subscribe`` does."""

        def handler(message: dict[str, Any]) -> Any:
            return on_value(message["data"], message)

        return await self.subscribe(channel, handler, rewind=1, occupancy=occupancy)

    async def unsubscribe(self, channel: str) -> dict[str, Any] | None:
        """Stop receiving ``channel``; returns the reply, or None when the server held no
        such subscription (not connected, or its resubscribe was refused for now)."""
        subscription = self._subscriptions.pop(channel, None)
        if subscription is not None:
            _stop_repair(subscription)
        if subscription is None or self._state != State.CONNECTED:
            return None
        try:
            return await self._request({"type": "unsubscribe", "channel": channel})
        except PushError as exc:
            if exc.code != "NOT_SUBSCRIBED":
                raise
            # Its resubscribe was refused (and waited to be asked again), or a delta
            # resync had unsubscribed it: not subscribed is what was asked for.
            return None

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """Publish ``data`` (any JSON value); returns the ``published`` reply.

        Not queued while disconnected: a WebSocket publish has no idempotency key, so
        the caller decides whether to retry (or publishes over REST with one).
        """
        return await self._request({"type": "publish", "channel": channel, "data": data})

    # ----- heartbeat -------------------------------------------------------------------

    async def _send_heartbeats(self, ws: ClientConnection, interval_secs: float) -> None:
        with contextlib.suppress(WebSocketClosed):
            while True:
                await asyncio.sleep(interval_secs)
                await self._send(ws, {"type": "heartbeat"})

    def _stop_heartbeat(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        self._heartbeat_secs = None


def _start_rewound(subscription: Subscription, seq: int) -> None:
    """The first message after a rewind's reply: a stored one (up to the reply's seq)
    starts the run even when the server held fewer than asked; a live one follows the
    reply's seq, and anything missing before it is a gap as usual."""
    subscription.rewinding = False
    until = subscription.replay_until if subscription.replay_until is not None else seq
    start = min(seq, until + 1) - 1
    if subscription.last_seq is None or start > subscription.last_seq:
        subscription.last_seq = start


def _stop_repair(subscription: Subscription) -> None:
    # What was held is replayed by the resume after a reconnect (from the last seq
    # delivered), or is of no interest any more after an unsubscribe.
    if subscription.repair is not None:
        subscription.repair.cancel()
    subscription.held = subscription.repair = None
    if subscription.resync is not None:
        subscription.resync.cancel()
        subscription.resync = None
    if subscription.retry is not None:
        subscription.retry.cancel()
        subscription.retry = None
    for task in (subscription.token_task, subscription.refresh):
        if task is not None:
            task.cancel()
    subscription.token_task = subscription.refresh = None


def _server_heartbeat_secs(interval: Any) -> float:
    """The greeting's ``heartbeat_interval`` in seconds; the default when it is no
    positive number, and at least ``MIN_HEARTBEAT_SECS``."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        return DEFAULT_HEARTBEAT_SECS
    if not interval > 0 or interval == float("inf"):  # (NaN is not > 0)
        return DEFAULT_HEARTBEAT_SECS
    return max(float(interval), MIN_HEARTBEAT_SECS)
