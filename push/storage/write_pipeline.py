"""Group commit: the node's one write pipeline, through which every publish is stored.

Publishes arriving on the node queue here; one task writes them in batches, each in
one transaction (``push.storage.write_batch``), on its own psycopg connection on the event
loop. A batch is written as soon as the previous one committed: an idle node writes
a lone publish at once, a busy one writes what queued meanwhile, up to a cap in
messages and bytes. A transaction costs mostly its round trips and its commit (a WAL
flush), which all the publishes of a batch share: measured here (2 busy cores), 2.2 ms
for 1 publish, 8.4 ms for 100, 49 ms for 1,000. That is what lets a node acknowledge
more publishes per second than PostgreSQL commits transactions.

Each publisher is answered only after its message committed, and committed messages
go to ``on_committed`` (the node's broadcast) in seq order per channel.

Failures:
- the database refuses data (a constraint, a bad value): the batch is split in
  halves and each retried, so only the publish that caused it fails;
- the connection ended by the server while idle (PostgreSQL restarted): seen before
  the next batch is sent on it (the server's farewell is waiting to be read), and the
  batch is written on a new connection; lost after BEGIN but before the COMMIT left:
  nothing was stored, and the batch is written on a new connection;
- PostgreSQL unreachable: the batch and everything queued are answered UNAVAILABLE
  at once, and the next publish connects again (with a bounded connect timeout, so
  nobody waits long for a dead server); a connection that stops answering is given
  up after the write timeout;
- the connection lost during COMMIT: the batch may or may not be stored, and it is
  answered UNAVAILABLE, never "published". A client that must not publish twice
  retries with an ``Idempotency-Key`` (REST), which returns the first result if the
  commit did happen;
- the queue full (count or bytes): new publishes are refused UNAVAILABLE instead of
  queueing without bound;
- a channel's row locked by another transaction (application code publishing inside a
  long transaction holds it until its commit): a batch waits at most
  ``LOCK_WAIT_SECS`` for it, then is split like a refused one, and the publishes of
  that channel leave the pipeline for a slow lane, written one at a time on the
  database threads where waiting on the lock holds up nobody else. Once a channel is
  in the slow lane, its later publishes follow it there, so they keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from django.db import DataError, IntegrityError, connection, transaction
from psycopg import errors as pg_errors
from psycopg import pq

from common import metrics
from common.background import spawn
from common.db import closed_by_server, db_call
from common.errors import ErrorCode, PushError
from push.fanout.message import ChannelMessage
from push.storage.write_batch import (
    POSTGRESQL_BINARY_ARRAYS,
    BatchOutcome,
    Outcome,
    Plan,
    PublishUnit,
    Statement,
    batch_plan,
    now_micros,
    run_plan_sync,
)

logger = logging.getLogger(__name__)

# A deadlock or serialization failure is retried this many times, then answered
# UNAVAILABLE (the seq upsert takes rows in one order, so neither is expected).
TRANSIENT_RETRIES = 3
# How long a batch waits for a channel row another transaction holds. Measured here, a
# batch of 1,000 publishes commits in ~50 ms, so another node's batch never waits this
# long; only a foreign transaction does, and it then holds up the batch no longer.
LOCK_WAIT_SECS = 0.2


def _write_waiting_for_locks(
    unit: PublishUnit, *, window_secs: int, lock_wait_secs: float
) -> BatchOutcome:
    """One unit through Django's connection (on a database thread), waiting up to
    ``lock_wait_secs`` for its channels' rows, then UNAVAILABLE (nothing stored)."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_wait_secs * 1000)}ms"]
            )
        return run_plan_sync([unit], window_secs=window_secs)


_write_slowly = db_call(_write_waiting_for_locks)


def _channels_of(unit: PublishUnit) -> set[str]:
    return {channel for channel, _ in unit.items}


class _Queued:
    __slots__ = ("future", "unit")

    def __init__(self, unit: PublishUnit, future: asyncio.Future[Outcome]) -> None:
        self.unit = unit
        self.future = future


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
    ) -> None:
        self._conninfo = conninfo
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
        self._wakeup = asyncio.Event()
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        # Channel -> the last slow-lane write of it: a channel is in the slow lane while
        # this is pending, and each of its slow writes waits for the one before.
        self._slow: dict[str, asyncio.Future[None]] = {}
        self._slow_waiting = 0
        self._unreachable = False
        self._writing = False
        self._stopping = False
        self._commit_sent = False

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
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(unit, future))
        self._queued_messages += count
        self._queued_bytes += unit.nbytes
        self._wakeup.set()
        return future

    async def publish(self, unit: PublishUnit) -> Outcome:
        # A publisher that goes away (its task cancelled) cancels only its own future:
        # the batch it is in is written all the same, and nobody is answered.
        return await self.submit(unit)

    # ----- the writer --------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="push-writes")

    async def stop(self) -> None:
        task = self._task
        self._stopping = True
        self._fail_queued(PushError(ErrorCode.UNAVAILABLE, "the node is stopping"))
        if task is not None and not task.done():
            # A batch being written is let finish: cancelled during COMMIT, its
            # publishers would never learn what happened. (Only on the task's own loop:
            # tests may stop a node from another one.)
            if self._writing and task.get_loop() is asyncio.get_running_loop():
                await asyncio.wait({task}, timeout=self._write_timeout_secs)
            task.cancel()
        await self._close_connection()

    async def _run(self) -> None:
        while not self._stopping:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch()
            if not batch:  # answered meanwhile (the queue failed as a whole)
                continue
            self._writing = True
            try:
                await self._write(batch)
            except Exception:  # a bug: answer, log, and keep the node's writes going
                logger.exception("write pipeline: batch of %d publishes failed", len(batch))
                self._answer_all(batch, PushError(ErrorCode.UNAVAILABLE, "the write failed"))
                await self._close_connection()
            finally:
                self._writing = False

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

    async def _write(self, batch: list[_Queued]) -> None:
        try:
            connection = await self._connect()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if not self._unreachable:  # once per outage, not once per batch
                logger.warning("write pipeline: cannot connect to PostgreSQL: %s", exc)
            self._unreachable = True
            metrics.WRITE_BATCHES_FAILED.labels("unavailable").inc()
            unavailable = _unavailable(exc)
            self._answer_all(batch, unavailable)
            # Nothing queued now can be written sooner: answer it at once too.
            self._fail_queued(unavailable)
            return
        await self._write_on(connection, batch)

    async def _write_on(
        self, connection: psycopg.AsyncConnection[Any], batch: list[_Queued]
    ) -> None:
        if self._slow:
            batch = self._divert_slow(batch)
            if not batch:
                return
        reconnected = False
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                outcome = await self._bounded_transaction(connection, [q.unit for q in batch])
            except (pg_errors.IntegrityError, pg_errors.DataError) as exc:
                metrics.WRITE_BATCHES_FAILED.labels("refused").inc()
                await self._split(connection, batch, exc)
                return
            except pg_errors.LockNotAvailable:
                metrics.WRITE_BATCHES_FAILED.labels("locked").inc()
                if len(batch) == 1:
                    self._to_slow_lane(batch[0])
                    return
                middle = len(batch) // 2
                await self._write_on(connection, batch[:middle])
                await self._write_on(connection, batch[middle:])
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
                        connection = await self._connect()
                        continue
                    except (psycopg.Error, OSError, TimeoutError):
                        self._fail_queued(_unavailable(exc))
                # Lost or timed out, maybe during COMMIT: the outcome is unknown, so
                # nothing of this batch is acknowledged (see the module's docstring).
                logger.warning("write pipeline: batch of %d lost: %r", len(batch), exc)
                metrics.WRITE_BATCHES_FAILED.labels("unavailable").inc()
                self._answer_all(batch, _unavailable(exc))
                return
            self._committed(batch, outcome)
            return

    async def _split(
        self,
        connection: psycopg.AsyncConnection[Any],
        batch: list[_Queued],
        exc: psycopg.Error,
    ) -> None:
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
        await self._write_on(connection, batch[:middle])
        await self._write_on(connection, batch[middle:])

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
        channels = _channels_of(queued.unit)
        before = [self._slow[c] for c in channels if c in self._slow]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for channel in channels:
            self._slow[channel] = done
        spawn(self._write_slow(queued, before, done), name="push-slow-write")

    async def _write_slow(
        self, queued: _Queued, before: list[asyncio.Future[None]], done: asyncio.Future[None]
    ) -> None:
        try:
            for earlier in before:
                await earlier
            try:
                outcome = await _write_slowly(
                    queued.unit,
                    window_secs=self._window_secs,
                    lock_wait_secs=self._write_timeout_secs,
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
        self, connection: psycopg.AsyncConnection[Any], units: Sequence[PublishUnit]
    ) -> BatchOutcome:
        """The transaction, given up after ``write_timeout_secs``.

        A connection whose packets vanish (no reset, no answer) would hold the whole
        node's writes: past the timeout its socket is closed under the transaction and
        the writer is cancelled where it waits, which fails whatever still waits on it,
        rollback included. It runs in the writer's own task, not one of its own: under
        load every task handoff waits a whole loop turn, and a task per batch (with
        ``wait_for`` and ``shield`` around it) cost four of them between a COMMIT's
        answer and the broadcast."""
        writer = asyncio.current_task()
        assert writer is not None
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            connection.pgconn.finish()
            writer.cancel()

        deadline = asyncio.get_running_loop().call_later(self._write_timeout_secs, give_up)
        try:
            return await self._transaction(connection, units)
        except asyncio.CancelledError:
            # Ours unless the writer was also cancelled from outside (the node stops).
            if timed_out and writer.uncancel() == 0:
                raise TimeoutError("the write timed out") from None
            raise
        finally:
            deadline.cancel()

    async def _transaction(
        self, connection: psycopg.AsyncConnection[Any], units: Sequence[PublishUnit]
    ) -> BatchOutcome:
        started = time.perf_counter()
        plan = batch_plan(
            units,
            micros=now_micros(),
            window_secs=self._window_secs,
            dialect=POSTGRESQL_BINARY_ARRAYS,
        )
        self._commit_sent = False
        statement = next(plan)
        if statement.final:
            outcome = await self._alone(connection, plan, statement)
        else:
            outcome = await self._in_transaction(connection, plan, statement)
        metrics.WRITE_BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.WRITE_BATCH_MESSAGES.observe(sum(len(u.items) for u in units))
        return outcome

    async def _alone(
        self, connection: psycopg.AsyncConnection[Any], plan: Plan, statement: Statement
    ) -> BatchOutcome:
        """A batch without idempotency keys is one statement; on this autocommit
        connection it is a transaction by itself, committed when it completes. Sent
        alone it costs a quarter of the CPU of the same statement between BEGIN and
        COMMIT in a pipeline (measured here: 150-180 against 580-750 µs), which
        counts on a node writing many small batches.

        Once it left, its outcome is unknown until the answer comes: it is never
        retried on a new connection (``_connect`` replaces one that broke while idle
        before anything is sent on it)."""
        self._commit_sent = True
        async with connection.cursor() as cursor:
            await cursor.execute(statement.sql, statement.params)
            rows = await cursor.fetchall() if statement.returns_rows else []
        return _finished(plan, rows)

    async def _in_transaction(
        self, connection: psycopg.AsyncConnection[Any], plan: Plan, statement: Statement
    ) -> BatchOutcome:
        """A batch of several statements (one with idempotency keys), in pipeline mode:
        statements whose rows nothing reads before the COMMIT (the plan's final one,
        the keys' results) go out with the COMMIT in one round trip, BEGIN with the
        first. BEGIN and COMMIT are plain statements of the pipeline: psycopg's
        ``transaction()`` block cost 300 µs more CPU per batch of this shape here
        (735-761 against 426-476 µs). What it did on an error is done here: the
        transaction is rolled back, so the connection is clean for the retry."""
        final: Statement | None = None
        try:
            async with connection.pipeline(), connection.cursor() as cursor:
                await cursor.execute("BEGIN")
                while True:
                    await cursor.execute(statement.sql, statement.params)
                    if statement.final:
                        final = statement
                        break
                    rows = await cursor.fetchall() if statement.returns_rows else []
                    try:
                        statement = plan.send(rows)
                    except StopIteration as done:
                        outcome: BatchOutcome = done.value
                        break
                # From here a lost connection leaves the outcome unknown. (Through the
                # connection, not the cursor, whose last result must stay the final
                # statement's.)
                self._commit_sent = True
                await connection.execute("COMMIT")
                if final is not None:
                    rows = await cursor.fetchall() if final.returns_rows else []
                    outcome = _finished(plan, rows)
        except BaseException:
            await _roll_back(connection)
            raise
        return outcome

    def _committed(self, batch: list[_Queued], outcome: BatchOutcome) -> None:
        # Broadcast before answering: a publisher subscribed to its channel may then
        # see its message before its reply, which the contract allows either way.
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

    def _fail_queued(self, error: PushError) -> None:
        batch = list(self._queue)
        self._queue.clear()
        self._queued_messages = self._queued_bytes = 0
        self._answer_all(batch, error)

    # ----- the connection ------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        connection = self._connection
        if connection is not None and not connection.closed:
            if not closed_by_server(connection.pgconn.socket):
                return connection
            await self._close_connection()
        self._connection = None
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
            except BaseException:
                await connection.close()
                raise
        self._connection = connection
        if self._unreachable:
            logger.warning("write pipeline: connected to PostgreSQL again")
            self._unreachable = False
        return connection

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close()
            except Exception as exc:  # already broken; nothing to keep
                logger.debug("closing the write connection: %s", exc)


async def _roll_back(connection: psycopg.AsyncConnection[Any]) -> None:
    """End a transaction an error left open, if the connection still works (a broken
    one is closed by the caller)."""
    if connection.closed or connection.info.transaction_status not in _IN_TRANSACTION:
        return
    try:
        await connection.execute("ROLLBACK")
    except psycopg.Error as exc:
        logger.debug("rolling back the write connection: %s", exc)


_IN_TRANSACTION = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)


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
