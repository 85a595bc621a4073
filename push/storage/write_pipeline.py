"""Group commit: the node's one write pipeline, through which every publish is stored.

Publishes arriving on the node queue here; one task writes them in batches, each in
one transaction (``push.storage.write_batch``), on its own PostgreSQL connection on the
event loop (``push.storage.pipelined_connection``, libpq's pipeline mode). An idle node
writes a lone publish at once, a busy one writes what queued meanwhile, up to a cap in
messages and bytes. A transaction costs mostly its round trips and its commit (a WAL
flush), which all the publishes of a batch share: measured here (2 busy cores), 2.2 ms
for 1 publish, 8.4 ms for 100, 49 ms for 1,000. That is what lets a node acknowledge
more publishes per second than PostgreSQL commits transactions.

A batch is sent while the one before it is still committing (``BATCHES_IN_FLIGHT``),
on the same connection, so the database starts on it the moment the one before
committed while the node answers and broadcasts that one. PostgreSQL runs them in the
order sent, and nothing sent behind a failing statement runs (it skips everything up to
a Sync, which only recovery sends): a batch behind one that failed goes back to the
head of the queue and is written after that one's retry, so no channel's publishes
change order however a batch fails.

Each publisher is answered only after its message committed, and committed messages
go to ``on_committed`` (the node's broadcast) in seq order per channel. Batches with
idempotency keys take statements that read each other's rows; they are written alone,
once the batches in flight are answered.

Failures:
- the database refuses data (a constraint, a bad value): the batch is split in
  halves and each retried, so only the publish that caused it fails;
- the connection ended by the server while idle (PostgreSQL restarted): seen before
  the next batch is sent on it (the server's farewell is waiting to be read), and the
  batch is written on a new connection; for a batch written alone, lost after BEGIN but
  before the COMMIT left: nothing was stored, and the batch is written on a new
  connection;
- PostgreSQL unreachable: the batch and everything queued are answered UNAVAILABLE
  at once, and the next publish connects again (with a bounded connect timeout, so
  nobody waits long for a dead server); a connection that stops answering is given
  up after the write timeout;
- the connection lost (or given up after the write timeout) with batches in flight:
  each may or may not be stored, and each is answered UNAVAILABLE, never
  "published". A client that must not publish twice retries with an
  ``Idempotency-Key`` (REST), which returns the first result if the commit did happen;
- the queue full (count or bytes): new publishes are refused UNAVAILABLE instead of
  queueing without bound;
- a channel's row locked by another transaction (application code publishing inside a
  long transaction holds it until its commit): a batch waits at most
  ``LOCK_WAIT_SECS`` for it, then is split like a refused one, and the publishes of
  that channel leave the pipeline for a slow lane, written one at a time on the
  database threads where waiting on the lock holds up nobody else. Once a channel is
  in the slow lane, its later publishes follow it there, so they keep their order.
  Each is answered UNAVAILABLE ("the channel is busy") unless it is written within the
  write timeout of entering the lane, its wait behind the others included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from django.db import DataError, IntegrityError, OperationalError, connection, transaction
from psycopg import errors as pg_errors
from psycopg import pq

from common import metrics
from common.background import Wakeup, spawn
from common.db import closed_by_server, db_call
from common.errors import ErrorCode, PushError
from push.fanout.message import ChannelMessage
from push.fanout.outbox import deliveries_together
from push.storage.pipelined_connection import GENERIC_PLANS, PipelinedConnection, Results
from push.storage.write_batch import (
    POSTGRESQL_BINARY_ARRAYS,
    BatchOutcome,
    Outcome,
    Plan,
    PublishUnit,
    batch_plan,
    now_micros,
    run_plan_sync,
)

logger = logging.getLogger(__name__)

# Observed on the event loop's thread only, so without prometheus' lock (~1 us less
# per observation): the same series and values (``common.metrics``).
_BATCH_MESSAGES = metrics.loop_histogram_writer(metrics.WRITE_BATCH_MESSAGES)
_BATCH_SECONDS = metrics.loop_histogram_writer(metrics.WRITE_BATCH_SECONDS)

# A deadlock or serialization failure is retried this many times, then answered
# UNAVAILABLE (the seq upsert takes rows in one order, so neither is expected).
TRANSIENT_RETRIES = 3
# How long a batch waits for a channel row another transaction holds. Measured here, a
# batch of 1,000 publishes commits in ~50 ms, so another node's batch never waits this
# long; only a foreign transaction does, and it then holds up the batch no longer.
LOCK_WAIT_SECS = 0.2
# Batches sent before the oldest of them is answered. PostgreSQL runs one connection's
# statements one after another, so two commits never overlap; what overlaps is the
# database's work on the next batch and the node's on the last one's answers and
# broadcast, and the round trip between them is gone. A third is sent only with at
# least ``THIRD_BATCH_MIN_MESSAGES`` waiting: at publish max (WebSocket publishers, 128
# in flight) it kept the node busier (0.88-0.91 of a core against 0.86-0.87, +9%
# publishes/s over four alternating pairs), while for 16 REST requests at a time it only
# split their batches smaller, each with its own transaction and Redis calls (-12% and
# -18% requests/s in two pairs).
BATCHES_IN_FLIGHT = 3
BATCHES_IN_FLIGHT_ALWAYS = 2  # whatever waits; the third only past the threshold
THIRD_BATCH_MIN_MESSAGES = 32


def _write_waiting_for_locks(
    unit: PublishUnit, *, window_secs: int, lock_wait_secs: float
) -> BatchOutcome:
    """One unit through Django's connection (on a database thread), waiting up to
    ``lock_wait_secs`` for its channels' rows, then UNAVAILABLE (nothing stored)."""
    # (At least 1 ms: a lock_timeout of 0 waits for ever.)
    lock_timeout = f"{max(1, int(lock_wait_secs * 1000))}ms"
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('lock_timeout', %s, true)", [lock_timeout])
            return run_plan_sync([unit], window_secs=window_secs)
    except OperationalError as exc:
        if isinstance(exc.__cause__, pg_errors.LockNotAvailable):
            # Not the database failing: what a held lock answers (and nothing to log).
            raise PushError(ErrorCode.UNAVAILABLE, "the channel is busy; retry") from exc
        raise


_write_slowly = db_call(_write_waiting_for_locks)


def _channels_of(unit: PublishUnit) -> set[str]:
    return {channel for channel, _ in unit.items}


class _Queued:
    __slots__ = ("future", "slow", "unit")

    def __init__(self, unit: PublishUnit, future: asyncio.Future[Outcome]) -> None:
        self.unit = unit
        self.future = future
        # Handed to the slow lane, which answers it (see ``_answered_if_it_fails``).
        self.slow = False


class _Sent:
    """A batch sent behind the others: BEGIN, its one statement, COMMIT."""

    __slots__ = ("batch", "plan", "started")

    # Result sets a sent batch gets back: BEGIN's, the statement's, COMMIT's.
    RESULTS = 3

    def __init__(self, batch: list[_Queued], plan: Plan) -> None:
        self.batch = batch
        self.plan = plan
        self.started = time.perf_counter()


def _keyed(batch: list[_Queued]) -> bool:
    return any(queued.unit.key_scope is not None for queued in batch)


class WritePipeline:
    def __init__(
        self,
        *,
        conninfo: dict[str, Any],
        on_committed: Callable[[ChannelMessage], None],
        window_secs: int,
        max_batch_messages: int,
        max_batch_bytes: int,
        max_queue_messages: int,
        max_queue_bytes: int,
        connect_timeout_secs: float,
        write_timeout_secs: float,
        prepared: bool = True,
    ) -> None:
        self._conninfo = conninfo
        # Statements prepared once per connection (see push.storage.pipelined_connection).
        self._prepared = prepared
        self._on_committed = on_committed
        self._window_secs = window_secs
        self._max_batch_messages = max_batch_messages
        self._max_batch_bytes = max_batch_bytes
        self._max_queue_messages = max_queue_messages
        self._max_queue_bytes = max_queue_bytes
        self._connect_timeout_secs = connect_timeout_secs
        self._write_timeout_secs = write_timeout_secs
        self._queue: deque[_Queued] = deque()
        self._queued_messages = 0
        self._queued_bytes = 0
        self._wakeup = Wakeup()
        self._link: PipelinedConnection | None = None
        self._task: asyncio.Task[None] | None = None
        # Batches sent and not yet answered, oldest first.
        self._in_flight: deque[_Sent] = deque()
        # A batch with idempotency keys, waiting for those in flight to be answered: its
        # statements depend on each other's rows, so it is written alone.
        self._held: list[_Queued] | None = None
        # When the connection is given up unless the deadline is armed again or
        # disarmed first (loop time), and which; the timer that will look at it.
        self._deadline: tuple[float, PipelinedConnection] | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        # Channel -> the last slow-lane write of it: a channel is in the slow lane while
        # this is pending, and each of its slow writes waits for the one before.
        self._slow: dict[str, asyncio.Future[None]] = {}
        self._slow_waiting = 0
        self._unreachable = False
        self._writing_alone = False
        self._stopping = False
        self._commit_sent = False

    @property
    def _connection(self) -> psycopg.AsyncConnection[Any] | None:
        return None if self._link is None else self._link.connection

    # ----- the publishers' side ------------------------------------------------------

    def submit(self, unit: PublishUnit) -> asyncio.Future[Outcome]:
        """Queue ``unit``; the future resolves once it committed or failed.

        Raises UNAVAILABLE at once when the queue is full: a node that cannot keep up
        says so instead of holding memory and publishers without bound."""
        if self._stopping or self._task is None or self._task.done():
            raise PushError(ErrorCode.UNAVAILABLE, "the node is not accepting publishes")
        count = len(unit.items)
        if self._queue and (
            self._queued_messages + count > self._max_queue_messages
            or self._queued_bytes + unit.nbytes > self._max_queue_bytes
        ):
            metrics.PUBLISHES_REFUSED.labels("overloaded").inc()
            raise PushError(ErrorCode.UNAVAILABLE, "the node is overloaded; retry later")
        # The writer's loop is the caller's (the node's): asking asyncio for the running
        # loop costs a system call (common.background.loop_runs_here).
        future: asyncio.Future[Outcome] = self._task.get_loop().create_future()
        self._queue.append(_Queued(unit, future))
        self._queued_messages += count
        self._queued_bytes += unit.nbytes
        if self._room_for_another():  # else the writer has nothing to send
            self._wakeup.set()
        return future

    def _room_for_another(self) -> bool:
        """Whether the writer may send another batch now (``BATCHES_IN_FLIGHT``)."""
        in_flight = len(self._in_flight)
        return in_flight < BATCHES_IN_FLIGHT_ALWAYS or (
            in_flight < BATCHES_IN_FLIGHT and self._queued_messages >= THIRD_BATCH_MIN_MESSAGES
        )

    async def publish(self, unit: PublishUnit) -> Outcome:
        # A publisher that goes away (its task cancelled) cancels only its own future:
        # the batch it is in is written all the same, and nobody is answered.
        return await self.submit(unit)

    # ----- the writer --------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="push-writes")

    @property
    def _writing(self) -> bool:
        return bool(self._in_flight) or self._writing_alone

    async def stop(self) -> None:
        task = self._task
        self._stopping = True
        self._fail_queued(PushError(ErrorCode.UNAVAILABLE, "the node is stopping"))
        if task is not None and not task.done():
            # Batches being written are let finish: cancelled during COMMIT, their
            # publishers would never learn what happened. (Only on the task's own loop:
            # tests may stop a node from another one.)
            if self._writing and task.get_loop() is asyncio.get_running_loop():
                self._wakeup.set()
                await asyncio.wait({task}, timeout=self._write_timeout_secs)
            task.cancel()
        stopping = PushError(ErrorCode.UNAVAILABLE, "the node is stopping")
        self._answer_in_flight(stopping)
        # Batches sent behind one that failed while the writer finished went back to
        # the queue after it was answered above, and no writer is left to send them.
        self._fail_queued(stopping)
        if self._held is not None:
            self._answer_all(self._held, stopping)
            self._held = None
        await self._close_connection()

    async def _run(self) -> None:
        """Send batches while fewer than ``BATCHES_IN_FLIGHT`` wait for their COMMIT,
        and answer each as its results come, oldest first."""
        while not self._stopping or self._in_flight:
            self._wakeup.clear()
            try:
                await self._step()
            except Exception:  # a bug: answer, log, and keep the node's writes going
                logger.exception("write pipeline: a batch failed")
                self._answer_in_flight(PushError(ErrorCode.UNAVAILABLE, "the write failed"))
                await self._close_connection()
                self._writing_alone = False

    async def _step(self) -> None:
        link = self._link
        if (
            self._in_flight
            and link is not None
            and (link.available() >= _Sent.RESULTS or link.error is not None)
        ):
            await self._settle_oldest(link)
        elif self._held is not None and not self._in_flight:
            batch, self._held = self._held, None
            self._writing_alone = True
            try:
                with _answered_if_it_fails(batch):
                    await self._write(batch)
            finally:
                self._writing_alone = False
        elif (
            self._queue
            and self._held is None
            and not self._stopping
            and self._room_for_another()
            and (link is None or link.error is None or not self._in_flight)
        ):
            await self._send_next()
        else:
            await self._wakeup.wait()

    def _take_batch(self) -> list[_Queued]:
        batch: list[_Queued] = []
        messages = nbytes = 0
        while self._queue:
            head = self._queue[0]
            count = len(head.unit.items)
            # A unit is never split; one larger than the cap is written alone.
            if batch and (
                messages + count > self._max_batch_messages
                or nbytes + head.unit.nbytes > self._max_batch_bytes
            ):
                break
            self._queue.popleft()
            batch.append(head)
            messages += count
            nbytes += head.unit.nbytes
        self._queued_messages -= messages
        self._queued_bytes -= nbytes
        return batch

    def _requeue(self, batches: list[list[_Queued]]) -> None:
        """Put batches sent but never executed back at the head of the queue, in order."""
        for batch in reversed(batches):
            for queued in reversed(batch):
                self._queue.appendleft(queued)
                self._queued_messages += len(queued.unit.items)
                self._queued_bytes += queued.unit.nbytes

    # ----- batches sent one behind the other -------------------------------------------

    async def _send_next(self) -> None:
        batch = self._take_batch()
        if self._slow:
            batch = self._divert_slow(batch)
        if not batch:
            return
        if _keyed(batch):
            self._held = batch
            return
        with _answered_if_it_fails(batch):
            await self._send(batch)

    async def _send(self, batch: list[_Queued]) -> None:
        link = self._link
        if not self._in_flight:
            # Nothing is due on the connection: replace it if it broke meanwhile.
            link = await self._connect_or_answer(batch)
            if link is None:
                return
        assert link is not None
        units = []
        messages = 0
        for queued in batch:
            units.append(queued.unit)
            messages += len(queued.unit.items)
        plan = batch_plan(
            units,
            micros=now_micros(),
            window_secs=self._window_secs,
            dialect=POSTGRESQL_BINARY_ARRAYS,
        )
        statement = next(plan)
        if not statement.final:  # a batch without keys is one statement (write_batch)
            raise RuntimeError("a batch without keys took more than one statement")
        # In flight from here: if the connection fails while it is sent, whether the
        # COMMIT reached the server is unknown.
        self._in_flight.append(_Sent(batch, plan))
        link.send("BEGIN")
        link.send(statement.sql, statement.params, prepare=self._prepared, types=statement.types)
        link.send("COMMIT")
        link.flush()
        _BATCH_MESSAGES.observe(messages)
        if len(self._in_flight) == 1:
            self._arm_deadline(link)

    async def _settle_oldest(self, link: PipelinedConnection) -> None:
        """Answer the oldest batch in flight from its results."""
        if link.available() < _Sent.RESULTS:
            # The connection failed before they came: each may or may not have
            # committed, so none is acknowledged (see the module's docstring).
            assert link.error is not None
            self._lose_in_flight(link.error)
            await self._close_connection()
            return
        sent = self._in_flight.popleft()
        results = [link.take() for _ in range(_Sent.RESULTS)]
        self._disarm_deadline()
        if self._in_flight:
            self._arm_deadline(link)
        try:
            for result in results:
                link.check(result)
        except psycopg.Error as exc:
            # PostgreSQL skipped the batches sent behind this one: they go back to the
            # head of the queue, behind this one's retry, so every channel keeps its
            # order whatever happens to this one (split, slow lane, retried).
            behind = [later.batch for later in self._in_flight]
            if self._held is not None:
                # Taken from the queue after those: written before them (it is written
                # once nothing is in flight), it would overtake their publishes.
                behind.append(self._held)
                self._held = None
            self._in_flight.clear()
            self._disarm_deadline()
            self._requeue(behind)
            self._writing_alone = True
            try:
                with _answered_if_it_fails(sent.batch):
                    await self._recover(link)
                    await self._write_on(link, sent.batch, failed=exc)
            except (psycopg.Error, OSError, TimeoutError) as lost:
                self._lose([sent.batch], lost)
                await self._close_connection()
            finally:
                self._writing_alone = False
            return
        outcome = _finished(sent.plan, link.rows(results[1]))
        _BATCH_SECONDS.observe(time.perf_counter() - sent.started)
        self._committed(sent.batch, outcome)

    def _lose_in_flight(self, exc: BaseException) -> None:
        batches = [sent.batch for sent in self._in_flight]
        self._in_flight.clear()
        self._disarm_deadline()
        self._lose(batches, exc)

    def _lose(self, batches: list[list[_Queued]], exc: BaseException) -> None:
        for batch in batches:
            logger.warning("write pipeline: batch of %d lost: %r", len(batch), exc)
            metrics.WRITE_BATCHES_FAILED.labels("unavailable").inc()
            self._answer_all(batch, _outcome_unknown(exc))

    async def _recover(self, link: PipelinedConnection) -> None:
        """After a failed statement: skip the results of what PostgreSQL skipped, and
        roll the failed transaction back, so the connection is clean for the retry."""
        link.recover()
        self._arm_deadline(link)
        try:
            while (await link.next())[0].status != pq.ExecStatus.PIPELINE_SYNC:
                pass
            link.check(await link.next())  # the ROLLBACK's
        finally:
            self._disarm_deadline()

    def _arm_deadline(self, link: PipelinedConnection) -> None:
        """A connection whose packets vanish (no reset, no answer) would hold the whole
        node's writes: past ``write_timeout_secs`` from now it is closed, which fails
        whatever still waits on it (unless armed again or disarmed before).

        It is armed again for every batch settled while others are in flight, so the
        timer is not made again each time (a cancel and a new timer cost 0.6-2 us): the
        one timer comes no later than the deadline in force, and when it comes early
        (the deadline moved since), it waits on for the deadline then in force."""
        loop = asyncio.get_running_loop()
        self._deadline = (loop.time() + self._write_timeout_secs, link)
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(self._deadline[0], self._deadline_passed)

    def _disarm_deadline(self) -> None:
        self._deadline = None  # the timer, if any, finds nothing to do

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if self._deadline is None:
            return
        when, link = self._deadline
        loop = asyncio.get_running_loop()
        if loop.time() < when:
            self._deadline_timer = loop.call_at(when, self._deadline_passed)
            return
        self._deadline = None
        link.close(TimeoutError("the write timed out"))

    def _drop_deadline_timer(self) -> None:
        """No timer left waiting (the connection is closed): it would hold this
        pipeline until it came."""
        self._disarm_deadline()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    # ----- batches written alone: keyed ones, and the retries after a failure ----------

    async def _write(self, batch: list[_Queued]) -> None:
        link = await self._connect_or_answer(batch)
        if link is not None:
            await self._write_on(link, batch)

    async def _connect_or_answer(self, batch: list[_Queued]) -> PipelinedConnection | None:
        """The connection to write ``batch`` on; None if PostgreSQL cannot be reached,
        ``batch`` and everything queued then answered UNAVAILABLE."""
        try:
            return await self._connect()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if not self._unreachable:  # once per outage, not once per batch
                logger.warning("write pipeline: cannot connect to PostgreSQL: %s", exc)
            self._unreachable = True
            metrics.WRITE_BATCHES_FAILED.labels("unavailable").inc()
            unavailable = _unavailable(exc)
            self._answer_all(batch, unavailable)
            # Nothing queued now can be written sooner: answer it at once too.
            self._fail_queued(unavailable)
            return None

    async def _write_on(
        self,
        link: PipelinedConnection,
        batch: list[_Queued],
        *,
        failed: psycopg.Error | None = None,
    ) -> None:
        """Write ``batch`` alone; ``failed``: the error its first attempt already met."""
        if self._slow:
            batch = self._divert_slow(batch)
            if not batch:
                return
        reconnected = False
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                if failed is not None:
                    error, failed = failed, None
                    raise error
                outcome = await self._bounded_transaction(link, [q.unit for q in batch])
            except (pg_errors.IntegrityError, pg_errors.DataError) as exc:
                metrics.WRITE_BATCHES_FAILED.labels("refused").inc()
                await self._split(batch, exc)
                return
            except pg_errors.LockNotAvailable:
                metrics.WRITE_BATCHES_FAILED.labels("locked").inc()
                if len(batch) == 1:
                    self._to_slow_lane(batch[0])
                    return
                middle = len(batch) // 2
                await self._write(batch[:middle])
                await self._write(batch[middle:])
                return
            except pg_errors.TransactionRollback as exc:
                if attempt < TRANSIENT_RETRIES:
                    continue
                metrics.WRITE_BATCHES_FAILED.labels("conflict").inc()
                self._answer_all(batch, _unavailable(exc))
                return
            except (psycopg.Error, OSError, TimeoutError) as exc:
                await self._close_connection()
                # (Not after a timeout: that path is not healthy, answer at once.)
                if not (self._commit_sent or reconnected or isinstance(exc, TimeoutError)):
                    # The COMMIT never left, so nothing was stored: a connection that
                    # broke while idle (PostgreSQL restarted) costs a reconnect, not
                    # the batch.
                    reconnected = True
                    try:
                        link = await self._connect()
                        continue
                    except (psycopg.Error, OSError, TimeoutError):
                        self._fail_queued(_unavailable(exc))
                # Lost or timed out, maybe during COMMIT: the outcome is unknown, so
                # nothing of this batch is acknowledged (see the module's docstring).
                self._lose([batch], exc)
                return
            self._committed(batch, outcome)
            return

    async def _split(self, batch: list[_Queued], exc: psycopg.Error) -> None:
        """Write the halves apart, so only the publish the database refused fails."""
        if len(batch) == 1:
            detail = exc.diag.message_primary or type(exc).__name__
            logger.info("write pipeline: publish refused by the database: %s", detail)
            self._answer(
                batch[0],
                PushError(ErrorCode.INVALID_MESSAGE, f"the database refused this: {detail}"),
            )
            return
        middle = len(batch) // 2
        await self._write(batch[:middle])
        await self._write(batch[middle:])

    # ----- the slow lane: channels whose row another transaction holds ----------------

    def _divert_slow(self, batch: list[_Queued]) -> list[_Queued]:
        """Send the units of channels in the slow lane after their earlier publishes
        (so a channel's publishes keep their order); the rest stay in the batch."""
        kept = []
        for queued in batch:
            if _channels_of(queued.unit) & self._slow.keys():
                self._to_slow_lane(queued)
            else:
                kept.append(queued)
        return kept

    def _to_slow_lane(self, queued: _Queued) -> None:
        if self._slow_waiting >= self._max_queue_messages:
            # Bounded like the queue: publishes piling up behind a held lock are refused.
            metrics.PUBLISHES_REFUSED.labels("locked").inc()
            self._answer(queued, PushError(ErrorCode.UNAVAILABLE, "the channel is busy; retry"))
            return
        self._slow_waiting += 1
        queued.slow = True
        channels = _channels_of(queued.unit)
        before = [self._slow[c] for c in channels if c in self._slow]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        for channel in channels:
            self._slow[channel] = done
        # Its wait behind the publishes ahead of it counts: each of those may wait the
        # write timeout on the same lock, and the n-th publisher would wait n of them.
        deadline = loop.time() + self._write_timeout_secs
        spawn(self._write_slow(queued, before, done, deadline), name="push-slow-write")

    async def _write_slow(
        self,
        queued: _Queued,
        before: list[asyncio.Future[None]],
        done: asyncio.Future[None],
        deadline: float,
    ) -> None:
        try:
            for earlier in before:
                await earlier
            try:
                lock_wait_secs = deadline - asyncio.get_running_loop().time()
                if lock_wait_secs <= 0:
                    raise PushError(ErrorCode.UNAVAILABLE, "the channel is busy; retry")
                outcome = await _write_slowly(
                    queued.unit, window_secs=self._window_secs, lock_wait_secs=lock_wait_secs
                )
            except PushError as exc:  # UNAVAILABLE: the lock was held past the timeout
                self._answer(queued, exc)
            except (IntegrityError, DataError) as exc:
                self._answer(
                    queued,
                    PushError(ErrorCode.INVALID_MESSAGE, f"the database refused this: {exc}"),
                )
            except Exception as exc:  # a bug: answered, never left waiting
                logger.exception("write pipeline: slow write failed")
                self._answer(queued, _unavailable(exc))
            else:
                self._committed([queued], outcome)
        finally:
            self._slow_waiting -= 1
            done.set_result(None)
            for channel in _channels_of(queued.unit):
                if self._slow.get(channel) is done:
                    del self._slow[channel]

    async def _bounded_transaction(
        self, link: PipelinedConnection, units: Sequence[PublishUnit]
    ) -> BatchOutcome:
        """The transaction, given up (its connection closed) after ``write_timeout_secs``."""
        self._arm_deadline(link)
        try:
            return await self._transaction(link, units)
        finally:
            self._disarm_deadline()

    async def _transaction(
        self, link: PipelinedConnection, units: Sequence[PublishUnit]
    ) -> BatchOutcome:
        """One batch, alone on the connection: each statement whose rows the plan reads
        is awaited; BEGIN goes with the first, the final one with the COMMIT. An error
        rolls the transaction back, so the connection is clean for the retry."""
        started = time.perf_counter()
        plan = batch_plan(
            units,
            micros=now_micros(),
            window_secs=self._window_secs,
            dialect=POSTGRESQL_BINARY_ARRAYS,
        )
        self._commit_sent = False
        statement = next(plan)
        link.send("BEGIN")
        due = 1  # results sent for and not read yet
        try:
            while True:
                link.send(
                    statement.sql, statement.params, prepare=self._prepared, types=statement.types
                )
                due += 1
                if statement.final:
                    self._commit_sent = True
                    link.send("COMMIT")
                    link.flush()
                    results = await _checked(link, due + 1)
                    rows = link.rows(results[-2]) if statement.returns_rows else []
                    outcome = _finished(plan, rows)
                    break
                link.flush()
                results = await _checked(link, due)
                due = 0
                rows = link.rows(results[-1]) if statement.returns_rows else []
                try:
                    statement = plan.send(rows)
                except StopIteration as done:
                    self._commit_sent = True
                    link.send("COMMIT")
                    link.flush()
                    await _checked(link, 1)
                    outcome = done.value
                    break
        except psycopg.Error:
            if link.error is None:  # refused, not lost: the connection goes on
                await self._recover(link)
            raise
        _BATCH_SECONDS.observe(time.perf_counter() - started)
        _BATCH_MESSAGES.observe(sum(len(u.items) for u in units))
        return outcome

    def _committed(self, batch: list[_Queued], outcome: BatchOutcome) -> None:
        # Broadcast before answering: a publisher subscribed to its channel may then
        # see its message before its reply, which the contract allows either way. A
        # subscriber's messages of the batch go out in one write.
        with deliveries_together():
            for message in outcome.stored:
                try:
                    self._on_committed(message)
                except Exception:  # committed: subscribers catch up from history
                    logger.exception("broadcast of %r failed", message)
        for queued, result in zip(batch, outcome.outcomes, strict=True):
            self._answer(queued, result)

    # ----- answers -------------------------------------------------------------------------

    def _answer(self, queued: _Queued, outcome: Outcome) -> None:
        if not queued.future.done():  # done: its publisher went away (cancelled)
            queued.future.set_result(outcome)

    def _answer_all(self, batch: list[_Queued], error: PushError) -> None:
        for queued in batch:
            self._answer(queued, error)

    def _answer_in_flight(self, error: PushError) -> None:
        for sent in self._in_flight:
            self._answer_all(sent.batch, error)
        self._in_flight.clear()
        self._disarm_deadline()

    def _fail_queued(self, error: PushError) -> None:
        batch = list(self._queue)
        self._queue.clear()
        self._queued_messages = self._queued_bytes = 0
        self._answer_all(batch, error)

    # ----- the connection ------------------------------------------------------------------

    async def _connect(self) -> PipelinedConnection:
        """The connection, with nothing due on it: a new one if it broke meanwhile."""
        link = self._link
        if link is not None:
            if link.error is None and not closed_by_server(link.connection.pgconn.socket):
                return link
            await self._close_connection()
        async with asyncio.timeout(self._connect_timeout_secs):
            connection = await psycopg.AsyncConnection.connect(
                **self._conninfo,
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout_secs)),
            )
            try:
                # For the connection's life, not once per transaction (one statement
                # less in every batch).
                await connection.execute(f"SET lock_timeout = '{int(LOCK_WAIT_SECS * 1000)}ms'")
                if self._prepared:
                    await connection.execute(GENERIC_PLANS)
                self._link = PipelinedConnection(connection, on_result=self._wakeup.set)
            except BaseException:
                await connection.close()
                raise
        if self._unreachable:
            logger.warning("write pipeline: connected to PostgreSQL again")
            self._unreachable = False
        return self._link

    async def _close_connection(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        self._drop_deadline_timer()
        connection = link.connection
        try:
            link.close()  # also when the connection broke: its socket is closed now
            await connection.close()
        except Exception as exc:  # already broken; nothing to keep
            logger.debug("closing the write connection: %s", exc)


@contextlib.contextmanager
def _answered_if_it_fails(batch: list[_Queued]) -> Iterator[None]:
    """A bug while handling ``batch`` answers its publishers UNAVAILABLE before it
    propagates (to the writer's loop, which logs it and goes on); so does the writer's
    cancellation (a stopping node gives up on a batch written past its write timeout),
    which would otherwise leave them waiting for good. Publishes handed to the slow
    lane meanwhile are left to it: it may still store them."""
    try:
        yield
    except BaseException:
        for queued in batch:
            if not queued.future.done() and not queued.slow:
                queued.future.set_result(PushError(ErrorCode.UNAVAILABLE, "the write failed"))
        raise


async def _checked(link: PipelinedConnection, count: int) -> list[Results]:
    """The next ``count`` statements' results; raises the first one's error."""
    results = []
    for _ in range(count):
        result = await link.next()
        link.check(result)
        results.append(result)
    return results


def _finished(plan: Plan, rows: list[tuple[Any, ...]]) -> BatchOutcome:
    """The outcome of a plan whose final statement's rows are ``rows``."""
    try:
        plan.send(rows)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the batch plan went on after its final statement")


def _unavailable(exc: BaseException) -> PushError:
    return PushError(
        ErrorCode.UNAVAILABLE, f"database unavailable ({type(exc).__name__}); not published"
    )


def _outcome_unknown(exc: BaseException) -> PushError:
    # Lost while its COMMIT may have been on its way: "not published" could be untrue.
    return PushError(
        ErrorCode.UNAVAILABLE,
        f"database connection lost ({type(exc).__name__}); the publish may have been stored",
    )


def pipeline_conninfo(params: dict[str, Any]) -> dict[str, Any]:
    """psycopg connection arguments from Django's ``get_connection_params()``, without
    the parts that belong to Django's sync cursors."""
    dropped = {"cursor_factory", "context", "pool"}
    conninfo = {key: value for key, value in params.items() if key not in dropped}
    # TCP keepalives: a peer that vanished without a reset is noticed within ~25 s
    # even between batches, instead of at the first write after it.
    for key, value in (
        ("keepalives", 1),
        ("keepalives_idle", 10),
        ("keepalives_interval", 5),
        ("keepalives_count", 3),
    ):
        conninfo.setdefault(key, value)
    return conninfo
