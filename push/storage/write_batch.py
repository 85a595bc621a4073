"""The write path's one transaction: the statements that store a batch of publishes.

``batch_plan`` is sans-I/O: a generator that yields each statement and receives its
rows, so the node's write pipeline (psycopg on the event loop, ``push.storage.write_pipeline``)
and the sync path (Django's connection, on the database threads or inside the
caller's own transaction, ``run_plan_sync``) run the very same SQL.

Whatever a batch holds, it costs a fixed number of statements: the idempotency keys
(only when some publish has one), ONE upsert that allocates the seqs of every channel,
ONE multi-row insert of the messages, and the keys' results. On PostgreSQL the upsert
and the insert are one statement (``_store_at_once``), so a batch without keys is a
single statement, which the write pipeline sends with its COMMIT in one round trip.
"""

from __future__ import annotations

import functools
import json
import operator
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from django.db import connection, transaction
from django.db.models import Model

from common.errors import ErrorCode, PushError
from push.fanout.message import ChannelMessage, new_message_ids
from push.models import Channel, IdempotencyKey, Message

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The key scope of a batch request: no channel is named "" (validate_channel_name).
BATCH_KEY_CHANNEL = ""

KeyScope = tuple[str, str, str]


@dataclass(eq=False)
class PublishUnit:
    """One publish request: a single message, or a batch request's messages, which are
    stored all together or not at all (a unit is never split across transactions)."""

    # (channel, canonical JSON text of the data), validated.
    items: list[tuple[str, str]]
    publisher_id: int | None
    principal: str | None = None
    idempotency_key: str | None = None
    key_channel: str = BATCH_KEY_CHANNEL
    # A Pusher socket id that must not receive the messages live (ChannelMessage.exclude).
    exclude: str | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        items = self.items
        if len(items) == 1:  # a lone publish, without a generator's cost
            channel, data = items[0]
            self.nbytes = len(channel) + len(data)
        else:
            self.nbytes = sum(len(channel) + len(data) for channel, data in items)

    @property
    def key_scope(self) -> KeyScope | None:
        if self.idempotency_key is None or self.principal is None:
            return None
        return (self.principal, self.key_channel, self.idempotency_key)


@dataclass(slots=True)
class Published:
    """What a unit got: its messages in request order, and whether they are an earlier
    publish's (a retried idempotency key) rather than stored now. (Not frozen: one is
    made per publish, and a frozen dataclass took 0.56 us to make, against 0.16.)"""

    messages: list[ChannelMessage]
    replayed: bool


Outcome = Published | PushError


@dataclass
class Statement:
    sql: str
    params: list[Any]
    returns_rows: bool = False
    # The plan's last statement: its rows are read after the COMMIT, so a runner may
    # send it and the COMMIT in one round trip.
    final: bool = False
    # On PostgreSQL, each parameter's type ("text[]"): a runner that binds them on the
    # server may adapt them as these say (``PipelinedConnection.send``), not by looking
    # at the values. The SQL casts every parameter to the same type.
    types: tuple[str, ...] | None = None


@dataclass
class BatchOutcome:
    # One per unit, in the order given.
    outcomes: list[Outcome]
    # Stored by this transaction, in seq order per channel: what to broadcast on commit.
    stored: list[ChannelMessage]


Plan = Generator[Statement, list[tuple[Any, ...]], BatchOutcome]


@functools.cache
def _table(model: type[Model]) -> str:
    # Table names come from our own models; every value is a parameter.
    return connection.ops.quote_name(model._meta.db_table)


@dataclass(frozen=True)
class Dialect:
    """How a statement passes a list of rows: PostgreSQL unnests one array per column
    (``unnest(%s::text[], ...)``); SQLite, the development database, reads one JSON
    array of rows (``json_each``). Everything else in the statements is the same SQL.

    ``array_parameter`` is ``%b`` where the cursor binds parameters on the server (the
    write pipeline's own connection): psycopg then sends the arrays in binary, where in
    text it quotes and escapes every element in Python (measured: 15 us per message of
    JSON data, against 0.4 us). Django's cursors bind on the client, so ``%s`` there."""

    vendor: str
    array_parameter: str = "%s"

    def rows(self, columns: Sequence[tuple[str, str]], values: Sequence[list[Any]]) -> Rows:
        """A derived table ``t`` of the given (name, PostgreSQL type) columns."""
        names = ", ".join(name for name, _ in columns)
        if self.vendor == "postgresql":
            arrays = ", ".join(f"{self.array_parameter}::{kind}[]" for _, kind in columns)
            types = tuple(f"{kind}[]" for _, kind in columns)
            return Rows(f"unnest({arrays}) AS t({names})", list(values), types)
        picks = ", ".join(
            f"json_extract(value, '$[{i}]') AS {name}" for i, (name, _) in enumerate(columns)
        )
        rows = json.dumps(list(zip(*values, strict=True)))
        # Column names are our own constants; the rows are one parameter.
        return Rows(f"(SELECT {picks} FROM json_each(%s)) AS t", [rows])  # noqa: S608

    def timestamp(self, value: datetime) -> Any:
        return (
            value
            if self.vendor == "postgresql"
            else connection.ops.adapt_datetimefield_value(value)
        )

    def types(self, *types: str) -> tuple[str, ...] | None:
        """A statement's ``types``: the parameters' PostgreSQL types, on PostgreSQL."""
        return types if self.vendor == "postgresql" else None

    def uuid(self, value: str) -> str:
        # Django keeps UUIDs in SQLite as 32 hex digits.
        return value if self.vendor == "postgresql" else uuid.UUID(value).hex

    @property
    def json_cast(self) -> str:
        return "::jsonb" if self.vendor == "postgresql" else ""


@dataclass(frozen=True)
class Rows:
    sql: str
    params: list[Any]
    # The parameters' PostgreSQL types (on SQLite, none are given).
    types: tuple[str, ...] = ()


POSTGRESQL = Dialect("postgresql")
# For psycopg cursors that bind on the server (the write pipeline's connection).
POSTGRESQL_BINARY_ARRAYS = Dialect("postgresql", array_parameter="%b")


def now_micros() -> int:
    # Whole microseconds, so the live timestamp and the one read back from the
    # database later (resume, REST history) are the same float.
    return time.time_ns() // 1000


def batch_plan(
    units: Sequence[PublishUnit],
    *,
    micros: int,
    window_secs: int,
    dialect: Dialect = POSTGRESQL,
) -> Plan:
    """Store ``units`` in the current transaction; the caller commits."""
    created_at = _EPOCH + timedelta(microseconds=micros)
    outcomes: list[Outcome | None] = [None] * len(units)
    leaders, followers = _key_leaders(units)
    writers: Sequence[int] = range(len(units))
    keyed: list[int] = []
    if leaders:
        replays = yield from _claim_keys(dialect, sorted(leaders), created_at, window_secs)
        for scope, outcome in replays.items():
            outcomes[leaders[scope]] = outcome
        writers = [i for i in writers if i not in followers and outcomes[i] is None]
        keyed = [i for i in writers if units[i].key_scope is not None]
    stored: list[ChannelMessage] = []
    if writers:
        stored = yield from _store(
            dialect, units, writers, outcomes, created_at, micros, final=not keyed
        )
        if keyed:
            yield _record_results(dialect, units, keyed, outcomes)
    for index, leader in followers.items():
        first = outcomes[leader]
        outcomes[index] = Published(first.messages, True) if isinstance(first, Published) else first
    if any(outcome is None for outcome in outcomes):  # each is decided above: a bug
        raise RuntimeError("a publish of the batch was left without an outcome")
    return BatchOutcome(outcomes=cast(list[Outcome], outcomes), stored=stored)


def _key_leaders(units: Sequence[PublishUnit]) -> tuple[dict[KeyScope, int], dict[int, int]]:
    """The first unit of each key scope (its leader), and the units after it with the
    same key (followers, by index, with their leader's): two publishes with one key in
    one batch, the first publishes and the others get its result (with no row to
    conflict on yet, this is decided here, in memory)."""
    leaders: dict[KeyScope, int] = {}
    followers: dict[int, int] = {}
    for index, unit in enumerate(units):
        scope = unit.key_scope
        if scope is None:
            continue
        if scope in leaders:
            followers[index] = leaders[scope]
        else:
            leaders[scope] = index
    return leaders, followers


_SCOPE_COLUMNS = [("p", "text"), ("c", "text"), ("k", "text")]


def _scope_rows(dialect: Dialect, scopes: Sequence[KeyScope]) -> Rows:
    return dialect.rows(_SCOPE_COLUMNS, [[s[i] for s in scopes] for i in range(3)])


def _claim_keys(
    dialect: Dialect, scopes: list[KeyScope], created_at: datetime, window_secs: int
) -> Generator[Statement, list[tuple[Any, ...]], dict[KeyScope, Outcome]]:
    """Insert the key rows first, in one order on every node: a concurrent publish with
    the same key waits on our uncommitted row, then conflicts and reads our result.
    Returns the outcome of every key that an earlier publish holds."""
    table = _table(IdempotencyKey)
    expired_before = created_at - timedelta(seconds=window_secs)
    keys = _scope_rows(dialect, scopes)
    yield Statement(
        f"DELETE FROM {table} WHERE created_at < %s AND (principal, channel, key) IN "  # noqa: S608
        f"(SELECT p, c, k FROM {keys.sql})",
        [dialect.timestamp(expired_before), *keys.params],
        types=dialect.types("timestamptz", *keys.types),
    )
    # (WHERE true: SQLite's parser needs it before ON CONFLICT.)
    won = yield Statement(
        f"INSERT INTO {table} (principal, channel, key, created_at) "  # noqa: S608
        f"SELECT p, c, k, %s FROM {keys.sql} WHERE true "
        "ORDER BY p, c, k ON CONFLICT (principal, channel, key) DO NOTHING "
        "RETURNING principal, channel, key",
        [dialect.timestamp(created_at), *keys.params],
        returns_rows=True,
        types=dialect.types("timestamptz", *keys.types),
    )
    lost = sorted(set(scopes) - {tuple(row) for row in won})
    if not lost:
        return {}
    # A new statement, a new snapshot (READ COMMITTED): it sees the winner's commit.
    lost_keys = _scope_rows(dialect, lost)
    rows = yield Statement(
        f"SELECT principal, channel, key, result FROM {table} "  # noqa: S608
        f"WHERE (principal, channel, key) IN (SELECT p, c, k FROM {lost_keys.sql})",
        lost_keys.params,
        returns_rows=True,
        types=dialect.types(*lost_keys.types),
    )
    found = {(p, c, k): result for p, c, k, result in rows}
    return {scope: _replayed(found.get(scope)) for scope in lost}


def _replayed(result: Any) -> Outcome:
    if isinstance(result, str):  # Django's cursor hands jsonb back as text
        result = json.loads(result)
    if not result:
        # The row went away (expired) or lost its result between our two statements.
        return PushError(ErrorCode.UNAVAILABLE, "a publish with this key is in progress; retry")
    messages = [
        ChannelMessage(
            channel=r["channel"],
            seq=r["seq"],
            message_id=r["message_id"],
            # The reply to a retry names the first publish; it carries no data.
            data_json="null",
            timestamp=r["timestamp"],
        )
        for r in result
    ]
    return Published(messages, True)


def _store(
    dialect: Dialect,
    units: Sequence[PublishUnit],
    writers: Sequence[int],
    outcomes: list[Outcome | None],
    created_at: datetime,
    micros: int,
    *,
    final: bool,
) -> Generator[Statement, list[tuple[Any, ...]], list[ChannelMessage]]:
    # The messages in request order; a batch's messages of one channel take
    # consecutive seqs in that order.
    channels = [channel for i in writers for channel, _ in units[i].items]
    data = [data_json for i in writers for _, data_json in units[i].items]
    publishers = [units[i].publisher_id for i in writers for _ in units[i].items]
    # The excluded Pusher sockets, only when a publish names one: the statements of a
    # batch without (nearly all) are the ones they always were. (Looked for with map at
    # C speed: a generator over the writers took a third longer, ~15 ns a unit more.)
    excluded = (
        [units[i].exclude for i in writers for _ in units[i].items]
        if any(map(_EXCLUDE_OF, units))
        else None
    )
    message_ids = new_message_ids(len(channels))
    counts: dict[str, int] = {}  # (a Counter costs 0.5 us more for a batch of one)
    for channel in channels:
        counts[channel] = counts.get(channel, 0) + 1
    names = sorted(counts)
    if dialect.vendor == "postgresql":
        rows = yield _store_at_once(
            dialect,
            names,
            [counts[n] for n in names],
            (channels, message_ids, data, publishers),
            created_at,
            final=final,
            excluded=excluded,
        )
    else:
        rows = yield _allocate_seqs(dialect, names, [counts[n] for n in names], created_at)
    # Each channel's seq before the batch's first.
    seqs = {name: last - counts[name] for _, name, last in rows}
    stored = _numbered(units, writers, outcomes, seqs, message_ids, micros / 1_000_000)
    if dialect.vendor != "postgresql":
        ids = {name: channel_id for channel_id, name, _ in rows}
        channel_ids = [ids[channel] for channel in channels]
        yield _insert_messages(dialect, stored, channel_ids, publishers, created_at, excluded)
    return stored


_EXCLUDE_OF = operator.attrgetter("exclude")


def _numbered(
    units: Sequence[PublishUnit],
    writers: Sequence[int],
    outcomes: list[Outcome | None],
    seqs: dict[str, int],
    message_ids: list[str],
    timestamp: float,
) -> list[ChannelMessage]:
    """The writers' messages, in request order, each channel's numbered on from its seq
    in ``seqs``; each writer's outcome is set to its messages."""
    stored: list[ChannelMessage] = []
    ids = iter(message_ids)
    for index in writers:
        unit = units[index]
        first = len(stored)
        for channel, data_json in unit.items:
            seq = seqs[channel] = seqs[channel] + 1
            stored.append(
                ChannelMessage(
                    channel=channel,
                    seq=seq,
                    message_id=next(ids),
                    data_json=data_json,
                    timestamp=timestamp,
                    exclude=unit.exclude,
                )
            )
        if len(stored) > first:  # (a unit without messages is left undecided: a bug)
            outcomes[index] = Published(stored[first:], False)
    return stored


# The columns of the messages' rows, as _store_at_once unnests them: (channel, message
# id, data, publisher), each in request order.
MessageColumns = tuple[list[str], list[str], list[str], list[int | None]]


def _store_at_once(
    dialect: Dialect,
    names: list[str],
    counts: list[int],
    messages: MessageColumns,
    created_at: datetime,
    *,
    final: bool,
    excluded: list[str | None] | None = None,
) -> Statement:
    """PostgreSQL: the seq upsert (``_allocate_seqs``) and the messages' insert in ONE
    statement, the insert numbering each channel's messages in request order from the
    upsert's ``last_seq``; answers the upsert's rows. With nothing after it, the
    write pipeline sends it and the COMMIT in one round trip, where the upsert's rows
    had to come back before the insert could be sent (two round trips per batch)."""
    if excluded is None:
        return Statement(
            _store_at_once_sql(dialect.array_parameter),
            [created_at, names, counts, created_at, *messages],
            returns_rows=True,
            final=final,
            types=_STORE_AT_ONCE_TYPES,
        )
    return Statement(
        _store_at_once_sql(dialect.array_parameter, excluding=True),
        [created_at, names, counts, created_at, *messages, excluded],
        returns_rows=True,
        final=final,
        types=(*_STORE_AT_ONCE_TYPES, "text[]"),
    )


# The channels' (created_at, names, counts), then the messages' (created_at, channels,
# ids, data, publishers): the ids go as text, which the statement casts to uuid.
_STORE_AT_ONCE_TYPES = (
    *("timestamptz", "text[]", "bigint[]"),
    *("timestamptz", "text[]", "text[]", "text[]", "bigint[]"),
)


@functools.cache
def _store_at_once_sql(array: str, *, excluding: bool = False) -> str:
    """``excluding``: the messages' excluded Pusher sockets follow as one more array."""
    channels, messages = _table(Channel), _table(Message)
    column, value, array_x, name = (
        (", excluded_socket", ", t.x", f", {array}::text[]", ", x") if excluding else ("",) * 4
    )
    return (
        f"WITH s AS (INSERT INTO {channels} (name, last_seq, created_at) "  # noqa: S608
        f"SELECT n, c, %s FROM unnest({array}::text[], {array}::bigint[]) AS t(n, c) "
        "WHERE true ORDER BY n "
        f"ON CONFLICT (name) DO UPDATE SET last_seq = {channels}.last_seq + EXCLUDED.last_seq "
        "RETURNING id, name, last_seq), "
        f"m AS (INSERT INTO {messages} "
        f"(channel_id, seq, message_id, data, publisher_id, created_at{column}) "
        "SELECT s.id, s.last_seq - count(*) OVER w + row_number() OVER (w ORDER BY t.o), "
        f"t.m, t.d, t.p, %s{value} "
        f"FROM unnest({array}::text[], {array}::uuid[], {array}::text[], {array}::bigint[]"
        f"{array_x}) WITH ORDINALITY AS t(n, m, d, p{name}, o) JOIN s ON s.name = t.n "
        "WINDOW w AS (PARTITION BY t.n)) "
        "SELECT id, name, last_seq FROM s"
    )


def _allocate_seqs(
    dialect: Dialect, names: list[str], counts: list[int], created_at: datetime
) -> Statement:
    """ONE upsert takes the seqs of every channel of the batch: (id, name, last_seq).

    It creates a channel on its first message and otherwise adds the batch's count to
    ``last_seq`` under the row lock, which is held until the transaction commits, so
    publishers to one channel commit in seq order on every node. Rows are taken in
    name order, so two nodes' batches lock their channels in the same order and never
    deadlock.
    """
    table = _table(Channel)
    channels = dialect.rows([("n", "text"), ("c", "bigint")], [names, counts])
    return Statement(
        f"INSERT INTO {table} (name, last_seq, created_at) "  # noqa: S608
        f"SELECT n, c, %s FROM {channels.sql} WHERE true ORDER BY n "
        f"ON CONFLICT (name) DO UPDATE SET last_seq = {table}.last_seq + EXCLUDED.last_seq "
        "RETURNING id, name, last_seq",
        [dialect.timestamp(created_at), *channels.params],
        returns_rows=True,
    )


def _insert_messages(
    dialect: Dialect,
    messages: list[ChannelMessage],
    channel_ids: list[int],
    publishers: list[int | None],
    created_at: datetime,
    excluded: list[str | None] | None = None,
) -> Statement:
    table = _table(Message)
    columns = [("c", "bigint"), ("s", "bigint"), ("m", "uuid"), ("d", "text"), ("p", "bigint")]
    values: list[list[Any]] = [
        channel_ids,
        [m.seq for m in messages],
        [dialect.uuid(m.message_id) for m in messages],
        [m.data_json for m in messages],
        publishers,
    ]
    column = value = ""
    if excluded is not None:
        columns.append(("x", "text"))
        values.append(excluded)
        column, value = ", excluded_socket", ", x"
    rows = dialect.rows(columns, values)
    return Statement(
        f"INSERT INTO {table} (channel_id, seq, message_id, data, publisher_id, created_at"  # noqa: S608
        f"{column}) SELECT c, s, m, d, p, %s{value} FROM {rows.sql}",
        [dialect.timestamp(created_at), *rows.params],
    )


def _record_results(
    dialect: Dialect, units: Sequence[PublishUnit], keyed: list[int], outcomes: list[Outcome | None]
) -> Statement:
    scopes = []
    results = []
    for index in keyed:
        scope = units[index].key_scope
        outcome = outcomes[index]
        if scope is None or not isinstance(outcome, Published):
            continue
        scopes.append(scope)
        results.append(json.dumps([result_of(m) for m in outcome.messages]))
    table = _table(IdempotencyKey)
    rows = dialect.rows(
        [*_SCOPE_COLUMNS, ("r", "text")], [*([s[i] for s in scopes] for i in range(3)), results]
    )
    return Statement(
        f"UPDATE {table} SET result = t.r{dialect.json_cast} FROM {rows.sql} "  # noqa: S608
        f"WHERE {table}.principal = t.p AND {table}.channel = t.c AND {table}.key = t.k",
        rows.params,
        types=dialect.types(*rows.types),
    )


def result_of(message: ChannelMessage) -> dict[str, Any]:
    return {
        "channel": message.channel,
        "seq": message.seq,
        "message_id": message.message_id,
        "timestamp": message.timestamp,
    }


def run_plan_sync(units: Sequence[PublishUnit], *, window_secs: int) -> BatchOutcome:
    """Run one batch through Django's connection, in a transaction of its own or as a
    savepoint of the caller's (a failed statement then leaves the caller's intact)."""
    plan = batch_plan(
        units,
        micros=now_micros(),
        window_secs=window_secs,
        dialect=Dialect(connection.vendor),
    )
    with transaction.atomic(), connection.cursor() as cursor:
        try:
            statement = next(plan)
            while True:
                cursor.execute(statement.sql, statement.params)
                rows = cursor.fetchall() if statement.returns_rows else []
                statement = plan.send(rows)
        except StopIteration as done:
            return done.value
