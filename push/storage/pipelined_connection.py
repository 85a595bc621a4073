"""The write pipeline's PostgreSQL connection, in libpq's pipeline mode, on the event loop.

psycopg's own pipeline (``AsyncConnection.pipeline()``) reads results only by waiting
for every result still due: a batch's COMMIT could not be read while the next batch
was already sent behind it. This drives the same connection (its ``PGconn``) directly:
statements go out as soon as they are queued, results are read as they arrive, one
result set per statement, in the order sent, and the writer takes them when it is
ready. Parameters are adapted by psycopg's own ``Transformer``, so they travel exactly
as psycopg's cursors send them (arrays in binary with ``%b``).

What makes a batch safe to send behind another one: nothing here sends a Sync. After a
statement fails, PostgreSQL skips everything that follows until a Sync, including the
transactions sent behind it (libpq answers each of them ``PIPELINE_ABORTED``). So a
batch sent behind a failing one is never executed; the writer learns why the first one
failed, sends ``recover()`` (Sync, then ROLLBACK), and writes both again.

Statements sent with ``types`` have their parameters adapted as those PostgreSQL types
say, by dumpers chosen once per statement (``_typed_query``), not by looking at the
values each time.

Statements sent with ``prepare=True`` are prepared once per connection (a named
statement, per SQL text and parameter types) and then only executed: PostgreSQL parses
and plans them once, not once per batch. The write connection plans them generically
(``GENERIC_PLANS``): measured here, a batch of 6 publishes cost PostgreSQL 90-104 us
of CPU per message unprepared and 55-60 prepared; one of 35, 24 against 18.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg._queries import PostgresQuery  # the adaptation psycopg's cursors use
from psycopg.adapt import Transformer
from psycopg.types import TypesRegistry

Results = list[pq.abc.PGresult]

_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_PIPELINE_ABORTED = pq.ExecStatus.PIPELINE_ABORTED
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_BAD = pq.ConnStatus.BAD
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_BINARY = pq.Format.BINARY

# For the session of a connection whose statements are prepared: plan each once, for
# any parameters. The write path's statements read arrays of rows through unnest and
# touch tables only through unique indexes, so no parameter value changes the best
# plan; by default PostgreSQL plans a prepared statement again on every execution
# while the generic plan's estimate (100 rows per unnest) looks costlier.
GENERIC_PLANS = "SET plan_cache_mode = force_generic_plan"
# Distinct statements (SQL text and parameter types) prepared on one connection, at
# most: the write path has a handful; past this, statements are sent unprepared.
MAX_PREPARED = 64

PreparedKey = tuple[bytes, tuple[int, ...] | None]
TypedKey = tuple[str, tuple[str, ...]]


class PipelineAborted(psycopg.Error):
    """A statement skipped because one sent before it failed (nothing of it ran)."""


class PipelinedConnection:
    """An open autocommit psycopg connection, switched to pipeline mode for good: once
    handed here, only this object uses it, until ``close()``."""

    def __init__(
        self, connection: psycopg.AsyncConnection[Any], on_result: Callable[[], None]
    ) -> None:
        self.connection = connection
        self._pgconn = connection.pgconn
        self._transformer = Transformer(connection)
        self._fd = self._pgconn.socket
        self._loop = asyncio.get_running_loop()
        self._on_result = on_result
        self._results: deque[Results] = deque()
        self._partial: Results = []
        self._waiter: asyncio.Future[None] | None = None
        self._writing = False
        self.error: BaseException | None = None
        # Statement -> the name it was prepared under on this connection.
        self._prepared: dict[PreparedKey, bytes] = {}
        # (SQL, its parameters' types) -> its query, with the dumpers of those types.
        self._typed: dict[TypedKey, PostgresQuery] = {}
        self._prepare_count = 0
        # One entry per statement sent, in order: the key of a statement being
        # prepared (its result is handed over with the execution that follows it), or
        # None for a statement whose results are the caller's.
        self._sent: deque[PreparedKey | None] = deque()
        self._pgconn.enter_pipeline_mode()
        self._loop.add_reader(self._fd, self._read)

    # ----- sending ----------------------------------------------------------------------

    def send(
        self,
        sql: str,
        params: Sequence[Any] = (),
        *,
        prepare: bool = False,
        types: tuple[str, ...] | None = None,
    ) -> None:
        """Queue one statement; ``flush()`` sends what is queued. On a broken connection
        this does nothing: its results never come, and whoever waits for them learns
        why from ``next()`` or ``error``. ``prepare``: see the module's docstring;
        ``types``: the PostgreSQL type of each parameter (``"text[]"``), see
        ``_typed_query``."""
        if self.error is not None:
            return
        if not params and "%" not in sql:  # BEGIN, COMMIT: nothing to adapt
            self._send_statement(_plain_query(sql))
            return
        if types is None:
            query = PostgresQuery(self._transformer)
            query.convert(sql, params)
        else:
            query = self._typed_query(sql, params, types)
        if prepare:
            self._send_prepared(query)
        else:
            self._send_statement(query.query, query.params, query.formats, query.types)

    def _typed_query(
        self, sql: str, params: Sequence[Any], types: tuple[str, ...]
    ) -> PostgresQuery:
        """``sql`` with ``params`` adapted as ``types`` say, all in binary, each by its
        type's dumper, chosen once per statement. Left to choose, psycopg looks at each
        value first, and at each element of a list (for its element type and, for ints,
        the size the largest needs): measured, a third of adapting a write batch."""
        if len(params) != len(types):  # psycopg would read past its dumpers
            raise psycopg.ProgrammingError(f"{len(types)} types for {len(params)} parameters")
        key = (sql, types)
        query = self._typed.get(key)
        if query is not None:
            query.dump(params)
            return query
        transformer = Transformer(self.connection)
        registry = self.connection.adapters.types
        transformer.set_dumper_types([_oid(registry, name) for name in types], _BINARY)
        query = PostgresQuery(transformer)
        query.convert(sql, params)
        if len(self._typed) < MAX_PREPARED:  # the write path has a handful
            self._typed[key] = query
        return query

    def _send_statement(
        self,
        query: bytes,
        params: Sequence[bytes | None] | None = None,
        formats: Sequence[pq.Format] | None = None,
        types: Sequence[int] | None = None,
    ) -> None:
        self._queued(
            None,
            self._pgconn.send_query_params,
            query,
            params,
            param_formats=formats,
            param_types=types,
        )

    def _send_prepared(self, query: PostgresQuery) -> None:
        key = (query.query, None if query.types is None else tuple(query.types))
        name = self._prepared.get(key)
        if name is None:
            if len(self._prepared) >= MAX_PREPARED:
                self._send_statement(query.query, query.params, query.formats, query.types)
                return
            self._prepare_count += 1
            name = self._prepared[key] = b"push_%d" % self._prepare_count
            if not self._queued(
                key, self._pgconn.send_prepare, name, query.query, param_types=query.types
            ):
                return
        self._queued(
            None, self._pgconn.send_query_prepared, name, query.params, param_formats=query.formats
        )

    def _queued(
        self, key: PreparedKey | None, send: Callable[..., None], *args: Any, **kwargs: Any
    ) -> bool:
        """Make one of libpq's send calls, and note whose its results will be (``key``:
        a preparation's); False when the connection failed."""
        try:
            send(*args, **kwargs)
        except psycopg.Error as exc:
            self._fail(exc)
            return False
        self._sent.append(key)
        return True

    def flush(self) -> None:
        """Send what is queued and ask the server to send back what it has: without a
        Sync, the server writes results out only when asked."""
        if self.error is not None:
            return
        self._pgconn.send_flush_request()
        self._write()

    def recover(self) -> None:
        """After a failed statement: end the skipping (Sync) and roll back the failed
        transaction. Its results (the Sync's, then the ROLLBACK's) come like any other."""
        self._pgconn.pipeline_sync()
        self.send("ROLLBACK")
        self.flush()

    def _write(self) -> None:
        try:
            pending = self._pgconn.flush()
        except psycopg.Error as exc:
            self._fail(exc)
            return
        if pending and not self._writing:
            # More than the socket takes at once (a batch of large messages): the rest
            # goes when it is writable.
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)
        elif not pending and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _writable(self) -> None:
        self._write()

    # ----- receiving --------------------------------------------------------------------

    def _read(self) -> None:
        pgconn = self._pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            self._fail(exc)
            return
        if pgconn.status == _BAD:
            self._fail(psycopg.OperationalError("the write connection was lost"))
            return
        arrived = False
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:  # the end of one statement's results
                if not self._partial:
                    break
                if self._prepared_here(self._sent.popleft()):
                    continue  # its result goes with the execution's
                self._results.append(self._partial)
                self._partial = []
                arrived = True
            elif result.status == _PIPELINE_SYNC:  # a Sync's, not followed by None
                self._results.append([result])
                arrived = True
            else:
                self._partial.append(result)
        if arrived:
            self._wake()

    def _prepared_here(self, key: PreparedKey | None) -> bool:
        """Whether the statement whose results just ended prepared ``key``; if that
        failed (or PostgreSQL skipped it), it is prepared again next time."""
        if key is None:
            return False
        if any(result.status != _COMMAND_OK for result in self._partial):
            self._prepared.pop(key, None)
        return True

    def available(self) -> int:
        """How many statements' results can be taken without waiting."""
        return len(self._results)

    def take(self) -> Results:
        """The next statement's results (``available()`` must be positive)."""
        return self._results.popleft()

    async def next(self) -> Results:
        """The next statement's results, once they came; raises once the connection
        failed (the results still due will never come)."""
        while not self._results:
            if self.error is not None:
                raise self.error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._results.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._on_result()

    # ----- the end ------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            self._stop_watching()
        self._wake()

    def close(self, reason: BaseException | None = None) -> None:
        """Stop using the connection: whatever still waits on it fails with ``reason``.
        The caller closes the psycopg connection (it was ours only)."""
        self._fail(reason or psycopg.OperationalError("the write connection was closed"))
        self._pgconn.finish()

    # ----- reading results ------------------------------------------------------------

    def rows(self, results: Results) -> list[tuple[Any, ...]]:
        """The rows of a statement's results, as psycopg's cursors would load them."""
        result = results[-1]
        self._transformer.set_pgresult(result)
        return self._transformer.load_rows(0, result.ntuples, tuple)

    def check(self, results: Results) -> None:
        """Raise the statement's error as psycopg's cursors would (``IntegrityError``,
        ``LockNotAvailable``...), or ``PipelineAborted`` if it was skipped."""
        for result in results:
            if result.status == _FATAL_ERROR:
                raise pg_errors.error_from_result(result, encoding=self.connection.info.encoding)
            if result.status == _PIPELINE_ABORTED:
                raise PipelineAborted("skipped after an earlier statement failed")

    def _stop_watching(self) -> None:
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)


@functools.lru_cache(maxsize=16)
def _plain_query(sql: str) -> bytes:
    return sql.encode()


def _oid(registry: TypesRegistry, name: str) -> int:
    """The oid of a PostgreSQL type named as in SQL: ``"bigint"``, ``"text[]"``."""
    if name.endswith("[]"):
        return registry[name[:-2]].array_oid
    return registry[name].oid
