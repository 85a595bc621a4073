"""What a ``trim_history`` pass deletes, what it costs with many channels, and how it
meets a database failure half-way."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.management import call_command
from django.db import DatabaseError, close_old_connections, connection
from django.db.models import Model
from django.test import override_settings
from django.utils import timezone

from push.models import Channel, Connection, IdempotencyKey, Message
from push.storage import retention
from push.storage.retention import history_trim
from push.tests.backends import terminate_backends

pytestmark = pytest.mark.django_db(transaction=True)

RULES = {
    "RETENTION_MAX_MESSAGES": 5,
    "RETENTION_MAX_AGE_SECS": 0,
    "RETENTION_RULES": [
        ("ticker:*", 3, None),
        ("chat:*", None, 3600),
        ("both:*", 4, 3600),
        ("keep:*", None, None),
    ],
    "HISTORY_MODES": [("tick:*", "recent")],
}


def _store(name: str, seqs: int, *, old: tuple[int, ...] = (), last_seq: int = 0) -> None:
    """A channel with messages 1..``seqs``; those in ``old`` two hours old."""
    channel = Channel.objects.create(name=name, last_seq=last_seq or seqs)
    now = timezone.now()
    Message.objects.bulk_create(
        _message(channel, seq, now - timedelta(hours=2) if seq in old else now)
        for seq in range(1, seqs + 1)
    )


def _message(channel: Channel, seq: int, at: datetime) -> Message:
    return Message(channel=channel, seq=seq, message_id=uuid.uuid4(), data="1", created_at=at)


def _kept(name: str) -> list[int]:
    return list(
        Message.objects.filter(channel__name=name).order_by("seq").values_list("seq", flat=True)
    )


@pytest.fixture
def queries() -> Iterator[list[tuple[str, int]]]:
    """Every statement run, with how many rows it touched."""
    run: list[tuple[str, int]] = []

    def counting(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        result = execute(sql, params, many, context)
        run.append((sql, context["cursor"].rowcount))
        return result

    with connection.execute_wrapper(counting):
        yield run


def _deletes(ran: list[tuple[str, int]]) -> list[int]:
    """The rows each statement that deleted messages deleted."""
    table = Message._meta.db_table
    return [rows for sql, rows in ran if sql.lstrip().startswith("DELETE") and table in sql]


@override_settings(PUSH=RULES)
@pytest.mark.parametrize("page", [2, 1000])
def test_a_pass_trims_each_rule_kind_whatever_the_page(
    page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "CHANNEL_PAGE", page)
    _store("news", 10)  # the default: 5 messages
    _store("ticker:a", 10)
    _store("ticker:b", 3)
    # Seq 6 stamped by a node whose clock ran behind: 5 goes too, kept is one run.
    _store("chat:old", 10, old=(1, 2, 3, 4, 6))
    _store("chat:young", 10)
    _store("both:count", 10, old=(1, 2))
    _store("both:age", 10, old=tuple(range(1, 9)))
    _store("keep:all", 10, old=tuple(range(1, 11)))
    _store("empty", 0)
    _store("tick:recent", 0, last_seq=100)  # a recent channel stores no rows
    _store("tick:durable-past", 3, last_seq=100)  # rows from before it was recent
    assert history_trim() == {
        "news": 5,
        "ticker:a": 7,
        "chat:old": 6,
        "both:count": 6,
        "both:age": 8,
        "tick:durable-past": 3,
    }
    assert {name: _kept(name) for name in ("news", "ticker:a", "ticker:b", "chat:old")} == {
        "news": [6, 7, 8, 9, 10],
        "ticker:a": [8, 9, 10],
        "ticker:b": [1, 2, 3],
        "chat:old": [7, 8, 9, 10],
    }
    assert {name: _kept(name) for name in ("both:count", "both:age", "tick:durable-past")} == {
        "both:count": [7, 8, 9, 10],
        "both:age": [9, 10],
        "tick:durable-past": [],
    }
    assert _kept("chat:young") == _kept("keep:all") == list(range(1, 11))
    assert history_trim() == {}


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 5, "RETENTION_MAX_AGE_SECS": 3600})
def test_a_pass_costs_queries_per_page_of_channels_not_per_channel(
    monkeypatch: pytest.MonkeyPatch, queries: list[tuple[str, int]]
) -> None:
    """A pass read each channel's oldest row with a query of its own, rule by rule: a
    million round trips for a million channels, nearly all finding nothing to trim."""
    monkeypatch.setattr(retention, "CHANNEL_PAGE", 500)
    channels = Channel.objects.bulk_create(
        Channel(name=f"user:{n}", last_seq=7 if n % 500 == 0 else 2) for n in range(2000)
    )
    Message.objects.bulk_create(
        _message(channel, seq, timezone.now())
        for channel in channels
        for seq in range(1, channel.last_seq + 1)
    )
    queries.clear()
    assert history_trim() == {f"user:{n}": 2 for n in range(0, 2000, 500)}
    pages = 2000 // 500 + 1  # (the last one finds none)
    # A page with a channel past its count limit: the delete, and the oldest rows left
    # read for the age limit; then the expired idempotency keys' delete.
    assert len(queries) <= pages + 4 * 2 + 1, len(queries)
    assert Message.objects.count() == 4 * 5 + 1996 * 2


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 5, "RETENTION_MAX_AGE_SECS": 3600})
def test_a_pass_deletes_past_count_limits_many_channels_a_statement(
    monkeypatch: pytest.MonkeyPatch, queries: list[tuple[str, int]]
) -> None:
    """Channels over their count limit every pass (busy instruments keeping their last
    1,000 messages) cost four or five queries each: 450,000 a pass for 100,000 of them."""
    monkeypatch.setattr(retention, "CHANNEL_PAGE", 500)
    monkeypatch.setattr(retention, "DELETE_BATCH", 300)
    now = timezone.now()
    rows = {n: range(1, 8) for n in range(2000)}  # 2 past the count limit each
    rows[0] = range(1, 1006)  # 1,000 past it: a backlog
    rows[1] = [1, 2, 50, 51, 52, 53, 54, 55, 56, 57]  # a gap: 5 past it, not 52
    channels = Channel.objects.bulk_create(
        Channel(name=f"ticker:{n}", last_seq=rows[n][-1]) for n in range(2000)
    )
    Message.objects.bulk_create(
        # Past the age limit beyond the count's: the age rule deletes 3 to 6 then.
        _message(channel, seq, now - timedelta(hours=2) if n == 2 and seq <= 6 else now)
        for n, channel in enumerate(channels)
        for seq in rows[n]
    )
    queries.clear()
    trimmed = history_trim()
    ran = list(queries)
    assert trimmed == {"ticker:0": 1000, "ticker:1": 5, "ticker:2": 6} | {
        f"ticker:{n}": 2 for n in range(3, 2000)
    }
    assert (_kept("ticker:0"), _kept("ticker:1")) == (list(range(1001, 1006)), [53, 54, 55, 56, 57])
    assert _kept("ticker:2") == [7] and _kept("ticker:1999") == [3, 4, 5, 6, 7]
    pages = 2000 // 500 + 1  # (the last one finds none)
    # Each page: its statements of 300 rows, a last one with fewer, and the oldest rows
    # left read for the age limit, with their windows; ticker:2's delete by age and the
    # expired idempotency keys' delete.
    assert len(ran) <= pages + sum(trimmed.values()) // 300 + 4 * 2 + 1 + 1, len(ran)
    deletes = _deletes(ran)
    assert max(deletes) <= 300 and sum(deletes) == sum(trimmed.values()), deletes


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 0, "RETENTION_MAX_AGE_SECS": 3600})
def test_a_pass_deletes_past_age_limits_many_channels_a_statement(
    monkeypatch: pytest.MonkeyPatch, queries: list[tuple[str, int]]
) -> None:
    """Per-user chat channels that each age a little every pass cost about four
    queries each: 400,000 a pass for 100,000 of them, longer than ``--every``."""
    monkeypatch.setattr(retention, "CHANNEL_PAGE", 500)
    monkeypatch.setattr(retention, "DELETE_BATCH", 300)
    channels = Channel.objects.bulk_create(
        Channel(name=f"chat:{n}", last_seq=4) for n in range(2000)
    )
    old = timezone.now() - timedelta(hours=2)
    Message.objects.bulk_create(
        _message(channel, seq, old if seq <= 3 else timezone.now())
        for channel in channels
        for seq in range(1, 5)
    )
    queries.clear()
    trimmed = history_trim()
    ran = list(queries)
    assert trimmed == {f"chat:{n}": 3 for n in range(2000)}
    assert set(Message.objects.values_list("seq", flat=True)) == {4}
    assert Message.objects.count() == 2000
    pages = 2000 // 500 + 1  # (the last one finds none)
    # Each page: its aging channels' oldest rows read together, the deletes of 300
    # rows (1,500 a page); then the expired idempotency keys' delete.
    assert len(ran) <= pages + 4 * (1 + 1500 // 300) + 1, len(ran)
    assert max(_deletes(ran)) <= 300 and sum(_deletes(ran)) == 6000


@override_settings(PUSH=RULES)
def test_an_age_trim_walks_windows_of_delete_batch_rows_from_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row stamped by a node whose clock runs behind, between older ones, goes with
    them: what is kept is one run of seqs. The trim looks for old rows in a window of
    DELETE_BATCH rows from the oldest, again while the oldest row left is old."""
    monkeypatch.setattr(retention, "DELETE_BATCH", 4)
    _store("chat:skewed", 10, old=(1, 2, 4))  # 3 goes with 1, 2 and 4
    _store("chat:windows", 10, old=(1, 2, 3, 4, 5, 7))  # a window of old rows, then 5 to 7
    _store("chat:beyond", 10, old=(1, 3, 5))  # 5 is past the window, after a young row
    _store("chat:next-young", 10, old=(1, 2, 3, 4, 6))  # the next window starts young
    _store("chat:first-young", 10, old=(2, 3))  # the oldest row is inside the limit
    _store("both:skewed", 10, old=(5, 7))  # 1 to 6 past the count; 7 then by age
    assert history_trim() == {
        "chat:skewed": 4,
        "chat:windows": 7,
        "chat:beyond": 3,
        "chat:next-young": 4,
        "both:skewed": 7,
    }
    # Rows past the limit after a young one are left (every read drops them all the
    # same): a run of seqs is kept whatever the clocks.
    assert {name: _kept(name) for name in ("chat:skewed", "chat:windows", "chat:beyond")} == {
        "chat:skewed": [5, 6, 7, 8, 9, 10],
        "chat:windows": [8, 9, 10],
        "chat:beyond": [4, 5, 6, 7, 8, 9, 10],
    }
    assert _kept("chat:next-young") == [5, 6, 7, 8, 9, 10]
    assert (_kept("chat:first-young"), _kept("both:skewed")) == (list(range(1, 11)), [8, 9, 10])


@override_settings(PUSH=RULES)
def test_an_age_backlog_is_deleted_in_rounds_of_bounded_statements(
    monkeypatch: pytest.MonkeyPatch, queries: list[tuple[str, int]]
) -> None:
    """After a long pause of the job, a channel holds many windows of old rows."""
    monkeypatch.setattr(retention, "DELETE_BATCH", 300)
    # Seq 500 stamped by a node whose clock ran ahead: it goes with the old rows around.
    _store("chat:backlog", 1005, old=tuple(n for n in range(1, 1001) if n != 500))
    for n in range(3):
        _store(f"chat:{n}", 5, old=(1, 2))
    queries.clear()
    assert history_trim() == {"chat:backlog": 1000} | {f"chat:{n}": 2 for n in range(3)}
    assert _kept("chat:backlog") == list(range(1001, 1006))
    assert {_kept(f"chat:{n}") == [3, 4, 5] for n in range(3)} == {True}
    assert max(_deletes(queries)) <= 300 and sum(_deletes(queries)) == 1006


def _idempotency_key(n: int, at: datetime) -> IdempotencyKey:
    return IdempotencyKey.objects.create(principal="user:1", channel="c", key=str(n), created_at=at)


def _closed_connection(n: int, at: datetime) -> Connection:
    return Connection.objects.create(
        connection_id=uuid.uuid4(), server_id="gone", connected_at=at, disconnected_at=at
    )


@override_settings(PUSH={"IDEMPOTENCY_WINDOW_SECS": 3600, "REGISTRY_CLOSED_RETENTION_SECS": 3600})
@pytest.mark.parametrize("expiring", [_idempotency_key, _closed_connection])
def test_expired_rows_are_deleted_in_bounded_batches(
    expiring: Callable[[int, datetime], Model],
    monkeypatch: pytest.MonkeyPatch,
    queries: list[tuple[str, int]],
) -> None:
    """After a long pause of the job one statement deleted every expired key (every
    closed connection's row): the locks and WAL of millions of rows in one transaction."""
    monkeypatch.setattr(retention, "DELETE_BATCH", 3)
    now = timezone.now()
    kept = [expiring(n, now) for n in range(2)]
    for n in range(2, 12):
        expiring(n, now - timedelta(hours=2))
    queries.clear()
    call_command("trim_history", stdout=io.StringIO())
    model = type(kept[0])
    table = model._meta.db_table
    deletes = [rows for sql, rows in queries if sql.startswith("DELETE") and table in sql]
    assert sum(deletes) == 10 and max(deletes) <= 3, deletes
    assert set(model.objects.values_list("pk", flat=True)) == {row.pk for row in kept}


class _Stop(Exception):
    """Raised when the test has seen the passes it waited for."""


@pytest.fixture
def ended_after_first_page() -> Iterator[None]:
    """PostgreSQL ends the trim's connection (a restart, a failover) once, right after
    the first page of channels was read."""
    ended: list[int] = []

    def ending(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        reads_channels = sql.lstrip().startswith("SELECT") and Channel._meta.db_table in sql
        if reads_channels and not ended:
            ended.append(connection.connection.info.backend_pid)
            terminate_backends(ended[0])
        return result

    with connection.execute_wrapper(ending):
        yield
    close_old_connections()
    assert ended, "the connection was ended"


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 2})
@pytest.mark.usefixtures("ended_after_first_page")
def test_a_pass_ended_half_way_is_told_and_the_next_pass_trims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from push.management.commands import trim_history

    monkeypatch.setattr(retention, "CHANNEL_PAGE", 2)
    for n in range(5):
        _store(f"orders:{n}", 4)
    passes: list[float] = []

    def between_passes(secs: float) -> None:
        passes.append(secs)
        if len(passes) == 2:
            raise _Stop

    monkeypatch.setattr(trim_history, "time", SimpleNamespace(sleep=between_passes))
    out, errors = io.StringIO(), io.StringIO()
    with pytest.raises(_Stop):
        call_command("trim_history", "--every", "300", stdout=out, stderr=errors)
    failed = errors.getvalue().strip()
    assert failed.startswith("trim pass failed: ") and failed.endswith("; next in 300 s")
    assert out.getvalue().splitlines() == [
        "trimmed 10 messages in 5 channels",
        "deleted 0 closed connections",
    ]
    assert {_kept(f"orders:{n}") == [3, 4] for n in range(5)} == {True}


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 2})
@pytest.mark.usefixtures("ended_after_first_page")
def test_a_single_pass_ended_half_way_fails_the_command() -> None:
    _store("orders", 4)
    with pytest.raises(DatabaseError):
        call_command("trim_history", stdout=io.StringIO())
