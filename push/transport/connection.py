"""One client connection's state: its wire format, outbox and subscriptions.

The consumer owns one of these per WebSocket. Replies and pushed messages share the
outbox, so a client always receives them in the order the server produced them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from common import metrics
from common.background import spawn
from common.conf import push_settings
from common.errors import CloseCode, PushError
from push.fanout.hub import HistoryBudget, Subscription
from push.fanout.outbox import Outbox, OutFrame, Send
from push.transport.limits import NO_LIMIT, AddressBoundRate, NoLimit, RateLimiter, TokenBucket
from push.transport.server_adapters import (
    allow_slow_close,
    close_with_any_code,
    daphne_backlog_probe,
    drop_if_still_open,
    peer_gone_probe,
    raw_writer,
)
from push.wire.codecs import Codec, WireMessage
from push.wire.protocol import RequestId, error

if TYPE_CHECKING:
    from accounts.principals import Principal
    from push.cluster.address_budgets import AddressBudget

logger = logging.getLogger(__name__)

# How long a closing connection may take to hand its queued frames to the server.
CLOSE_FLUSH_SECS = 2.0


def frame_rate_limiter(principal: Principal) -> TokenBucket | NoLimit:
    """The client frame rate (``PUSH_RATE_*``) binds users and anonymous clients; a
    service token is a back-end publishing for many of them, bound by its own
    ``PUSH_SERVICE_RATE_*`` (0 per second: unbounded)."""
    if principal.kind == "service":
        if push_settings.SERVICE_RATE_PER_SEC <= 0:
            return NO_LIMIT
        return TokenBucket(push_settings.SERVICE_RATE_BURST, push_settings.SERVICE_RATE_PER_SEC)
    return TokenBucket(push_settings.RATE_BURST, push_settings.RATE_PER_SEC)


class ConnectionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class InvalidTransition(RuntimeError):
    """Raised when a connection is moved to a state it cannot reach from its current one."""


class ClientConnection:
    # The outbox kind: a transport with its own framing per subscriber (SSE) swaps it.
    outbox_class: type[Outbox] = Outbox
    # Slots: tens of thousands of these live on a node; a __dict__ each is ~1 KB more.
    __slots__ = (
        "_gone_probe",
        "_loop",
        "_on_closing",
        "_send",
        "address_budget",
        "close_code",
        "codec",
        "connection_id",
        "ip",
        "last_seen",
        "opened_at",
        "outbox",
        "principal",
        "rate",
        "rate_limited_frames",
        "released_channels",
        "state",
        "subscriptions",
        "token_expiry",
    )
    # A receive-only stream (SSE) cannot subscribe again: once the server ended its
    # last subscription (revoked), it ends too.
    ends_without_subscriptions = False

    def __init__(
        self,
        *,
        send: Send,
        codec: Codec,
        principal: Principal,
        ip: str | None = None,
        on_closing: Any = None,
    ) -> None:
        self.connection_id = uuid.uuid4()
        self.codec = codec
        self.principal = principal
        self.ip = ip
        self.rate: RateLimiter = frame_rate_limiter(principal)
        self.rate_limited_frames = 0
        self.address_budget: AddressBudget | None = None
        # When the client last sent anything; silence past the heartbeat timeout is 4001.
        self.last_seen = self.opened_at = time.monotonic()
        self.state = ConnectionState.OPEN
        self.close_code: int | None = None
        self.subscriptions: dict[str, Subscription] = {}
        # What ``subscriptions`` held when the node released them (its close began).
        self.released_channels: tuple[str, ...] = ()
        # Channel -> expiry (Unix seconds) of the signed subscription token that granted
        # it; None until one does, which most connections never see.
        self.token_expiry: dict[str, float] | None = None
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._on_closing = on_closing
        self.outbox = self._make_outbox(send)
        self._gone_probe = peer_gone_probe(send)

    def _make_outbox(self, send: Send) -> Outbox:
        return self.outbox_class(
            send,
            max_frames=push_settings.SEND_QUEUE_MAX_FRAMES,
            max_bytes=push_settings.SEND_QUEUE_MAX_BYTES,
            on_overflow=self._on_overflow,
            on_drop=metrics.DROPPED_FRAMES.inc,
            on_send_failed=self._on_send_failed,
            backlog_probe=daphne_backlog_probe(send),
            raw=raw_writer(send) if push_settings.DIRECT_WRITES else None,
        )

    def bind_address_budget(self, budget: AddressBudget) -> None:
        """Hold the budget of the client's address (the node binds it on admission, for
        users and anonymous clients): every frame then takes from this connection's
        bucket and from the address's, so one address cannot multiply its rate by
        opening connections. Refusals look the same (``RATE_LIMITED``, then 1008)."""
        self.address_budget = budget
        self.rate = AddressBoundRate(self.rate, budget.frames)

    @property
    def history_budget(self) -> HistoryBudget:
        """The history bytes its address may still read (none bound: not held to one)."""
        budget = self.address_budget
        return NO_LIMIT if budget is None else budget.history_bytes

    @property
    def is_open(self) -> bool:
        return self.state is ConnectionState.OPEN

    @property
    def gone(self) -> bool:
        """True once nothing sent to this connection can reach the client (closing,
        closed, or the server saw the client leave): long work on its behalf stops."""
        if self.state is not ConnectionState.OPEN or self.outbox.closed:
            return True
        probe = self._gone_probe
        return probe is not None and probe()

    def send_envelope(self, envelope: dict[str, Any]) -> None:
        payload = self.codec.encode(envelope)
        self.outbox.push(OutFrame(self.codec.send_event(payload), len(payload)))

    def send_published_soon(self, message: WireMessage, request_id: RequestId | None) -> None:
        """The ``published`` acknowledgement of ``message``, written at the end of this
        turn of the event loop together with whatever else was sent so meanwhile
        (``Outbox.push_soon``)."""
        payload = self.codec.encode_published(message, request_id)
        self.outbox.push_soon(OutFrame(self.codec.send_event(payload), len(payload)))

    def send_error(
        self, exc: PushError, request_id: RequestId | None, *, channel: str | None = None
    ) -> None:
        metrics.ERRORS.labels(exc.code.value).inc()
        self.send_envelope(
            error(code=exc.code, message=exc.message, request_id=request_id, channel=channel)
        )

    def check_silence(self, now: float, cutoff: float) -> int:
        """Our protocol's rule: nothing received since ``cutoff`` (the heartbeat
        timeout) closes the connection with 4001."""
        if self.last_seen >= cutoff:
            return 0
        self.close(CloseCode.HEARTBEAT_TIMEOUT)
        return 1

    def close(self, code: int) -> None:
        """Close after the frames already queued (an error reply, say) are sent."""
        if self.state is not ConnectionState.OPEN:
            return
        self._transition(ConnectionState.CLOSING, code)
        self.outbox.seal()
        spawn(self._flush_and_close(code), name="push-close", loop=self._loop)

    def abort(self, code: int) -> None:
        """Close at once, dropping whatever is queued (slow consumer, drain deadline)."""
        if self.state is not ConnectionState.OPEN:
            return
        self._transition(ConnectionState.CLOSING, code)
        self.outbox.discard()
        spawn(self._send_close(code), name="push-close", loop=self._loop)

    def drop(self) -> None:
        """Let go of the socket now, read or not (the drain's deadline has passed):
        otherwise a client that never reads holds uvicorn's shutdown for
        ``PUSH_CLOSE_TIMEOUT_SECS`` more."""
        drop_if_still_open(self._send, 0)

    def mark_closed(self, code: int | None) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        if self.close_code is None:
            self.close_code = code
        self.state = ConnectionState.CLOSED
        self.outbox.discard()

    def _transition(self, new_state: ConnectionState, code: int) -> None:
        if self.state is not ConnectionState.OPEN:
            raise InvalidTransition(f"{self.state} -> {new_state}")
        self.state = new_state
        self.close_code = code
        if self._on_closing is not None:
            self._on_closing(self)

    async def _flush_and_close(self, code: int) -> None:
        await self.outbox.flush(CLOSE_FLUSH_SECS)
        await self._send_close(code)

    async def _send_close(self, code: int) -> None:
        allow_slow_close(self._send, push_settings.CLOSE_TIMEOUT_SECS)
        drop_if_still_open(self._send, push_settings.CLOSE_TIMEOUT_SECS)
        if close_with_any_code(self._send, int(code)):
            return
        try:
            # int(): daphne's WebSocket library refuses an IntEnum as a close code.
            await self._send({"type": "websocket.close", "code": int(code)})
        except Exception as exc:  # already gone
            logger.debug("close of %s failed: %s", self.connection_id, exc)

    def _on_overflow(self) -> None:
        # Called from inside the fan-out loop: never change subscriptions here.
        if self.state is ConnectionState.OPEN:
            metrics.SLOW_CONSUMER_DISCONNECTS.inc()
            self._loop.call_soon(self.abort, CloseCode.SLOW_CONSUMER)

    def _on_send_failed(self, exc: BaseException) -> None:
        logger.debug("send to %s failed: %r", self.connection_id, exc)
        if isinstance(exc, OSError):
            return  # the peer went away (uvicorn's ClientDisconnected is one): its
            # disconnect is on the way and ends the connection
        # Anything else (a frame the server could not encode, a broken write): the
        # outbox refuses every frame from now on, and a connection left open would
        # look subscribed and receive nothing, so it is closed (1011: reconnect and
        # resume). Called from inside the fan-out loop, like _on_overflow: deferred.
        if self.state is ConnectionState.OPEN:
            self._loop.call_soon(self.abort, CloseCode.SERVER_ERROR)
