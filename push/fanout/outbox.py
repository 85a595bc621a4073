"""Per-connection send queue: the last step of the fan-out path.

The hub appends shared, already-encoded frames; a writer task exists only while the
queue has something in it, so an idle connection costs no task. The queue is bounded
(frames and bytes) because a client that stops reading must never hold memory or
delay anyone else: when it overflows, the connection is closed with 4002, unless the
frame belongs to a drop-oldest channel (tickers), in which case the oldest such
frame is dropped and the client sees the gap in ``seq``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from common import metrics
from push.wire.frames import data_frame

logger = logging.getLogger(__name__)

# Bound here: one global lookup per direct write instead of two.
_DIRECT_WRITES = metrics.DIRECT_WRITES

Send = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]

# Where the server does not push back (daphne), the writer pauses while the server has
# more than this many unsent bytes for the socket, and resumes below the second bound.
BACKLOG_PAUSE_BYTES = 256 * 1024
BACKLOG_RESUME_BYTES = 64 * 1024
BACKLOG_POLL_SECS = 0.01
# The most frames, and about the most bytes, written to a socket in one write when
# frames waited together (push_soon, deliveries_together); the hub's replay slices
# are bounded alike.
JOINED_WRITE_FRAMES = 50
JOINED_WRITE_BYTES = 256 * 1024


class _Together:
    """The outboxes holding frames until the end of one ``deliveries_together``.

    A callback or task started inside the block (a hub's repair, a store's recovery)
    copies the context, and this object with it, and may push long after the block
    ended: it is closed then, and such pushes go out as usual. (Without the flag they
    joined a list nobody would send, and waited for the connection's next push.)"""

    __slots__ = ("is_open", "outboxes")

    def __init__(self) -> None:
        self.is_open = True
        self.outboxes: list[Outbox] = []


_together: contextvars.ContextVar[_Together | None] = contextvars.ContextVar(
    "outbox_deliveries_together", default=None
)


def _open_together() -> _Together | None:
    together = _together.get()
    return together if together is not None and together.is_open else None


class _DeliveriesTogether:
    """Frames pushed inside go out at its end, each outbox's in one write.

    A committed batch of publishes is broadcast message by message, and a subscriber of
    a busy channel gets many of them: one system call each was most of what a delivery
    cost. Order is kept as ``push_soon`` keeps it (they share the frames in waiting).
    What waits is bounded by the batch, which the caller bounds (the write pipeline's
    ``PUSH_WRITE_BATCH_MAX_*``), and is sent in bounded runs (``_push_soon_now``):
    frames that would overflow a connection overflow it when they are sent, at the
    end. Inside another, it does nothing: that one sends.

    A class rather than a ``contextlib.contextmanager`` generator: a write batch's
    block cost 1.17 us that way, 0.61 us this way (a generator and its helper object
    less to make and step)."""

    __slots__ = ("_opened",)

    # What the block opened, set on entering it (no __init__: one call less): its
    # frames, and the token that restores the context; None inside another.
    _opened: tuple[_Together, contextvars.Token[_Together | None]] | None

    def __enter__(self) -> None:
        outer = _together.get()
        if outer is not None and outer.is_open:  # inside another: that one sends
            self._opened = None
        else:
            together = _Together()
            self._opened = together, _together.set(together)

    def __exit__(self, *exc_info: object) -> None:
        if self._opened is None:
            return
        together, token = self._opened
        together.is_open = False
        _together.reset(token)
        for outbox in together.outboxes:
            try:
                outbox._push_soon_now()
            except Exception as exc:  # a bug or a broken server: this connection fails
                metrics.FAN_OUT_FAILURES.inc()
                logger.error("sending held frames failed", exc_info=exc)
                outbox.fail(exc)


# Called as the function it was: ``with deliveries_together(): ...``.
deliveries_together = _DeliveriesTogether


class WriteFailed(Exception):
    """Raised (handed to ``on_send_failed``) when a write to a connection failed on our
    side (a broken direct write, a push that raised in the fan-out), as opposed to the
    server's ``send`` raising because the peer went away."""


class OutFrame:
    """One encoded frame, shared by all its recipients: as an ASGI send event, and as
    the WebSocket frame's bytes (built on first use) for writing to sockets directly."""

    __slots__ = ("_wire", "channel", "droppable", "event", "seq", "size")

    def __init__(
        self,
        event: dict[str, Any],
        size: int,
        droppable: bool = False,
        *,
        channel: str | None = None,
        seq: int | None = None,
    ) -> None:
        self.event = event
        self.size = size
        self.droppable = droppable
        # Which channel message this frame carries (None for replies and events): a
        # transport that tracks a cursor (SSE's ``id:``) reads it here.
        self.channel = channel
        self.seq = seq
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            event = self.event
            if event["type"] == "http.response.body":
                # One chunk of a chunked response body (an SSE event); never empty.
                body = event["body"]
                self._wire = b"%x\r\n%b\r\n" % (len(body), body)
            elif (payload := event.get("bytes")) is None:
                # A text frame is JSON, and a lone surrogate can only sit inside one of
                # its strings: written as the \ud800 escape it reads back as the same
                # string, where a strict encode would raise out of the fan-out loop.
                text = event["text"].encode("utf-8", "backslashreplace")
                self._wire = data_frame(text, binary=False)
            else:
                self._wire = data_frame(payload, binary=True)
        return self._wire


class Outbox:
    __slots__ = (
        "_closed",
        "_loop",
        "_queue",
        "_queued_bytes",
        "_send",
        "_soon",
        "_writer",
        "backlog_probe",
        "max_bytes",
        "max_frames",
        "on_drop",
        "on_overflow",
        "on_send_failed",
        "raw_writable",
        "raw_write",
    )

    def __init__(
        self,
        send: Send,
        *,
        max_frames: int,
        max_bytes: int,
        on_overflow: Callable[[], None],
        on_drop: Callable[[], None] | None = None,
        on_send_failed: Callable[[BaseException], None] | None = None,
        backlog_probe: Callable[[], int] | None = None,
        raw: tuple[Callable[[bytes], None], Callable[[], bool]] | None = None,
    ) -> None:
        self._send = send
        # Created on first use and dropped when drained: an empty deque is ~600 bytes,
        # and most connections are idle most of the time.
        self._queue: collections.deque[OutFrame] | None = None
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        # Frames of ``push_soon`` waiting for the end of this loop turn.
        self._soon: list[OutFrame] | None = None
        # The loop it is used on, asked for once (``_running_loop``).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.on_overflow = on_overflow
        self.on_drop = on_drop
        self.on_send_failed = on_send_failed
        # Bytes the server has accepted but not yet written to the socket, where the
        # server does not push back through ``send`` (daphne buffers without limit).
        self.backlog_probe = backlog_probe
        # Writing whole frames to the socket directly (see push.transport.server_adapters).
        self.raw_write: Callable[[bytes], None] | None
        self.raw_writable: Callable[[], bool] | None
        self.raw_write, self.raw_writable = raw if raw is not None else (None, None)

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def push(self, frame: OutFrame) -> bool:
        """Queue a frame; False when the connection is closed or was just overflowed."""
        if self._closed:
            return False
        together = _open_together()
        if together is not None:  # sent at the end of deliveries_together
            soon = self._soon
            if soon is None:
                self._soon = [frame]
                together.outboxes.append(self)
            else:
                soon.append(frame)
            return True
        if self._soon:  # sent before it, in the order they were pushed
            self._push_soon_now()
        queue = self._queue
        if self._writer is None and not queue:
            probe = self.backlog_probe
            if probe is None or probe() <= BACKLOG_PAUSE_BYTES:
                raw_writable = self.raw_writable
                if raw_writable is not None and raw_writable():
                    wire = None
                    try:  # free in Python 3.11 until something raises
                        wire = frame.wire
                        self.raw_write(wire)  # type: ignore[misc]  # set with raw_writable
                    except Exception as exc:
                        return self._raw_write_failed(frame, exc, attempted=wire is not None)
                    _DIRECT_WRITES.value += 1
                    return True
                return self._send_now(frame)
        if queue is None:
            queue = self._queue = collections.deque()
        full = len(queue) >= self.max_frames or (
            queue and self._queued_bytes + frame.size > self.max_bytes
        )
        if full and not (frame.droppable and self._drop_oldest_droppable()):
            # Refuse everything from now on: the connection is being dropped.
            self._closed = True
            self.on_overflow()
            return False
        queue.append(frame)
        self._queued_bytes += frame.size
        if self._writer is None:
            self._writer = self._running_loop().create_task(self._drain())
        return True

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this outbox is used on (a connection's, which stays on it), asked
        for once: ``asyncio.get_running_loop()`` makes a ``getpid()`` system call on
        Python 3.11, and a publish's answer asked for it on every write batch (py-spy:
        2% of the node's main thread under recent-only publishing)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def push_soon(self, frame: OutFrame) -> None:
        """``push`` at the end of this turn of the event loop, in one write with the
        other frames pushed meanwhile (a frame pushed now the usual way goes after
        them, so the order holds). A write batch answers many publishes of one
        connection in one turn: one system call for all of them, not one each."""
        if self._closed:
            return
        soon = self._soon
        if soon is None:
            self._soon = [frame]
            self._running_loop().call_soon(self._push_soon_now)
        else:
            soon.append(frame)

    def _push_soon_now(self) -> None:
        """Send what waits, in runs of at most ``JOINED_WRITE_FRAMES`` frames and about
        ``JOINED_WRITE_BYTES``: each run goes to the socket in one write while it takes
        data directly, and past that into the bounded queue, as frames pushed one by
        one would (a batch's deliveries to a stalled client never pass its bounds by
        more than one run)."""
        frames, self._soon = self._soon, None
        if not frames:
            return
        start = size = 0
        for index, frame in enumerate(frames):
            if index > start and (
                index - start >= JOINED_WRITE_FRAMES or size + frame.size > JOINED_WRITE_BYTES
            ):
                if not self.__push_many(frames[start:index]):
                    return
                start, size = index, 0
            size += frame.size
        self.__push_many(frames[start:])

    # The base class's push, for push_many to queue frames it was handed ready to send
    # (a subclass's push may rewrite a frame first: SSE's cursor).
    __push = push

    def push_many(self, frames: list[OutFrame]) -> bool:
        """``push`` each of ``frames`` in order, with one write to the socket for all of
        them when it takes data directly; False as soon as one is refused. The caller
        bounds the run (the hub's replay slices): all of it may land in the server's
        buffer, past its backlog bound.

        A replay hands over pages of history: a write per frame cost a system call (and
        the GIL given up and taken back) each, most of a replayed frame's cost."""
        if self._soon:
            self._push_soon_now()
        if len(frames) > 1 and self._writes_directly():
            try:
                data = b"".join([frame.wire for frame in frames])
            except Exception:  # one at a time below: push says which broke, and how
                data = None
            if data is not None:
                try:
                    self.raw_write(data)  # type: ignore[misc]  # set: _writes_directly
                except Exception as exc:
                    return self._raw_write_failed(frames[0], exc, attempted=True)
                _DIRECT_WRITES.value += len(frames)
                return True
        push = self.__push
        return all(push(frame) for frame in frames)

    __push_many = push_many

    def _writes_directly(self) -> bool:
        """True when ``push`` would write a frame to the socket now, not queue it."""
        if self._closed or self._writer is not None or self._queue:
            return False
        probe = self.backlog_probe
        if probe is not None and probe() > BACKLOG_PAUSE_BYTES:
            return False
        raw_writable = self.raw_writable
        return raw_writable is not None and raw_writable()

    def _send_now(self, frame: OutFrame) -> bool:
        """Hand the frame to the server within this call, without a task.

        Both servers' ``send`` complete without suspending while the socket takes data
        (uvicorn's waits only when its transport paused writing; daphne's never
        waits), so the coroutine is stepped by hand: a delivery then costs the write
        and nothing else, not a task and a loop turn per connection. If the server
        does make it wait, the rest of that send continues in the writer task.
        """
        coroutine = self._send(frame.event)
        try:
            waiting_on = coroutine.send(None)
        except StopIteration:
            return True
        except Exception as exc:  # the peer went away
            self._fail(exc)
            return False
        self._writer = self._running_loop().create_task(
            self._drain(_Resumed(coroutine, waiting_on))
        )
        return True

    def _raw_write_failed(self, frame: OutFrame, exc: Exception, *, attempted: bool) -> bool:
        """The direct write raised: this connection writes through the server from now
        on. If the frame never reached the socket, it goes through the server now;
        if the write itself failed, part of it may be on the wire, so the stream can
        no longer be trusted and the connection fails (1011 through ``on_send_failed``)."""
        self.raw_write = self.raw_writable = None
        _log_raw_write_failure(exc)
        if not attempted:
            metrics.DIRECT_WRITE_FAILURES.labels("fallback").inc()
            return self._send_now(frame)
        metrics.DIRECT_WRITE_FAILURES.labels("closed").inc()
        self.fail(exc)
        return False

    def fell_behind(self) -> None:
        """Close the connection as a full queue does (4002: "reconnect, resume with
        since"), for a client that can no longer be sent what it was promised: a
        replay whose history was trimmed under it after ``recovered: true``."""
        if self._closed:
            return
        self._closed = True
        self.on_overflow()

    def fail(self, exc: BaseException) -> None:
        """Writing to this connection broke (not the peer leaving): refuse and drop
        every frame, and tell the owner, who closes it."""
        failure = WriteFailed(str(exc))
        failure.__cause__ = exc
        self._fail(failure)

    def _fail(self, exc: BaseException) -> None:
        self._closed = True
        if self._queue is not None:
            self._queue.clear()
        if self.on_send_failed is not None:
            self.on_send_failed(exc)

    def _drop_oldest_droppable(self) -> bool:
        queue = self._queue
        if queue is None:
            return False
        for index, queued in enumerate(queue):
            if queued.droppable:
                del queue[index]
                self._queued_bytes -= queued.size
                if self.on_drop is not None:
                    self.on_drop()
                return True
        return False

    async def _drain(self, unfinished: _Resumed | None = None) -> None:
        send = self._send
        probe = self.backlog_probe
        queue = self._queue
        try:
            if unfinished is not None:
                await unfinished
                queue = self._queue
            while queue:
                if probe is not None and probe() > BACKLOG_PAUSE_BYTES:
                    await self._wait_for_backlog(probe)
                frame = queue.popleft()
                self._queued_bytes -= frame.size
                await send(frame.event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away mid-send
            self._fail(exc)
        finally:
            self._writer = None
            if self._queue is not None and not self._queue:
                self._queue = None

    async def _wait_for_backlog(self, probe: Callable[[], int]) -> None:
        """Hold frames here while the server's own buffer drains, so a reader that fell
        behind fills this bounded queue (and meets its limits) instead of the server's."""
        while not self._closed and probe() > BACKLOG_RESUME_BYTES:
            await asyncio.sleep(BACKLOG_POLL_SECS)

    async def flush(self, deadline_secs: float) -> None:
        """Wait until every queued frame was handed to the server, or the deadline."""
        writer = self._writer
        if writer is not None:
            await asyncio.wait({writer}, timeout=deadline_secs)

    def discard(self) -> None:
        """Close the queue: drop what is queued and stop the writer."""
        self._closed = True
        if self._queue is not None:
            self._queue.clear()
            self._queue = None
        self._queued_bytes = 0
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None

    def seal(self) -> None:
        """Refuse new frames but let the queued ones be sent."""
        if self._soon:
            self._push_soon_now()
        self._closed = True


_raw_failure_logged = False


def _log_raw_write_failure(exc: Exception) -> None:
    """With a traceback once per process (it is a bug or an untested server), then
    quietly: a failure that repeats for every connection must not flood the log."""
    global _raw_failure_logged
    if _raw_failure_logged:
        logger.debug("direct write failed: %r", exc)
        return
    _raw_failure_logged = True
    logger.warning("direct write failed; writing through the server instead", exc_info=exc)


class _Resumed:
    """Awaits the rest of a coroutine that was stepped by hand and then suspended:
    what ``yield from`` does, for a coroutine already started."""

    __slots__ = ("coroutine", "waiting_on")

    def __init__(self, coroutine: Any, waiting_on: Any) -> None:
        self.coroutine = coroutine
        self.waiting_on = waiting_on

    def __await__(self) -> Any:
        coroutine = self.coroutine
        to_yield = self.waiting_on
        while True:
            try:
                sent = yield to_yield
            except BaseException as exc:  # cancellation included: pass it in
                try:
                    to_yield = coroutine.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                to_yield = coroutine.send(sent)
            except StopIteration as stop:
                return stop.value
