"""The group-commit write pipeline against the real PostgreSQL: batching, seq order,
a refused message failing alone, idempotency inside and across batches and after
retention, all-or-nothing batch requests, the queue bound, an unreachable database."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.db import connection
from django.test import override_settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.models import ChannelGrant
from common.errors import ErrorCode, PushError
from push.fanout.message import ChannelMessage
from push.models import Channel, Message
from push.services.publishing import message_publish_queued, messages_publish_batch
from push.services.runtime import get_node
from push.storage.history import DatabaseHistory
from push.storage.pipelined_connection import PipelineAborted, PipelinedConnection
from push.storage.retention import history_trim
from push.storage.write_batch import (
    POSTGRESQL_BINARY_ARRAYS,
    Published,
    PublishUnit,
    batch_plan,
    now_micros,
)
from push.storage.write_pipeline import (
    LOCK_WAIT_SECS,
    THIRD_BATCH_MIN_MESSAGES,
    WritePipeline,
    pipeline_conninfo,
)
from push.tests.backends import terminate_backends

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


def _pipeline(committed: list[ChannelMessage], **overrides: Any) -> WritePipeline:
    options: dict[str, Any] = {
        "conninfo": pipeline_conninfo(connection.get_connection_params()),
        "on_committed": committed.append,
        "window_secs": 3600,
        "max_batch_messages": 1000,
        "max_batch_bytes": 4 * 1_048_576,
        "max_queue_messages": 10_000,
        "max_queue_bytes": 64 * 1_048_576,
        "connect_timeout_secs": 2.0,
        "write_timeout_secs": 5.0,
    }
    options.update(overrides)
    pipeline = WritePipeline(**options)
    pipeline.start()
    return pipeline


def _unit(channel: str, n: int, **kwargs: Any) -> PublishUnit:
    return PublishUnit(
        items=[(channel, json.dumps({"n": n}))], publisher_id=None, key_channel=channel, **kwargs
    )


def _stored(channel: str) -> list[tuple[int, dict[str, Any], float]]:
    rows = Message.objects.filter(channel__name=channel).order_by("seq")
    return [(r.seq, json.loads(r.data), r.created_at.timestamp()) for r in rows]


async def test_concurrent_publishes_share_transactions_with_consecutive_seqs() -> None:
    committed: list[ChannelMessage] = []
    pipeline = _pipeline(committed)
    try:
        # Queued while the first batch is written: they go in the next transactions.
        units = [_unit(f"ch{i % 3}", i) for i in range(300)]
        outcomes = await asyncio.gather(*(pipeline.publish(u) for u in units))
    finally:
        await pipeline.stop()
    assert all(isinstance(o, Published) and not o.replayed for o in outcomes)
    for c in range(3):
        rows = await sync_to_async(_stored)(f"ch{c}")
        # Gapless from 1, in the order the publishes were made.
        assert [seq for seq, _, _ in rows] == list(range(1, 101))
        assert [data["n"] for _, data, _ in rows] == list(range(c, 300, 3))
    # One transaction's messages share their timestamp: far fewer than 300 commits.
    transactions = {ts for c in range(3) for _, _, ts in await sync_to_async(_stored)(f"ch{c}")}
    assert len(transactions) < 30
    # Each publisher got its own message; broadcast in seq order per channel.
    assert [o.messages[0].data_json for o in outcomes] == [u.items[0][1] for u in units]
    for c in range(3):
        assert [m.seq for m in committed if m.channel == f"ch{c}"] == list(range(1, 101))


async def test_each_batch_is_counted_in_the_write_batch_histograms() -> None:
    """Sent behind others or written alone (keyed), each transaction is observed once:
    its messages (all of them, in all) and its time, in /metrics' series."""
    from prometheus_client import REGISTRY

    def snapshot() -> tuple[float, ...]:
        return tuple(
            REGISTRY.get_sample_value(name, labels) or 0.0
            for name, labels in (
                ("push_write_batch_messages_count", {}),
                ("push_write_batch_messages_bucket", {"le": "+Inf"}),
                ("push_write_batch_seconds_count", {}),
                ("push_write_batch_messages_sum", {}),
            )
        )

    before = snapshot()
    pipeline = _pipeline([])
    try:
        units = [_unit(f"m{i % 2}", i) for i in range(40)]
        outcomes = await asyncio.gather(*(pipeline.publish(u) for u in units))
        keyed = _unit("m0", 40, principal="p", idempotency_key="histogram")
        outcomes.append(await pipeline.publish(keyed))  # a batch written alone
    finally:
        await pipeline.stop()
    assert all(isinstance(o, Published) for o in outcomes)
    batches, in_buckets, timed, messages = (a - b for a, b in zip(snapshot(), before, strict=True))
    assert 2 <= batches <= 41
    assert in_buckets == timed == batches
    assert messages == 41


async def test_data_with_quotes_backslashes_and_any_script_is_stored_as_published() -> None:
    """The pipeline sends its rows as binary arrays: nothing to quote or escape."""
    values = ['a "quoted" \\ back\\slash', "{}[],", "é ü 漢字 😀", "\u2028", "NULL", ""]
    units = [
        PublishUnit(items=[("escapes", json.dumps(v, ensure_ascii=False))], publisher_id=None)
        for v in values
    ]
    pipeline = _pipeline([])
    try:
        outcomes = await asyncio.gather(*(pipeline.publish(u) for u in units))
    finally:
        await pipeline.stop()
    assert all(isinstance(o, Published) for o in outcomes)
    assert [data for _, data, _ in await sync_to_async(_stored)("escapes")] == values


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
async def test_a_pusher_socket_excluded_by_a_publish_is_stored_with_its_messages(
    prepared: bool,
) -> None:
    """A gap repair reads it back with them (``Hub._repair``); the other publishes of
    the batch store none."""
    pipeline = _pipeline([], prepared=prepared)
    try:
        units = [_unit("excluding", n) for n in range(4)]
        units[1] = _unit("excluding", 1, exclude="12.34")
        units[2] = PublishUnit(
            items=[("excluding", "2"), ("excluding-too", "2")], publisher_id=None, exclude="5.6"
        )
        outcomes = await asyncio.gather(*(pipeline.publish(u) for u in units))
    finally:
        await pipeline.stop()
    assert all(isinstance(o, Published) for o in outcomes)
    page = await DatabaseHistory().stored_page("excluding", 0, 10, 10**6)
    assert [(m.seq, m.exclude) for m in page.messages] == [
        (1, None),
        (2, "12.34"),
        (3, "5.6"),
        (4, None),
    ]
    (other,) = (await DatabaseHistory().stored_page("excluding-too", 0, 10, 10**6)).messages
    assert other.exclude == "5.6"


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
async def test_a_refused_message_fails_alone_and_the_rest_commit(prepared: bool) -> None:
    committed: list[ChannelMessage] = []
    pipeline = _pipeline(committed, prepared=prepared)
    try:
        units = [_unit("mixed", i) for i in range(20)]
        # No such user: the foreign key refuses this one (at COMMIT, it is deferred).
        units[7] = PublishUnit(items=[("mixed", "7")], publisher_id=2_000_000_000)
        outcomes = await asyncio.gather(*(pipeline.publish(u) for u in units))
    finally:
        await pipeline.stop()
    refused = outcomes[7]
    assert isinstance(refused, PushError) and refused.code is ErrorCode.INVALID_MESSAGE
    assert all(isinstance(o, Published) for i, o in enumerate(outcomes) if i != 7)
    rows = await sync_to_async(_stored)("mixed")
    assert [seq for seq, _, _ in rows] == list(range(1, 20))  # no gap where it failed
    assert [data["n"] for _, data, _ in rows] == [i for i in range(20) if i != 7]
    assert [m.seq for m in committed] == list(range(1, 20))


async def test_a_batch_sent_behind_a_refused_one_is_written_after_it() -> None:
    """A batch is sent before the one ahead of it committed; when that one is refused,
    PostgreSQL skips the batch behind it, which is then written again, not lost."""
    committed: list[ChannelMessage] = []
    pipeline = _pipeline(committed)
    try:
        refused = pipeline.submit(PublishUnit(items=[("behind", "0")], publisher_id=2_000_000_000))
        await asyncio.sleep(0)  # the writer sends it
        behind = [pipeline.submit(_unit("behind", n)) for n in (1, 2)]
        outcomes = await asyncio.gather(refused, *behind)
    finally:
        await pipeline.stop()
    assert isinstance(outcomes[0], PushError) and outcomes[0].code is ErrorCode.INVALID_MESSAGE
    assert [seq for seq, _, _ in await sync_to_async(_stored)("behind")] == [1, 2]
    assert [o.messages[0].seq for o in outcomes[1:] if isinstance(o, Published)] == [1, 2]
    assert [m.seq for m in committed] == [1, 2]


async def _held_row(pipeline: WritePipeline, channel: str) -> psycopg.AsyncConnection[Any]:
    """``channel``'s row, made by a first publish (seq 1), locked by another
    transaction: the connection returned holds it until its ``rollback()``, and the
    caller closes it."""
    assert isinstance(await pipeline.publish(_unit(channel, 0)), Published)
    locker = await psycopg.AsyncConnection.connect(
        **pipeline_conninfo(connection.get_connection_params())
    )
    await locker.execute("SELECT 1 FROM push_channel WHERE name = %s FOR UPDATE", [channel])
    return locker


async def test_a_channel_keeps_its_order_when_the_batch_ahead_times_out_on_a_lock() -> None:
    """The first publish waits on a row another transaction holds and gives up; the
    second, sent behind it, must not commit first even if the lock is released in
    between (as it would on a connection that ran the second after the first failed)."""
    pipeline = _pipeline([])
    locker = await _held_row(pipeline, "held")
    try:
        first = pipeline.submit(_unit("held", 1))
        await asyncio.sleep(0.05)  # sent, and waiting on the lock
        second = pipeline.submit(_unit("held", 2))
        await asyncio.sleep(LOCK_WAIT_SECS + 0.1)  # the first gave up on the lock
        await locker.rollback()
        outcomes = await asyncio.wait_for(asyncio.gather(first, second), 10)
    finally:
        await locker.close()
        await pipeline.stop()
    assert [o.messages[0].seq for o in outcomes if isinstance(o, Published)] == [2, 3]
    stored = await sync_to_async(_stored)("held")
    assert [(seq, data["n"]) for seq, data, _ in stored] == [(1, 0), (2, 1), (3, 2)]


async def test_a_keyed_batch_held_behind_a_failing_one_keeps_the_channels_order() -> None:
    """One publisher's two publishes of a channel, the first sent behind a batch that
    fails (it waits on a row lock and gives up), the second queued after it in a batch
    with an idempotency key (held, to be written alone): the first is sent again after
    the failing one's retry, and the second must not be written before it."""
    pipeline = _pipeline([])
    locker = await _held_row(pipeline, "held")
    try:
        blocked = pipeline.submit(_unit("held", 1))
        await asyncio.sleep(0.05)  # sent, and waiting on the lock
        first = pipeline.submit(_unit("ordered", 1))
        await asyncio.sleep(0.01)  # sent behind it, the second in flight
        # Enough waiting for a third batch: taken now, and held for its key.
        keyed = pipeline.submit(_unit("other", 1, principal="p", idempotency_key="k"))
        second = pipeline.submit(_unit("ordered", 2))
        fillers = [pipeline.submit(_unit("filler", n)) for n in range(THIRD_BATCH_MIN_MESSAGES)]
        await asyncio.sleep(LOCK_WAIT_SECS + 0.1)  # the blocked one gave up on the lock
        await locker.rollback()
        outcomes = await asyncio.wait_for(
            asyncio.gather(blocked, first, keyed, second, *fillers), 10
        )
    finally:
        await locker.close()
        await pipeline.stop()
    assert all(isinstance(o, Published) for o in outcomes)
    stored = await sync_to_async(_stored)("ordered")
    assert [(seq, data["n"]) for seq, data, _ in stored] == [(1, 1), (2, 2)]


async def test_a_node_stopping_while_the_batch_ahead_fails_answers_the_batch_behind() -> None:
    """The node stops with two batches in flight; the first gives up on a row lock, so
    the one behind it goes back to the queue, which the stop had already answered: it
    is answered too, never left waiting for a writer that is gone."""
    pipeline = _pipeline([])
    locker = await _held_row(pipeline, "held")
    try:
        blocked = pipeline.submit(_unit("held", 1))
        await asyncio.sleep(0.05)  # sent, and waiting on the lock
        behind = pipeline.submit(_unit("behind", 1))
        await asyncio.sleep(0.01)  # sent behind it
        await pipeline.stop()
        await locker.rollback()
        outcome = await asyncio.wait_for(behind, 5)
    finally:
        await locker.close()
        await pipeline.stop()
    assert isinstance(outcome, PushError) and outcome.code is ErrorCode.UNAVAILABLE
    assert await sync_to_async(_stored)("behind") == []
    # The blocked one went to the slow lane, and commits once the lock is released.
    assert isinstance(await asyncio.wait_for(blocked, 10), Published)


async def test_a_node_stopping_while_a_batch_is_written_alone_answers_it() -> None:
    """A keyed batch (written alone) splits again and again on a row lock, past the
    write timeout that a stopping node waits for its writer: the writer is cancelled,
    and the batch's publishers are answered, not left waiting."""
    pipeline = _pipeline([], write_timeout_secs=0.5)
    locker = await _held_row(pipeline, "held")
    try:
        keyed = [
            pipeline.submit(_unit("held", n, principal="p", idempotency_key=f"k{n}"))
            for n in range(1, 5)
        ]
        await asyncio.sleep(0.05)  # being written, and waiting on the lock
        await pipeline.stop()
        outcomes = await asyncio.wait_for(asyncio.gather(*keyed), 5)
    finally:
        await locker.close()
        await pipeline.stop()
    published = [o.messages[0].data_json for o in outcomes if isinstance(o, Published)]
    assert all(
        isinstance(o, PushError) and o.code is ErrorCode.UNAVAILABLE
        for o in outcomes
        if not isinstance(o, Published)
    )
    # Nothing answered UNAVAILABLE was stored after all.
    stored = await sync_to_async(_stored)("held")
    assert [json.dumps(data) for _, data, _ in stored[1:]] == published


async def test_publishes_piling_up_behind_a_held_lock_are_each_answered_in_time() -> None:
    """A channel's row held by another transaction past the write timeout: its
    publishes queue in the slow lane one behind the other, and each is answered within
    the write timeout of entering it, not after those ahead of it each waited theirs
    (the n-th publisher would wait n timeouts)."""
    pipeline = _pipeline([], write_timeout_secs=0.5)
    loop = asyncio.get_running_loop()
    locker = await _held_row(pipeline, "held")
    try:
        started = loop.time()
        waiting = [pipeline.submit(_unit("held", n)) for n in range(1, 7)]
        outcomes = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        answered_after = loop.time() - started
        await locker.rollback()
        later = await pipeline.publish(_unit("held", 7))
    finally:
        await locker.close()
        await pipeline.stop()
    assert answered_after < LOCK_WAIT_SECS + 0.5 + 0.5
    for outcome in outcomes:
        assert isinstance(outcome, PushError) and outcome.code is ErrorCode.UNAVAILABLE
        assert outcome.message == "the channel is busy; retry"
    assert isinstance(later, Published) and later.messages[0].seq == 2


async def test_a_refused_keyed_publish_fails_alone_and_the_connection_stays_usable() -> None:
    """The same with idempotency keys (a batch of several statements, its own BEGIN and
    COMMIT): the refused transaction is rolled back, the halves are written on the same
    connection, and the keys of the refused publish are not kept."""
    committed: list[ChannelMessage] = []
    pipeline = _pipeline(committed)
    try:
        units = [_unit("keyed", i, principal="p", idempotency_key=f"k{i}") for i in range(10)]
        units[3] = PublishUnit(
            items=[("keyed", "3")],
            publisher_id=2_000_000_000,
            principal="p",
            idempotency_key="k3",
            key_channel="keyed",
        )
        outcomes = await asyncio.gather(*(pipeline.publish(u) for u in units))
        again = await pipeline.publish(_unit("keyed", 3, principal="p", idempotency_key="k3"))
    finally:
        await pipeline.stop()
    refused = outcomes[3]
    assert isinstance(refused, PushError) and refused.code is ErrorCode.INVALID_MESSAGE
    assert all(isinstance(o, Published) for i, o in enumerate(outcomes) if i != 3)
    assert isinstance(again, Published) and not again.replayed and again.messages[0].seq == 10
    rows = await sync_to_async(_stored)("keyed")
    assert [seq for seq, _, _ in rows] == list(range(1, 11))
    assert [m.seq for m in committed] == list(range(1, 11))


async def test_a_keyed_batch_refused_mid_transaction_is_rolled_back_for_its_retry() -> None:
    """A statement refused inside the transaction (a channel name longer than its
    column, which the services never let through) leaves it aborted: rolled back, the
    same connection writes the rest, and the next batch too."""
    pipeline = _pipeline([])
    try:
        await pipeline.publish(_unit("aborted", 100))
        backend = pipeline._connection
        units = [_unit("aborted", i, principal="p", idempotency_key=f"k{i}") for i in range(6)]
        long_name = "x" * 150
        units[2] = PublishUnit(
            items=[(long_name, "2")],
            publisher_id=None,
            principal="p",
            idempotency_key="k2",
            key_channel=long_name,
        )
        outcomes = await asyncio.gather(*(pipeline.publish(u) for u in units))
        later = await pipeline.publish(_unit("aborted", 9, principal="p", idempotency_key="k9"))
        assert pipeline._connection is backend  # never replaced: it was left clean
    finally:
        await pipeline.stop()
    refused = outcomes[2]
    assert isinstance(refused, PushError) and refused.code is ErrorCode.INVALID_MESSAGE
    assert [o.messages[0].seq for i, o in enumerate(outcomes) if i != 2] == [2, 3, 4, 5, 6]
    assert isinstance(later, Published) and later.messages[0].seq == 7


async def test_retries_with_one_key_publish_once_in_one_batch_and_across_batches() -> None:
    committed: list[ChannelMessage] = []
    pipeline = _pipeline(committed)
    key = {"principal": "user:1", "idempotency_key": "k1"}
    try:
        together = await asyncio.gather(
            *(pipeline.publish(_unit("orders", 1, **key)) for _ in range(5))
        )
        later = await pipeline.publish(_unit("orders", 1, **key))
        other_scope = await pipeline.publish(
            _unit("orders", 1, principal="user:2", idempotency_key="k1")
        )
    finally:
        await pipeline.stop()
    assert all(isinstance(o, Published) for o in [*together, later, other_scope])
    first = together[0]
    assert isinstance(first, Published) and not first.replayed
    for retry in [*together[1:], later]:
        assert isinstance(retry, Published) and retry.replayed
        assert retry.messages[0].message_id == first.messages[0].message_id
        assert retry.messages[0].seq == 1
    assert isinstance(other_scope, Published) and other_scope.messages[0].seq == 2
    assert [m.seq for m in committed] == [1, 2]


async def test_retries_racing_on_two_nodes_publish_once() -> None:
    """Two pipelines (two nodes' connections): the second's key insert waits on the
    first's uncommitted row, then answers from its committed result."""
    committed: list[ChannelMessage] = []
    pipelines = [_pipeline(committed), _pipeline(committed)]
    try:
        outcomes = await asyncio.gather(
            *(
                pipelines[i % 2].publish(
                    PublishUnit(
                        items=[("race", "1"), ("race", "2")],
                        publisher_id=None,
                        principal="user:1",
                        idempotency_key=f"k{i // 4}",
                    )
                )
                for i in range(16)
            )
        )
    finally:
        for pipeline in pipelines:
            await pipeline.stop()
    assert all(isinstance(o, Published) for o in outcomes)
    for key in range(4):
        group = [o for i, o in enumerate(outcomes) if i // 4 == key]
        assert sum(not o.replayed for o in group if isinstance(o, Published)) == 1
        assert len({tuple(m.message_id for m in o.messages) for o in group}) == 1
    assert [seq for seq, _, _ in await sync_to_async(_stored)("race")] == list(range(1, 9))
    assert sorted(m.seq for m in committed) == list(range(1, 9))


async def test_a_publisher_that_leaves_does_not_break_the_batch() -> None:
    committed: list[ChannelMessage] = []
    pipeline = _pipeline(committed)
    try:
        tasks = [asyncio.ensure_future(pipeline.publish(_unit("leave", i))) for i in range(10)]
        await asyncio.sleep(0)  # one loop turn, not a wait: every publish has begun
        tasks[3].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await pipeline.stop()
    assert isinstance(done[3], asyncio.CancelledError)
    assert [seq for seq, _, _ in await sync_to_async(_stored)("leave")] == list(range(1, 11))


async def test_a_full_queue_is_refused_unavailable() -> None:
    pipeline = _pipeline([], max_queue_messages=2)
    try:
        first = pipeline.submit(_unit("q", 1))
        pipeline.submit(_unit("q", 2))
        with pytest.raises(PushError) as refused:
            pipeline.submit(_unit("q", 3))
        assert refused.value.code is ErrorCode.UNAVAILABLE
        assert isinstance(await first, Published)
    finally:
        await pipeline.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_database_answers_unavailable_promptly() -> None:
    conninfo = pipeline_conninfo(connection.get_connection_params())
    pipeline = _pipeline([], conninfo={**conninfo, "host": "127.0.0.1", "port": _closed_port()})
    try:
        started = asyncio.get_running_loop().time()
        outcomes = await asyncio.gather(*(pipeline.publish(_unit("down", i)) for i in range(5)))
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        await pipeline.stop()
    assert all(isinstance(o, PushError) and o.code is ErrorCode.UNAVAILABLE for o in outcomes)


async def test_a_connection_that_broke_while_idle_costs_a_reconnect_not_the_batch() -> None:
    pipeline = _pipeline([])
    try:
        assert isinstance(await pipeline.publish(_unit("idle", 1)), Published)
        backend = pipeline._connection
        assert backend is not None
        # As after a PostgreSQL restart: the idle connection is gone (its backend has
        # exited, as every backend has once a restarted server takes connections).
        await asyncio.to_thread(terminate_backends, backend.info.backend_pid)
        again = await pipeline.publish(_unit("idle", 2))
        assert isinstance(again, Published) and again.messages[0].seq == 2
    finally:
        await pipeline.stop()


class SilentProxy:
    """Forwards to PostgreSQL until ``go_silent``: then it swallows every byte and
    closes nothing, like a network path that lost its packets."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = False
        self.silent_after_commit = False
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, replies: bool
        ) -> None:
            while data := await source.read(65536):
                if self.silent_after_commit and not replies and b"COMMIT" in data:
                    # The COMMIT reaches the server; what it answers does not come back.
                    sink.write(data)
                    self.silent = True
                elif not self.silent:
                    sink.write(data)

        await asyncio.gather(
            pipe(reader, upstream_writer, replies=False),
            pipe(upstream_reader, writer, replies=True),
        )

    def go_silent(self) -> None:
        self.silent = True

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_database_that_stops_answering_is_given_up_after_the_write_timeout() -> None:
    conninfo = pipeline_conninfo(connection.get_connection_params())
    proxy = SilentProxy((conninfo.get("host", "127.0.0.1"), int(conninfo.get("port", 5432))))
    port = await proxy.start()
    pipeline = _pipeline(
        [], conninfo={**conninfo, "host": "127.0.0.1", "port": port}, write_timeout_secs=1.0
    )
    try:
        assert isinstance(await pipeline.publish(_unit("silent", 1)), Published)
        proxy.go_silent()
        started = asyncio.get_running_loop().time()
        lost = await asyncio.wait_for(pipeline.publish(_unit("silent", 2)), 10)
        assert asyncio.get_running_loop().time() - started < 3
        assert isinstance(lost, PushError) and lost.code is ErrorCode.UNAVAILABLE
        proxy.silent = False  # a new connection through it works again
        again = await asyncio.wait_for(pipeline.publish(_unit("silent", 3)), 10)
        assert isinstance(again, Published) and again.messages[0].seq == 2
    finally:
        await pipeline.stop()
        proxy.close()


class _TimedLink:
    """Stands for the connection: when, and why, the pipeline gave it up."""

    def __init__(self) -> None:
        self.closed: list[tuple[float, BaseException | None]] = []

    def close(self, reason: BaseException | None = None) -> None:
        self.closed.append((asyncio.get_running_loop().time(), reason))


async def test_the_write_timeout_counts_from_the_last_batch_settled() -> None:
    """Armed again as each batch settles with others in flight (``_settle_oldest``),
    the deadline moves on: a connection that answers, however long in all, is kept; one
    that stops is given up the write timeout after it last answered, not before."""
    pipeline = _pipeline([], write_timeout_secs=0.3)
    link: Any = _TimedLink()
    loop = asyncio.get_running_loop()
    try:
        pipeline._arm_deadline(link)
        for _ in range(4):  # 0.6 s in all, a batch settled every 0.15 s
            await asyncio.sleep(0.15)
            last = loop.time()
            pipeline._disarm_deadline()
            pipeline._arm_deadline(link)
        assert link.closed == []
        await asyncio.sleep(0.6)
        [(closed_at, reason)] = link.closed
        assert 0.3 - 0.002 <= closed_at - last < 0.5
        assert isinstance(reason, TimeoutError)
    finally:
        await pipeline.stop()


async def test_a_disarmed_write_timeout_gives_up_nothing() -> None:
    """Disarmed (nothing in flight), the connection is kept however long it idles;
    armed again, the timeout counts from then."""
    pipeline = _pipeline([], write_timeout_secs=0.2)
    link: Any = _TimedLink()
    loop = asyncio.get_running_loop()
    try:
        pipeline._arm_deadline(link)
        await asyncio.sleep(0.1)
        pipeline._disarm_deadline()
        await asyncio.sleep(0.3)
        assert link.closed == []
        armed = loop.time()
        pipeline._arm_deadline(link)
        await asyncio.sleep(0.4)
        [(closed_at, _reason)] = link.closed
        assert 0.2 - 0.002 <= closed_at - armed < 0.4
    finally:
        await pipeline.stop()


@pytest.mark.parametrize("keyed", [False, True], ids=["sent behind others", "written alone"])
async def test_a_commit_whose_answer_is_lost_is_never_acknowledged_nor_written_again(
    keyed: bool,
) -> None:
    """The COMMIT reaches PostgreSQL, which commits, and its answer is lost: the
    publisher is answered UNAVAILABLE (the outcome is unknown, and the message says
    so), the batch is not written a second time, and a retry with its key answers the
    first result."""
    conninfo = pipeline_conninfo(connection.get_connection_params())
    proxy = SilentProxy((conninfo.get("host", "127.0.0.1"), int(conninfo.get("port", 5432))))
    port = await proxy.start()
    committed: list[ChannelMessage] = []
    pipeline = _pipeline(
        committed, conninfo={**conninfo, "host": "127.0.0.1", "port": port}, write_timeout_secs=1.0
    )
    key = {"principal": "p", "idempotency_key": "k"} if keyed else {}
    try:
        assert isinstance(await pipeline.publish(_unit("lost", 1)), Published)
        proxy.silent_after_commit = True
        lost = await asyncio.wait_for(pipeline.publish(_unit("lost", 2, **key)), 10)
        proxy.silent = proxy.silent_after_commit = False
        again = await asyncio.wait_for(pipeline.publish(_unit("lost", 2, **key)), 10)
    finally:
        await pipeline.stop()
        proxy.close()
    assert isinstance(lost, PushError) and lost.code is ErrorCode.UNAVAILABLE
    assert "may have been stored" in lost.message
    stored = [(seq, data["n"]) for seq, data, _ in await sync_to_async(_stored)("lost")]
    assert isinstance(again, Published)
    if keyed:
        assert again.replayed and again.messages[0].seq == 2
        assert stored == [(1, 1), (2, 2)]
    else:  # no key: the retry is a second publish, as the contract says
        assert not again.replayed and again.messages[0].seq == 3
        assert stored == [(1, 1), (2, 2), (3, 2)]
    assert 2 not in [m.seq for m in committed]  # never answered, never broadcast here


# ----- the services, on a running node and without one ------------------------------------


@pytest.fixture(params=["node", "no node"])
async def where(request: pytest.FixtureRequest) -> str:
    if request.param == "node":
        node = await get_node()
        assert node.write_pipeline is not None
    return str(request.param)


async def test_batch_request_is_stored_in_request_order(where: str) -> None:
    items = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]
    messages, replayed = await messages_publish_batch(items=items, publisher_id=None)
    assert not replayed
    assert [(m.channel, m.seq, m.data) for m in messages] == [
        ("a", 1, 1),
        ("b", 1, 2),
        ("a", 2, 3),
        ("a", 3, 4),
        ("b", 2, 5),
    ]
    # What PostgreSQL numbered is what the publisher was told.
    assert [(seq, data) for seq, data, _ in await sync_to_async(_stored)("a")] == [
        (1, 1),
        (2, 3),
        (3, 4),
    ]
    assert [(seq, data) for seq, data, _ in await sync_to_async(_stored)("b")] == [(1, 2), (2, 5)]


def test_a_batch_without_keys_is_one_statement_sent_with_its_commit() -> None:
    """The seq upsert and the insert are one statement, the plan's final one, so the
    pipeline sends it and the COMMIT in one round trip; keys need their own first."""
    units = [_unit("a", 1), _unit("b", 2), _unit("a", 3)]
    plan = batch_plan(units, micros=now_micros(), window_secs=60, dialect=POSTGRESQL_BINARY_ARRAYS)
    statement = next(plan)
    assert statement.final and statement.returns_rows
    keyed = [_unit("a", 1, principal="p", idempotency_key="k")]
    plan = batch_plan(keyed, micros=now_micros(), window_secs=60, dialect=POSTGRESQL_BINARY_ARRAYS)
    assert not any(s.final for s in [next(plan), plan.send([]), plan.send([("p", "a", "k")])])


async def test_invalid_batch_item_is_named_and_nothing_is_written(where: str) -> None:
    with pytest.raises(PushError) as refused:
        await messages_publish_batch(
            items=[("a", 1), ("b", 2), ("bad name!", 3)], publisher_id=None
        )
    assert refused.value.code is ErrorCode.INVALID_MESSAGE and refused.value.index == 2
    assert await Message.objects.acount() == 0


async def test_a_batch_request_the_database_refuses_stores_nothing(where: str) -> None:
    with pytest.raises(PushError) as refused:
        await messages_publish_batch(items=[("a", 1), ("b", 2)], publisher_id=2_000_000_000)
    assert refused.value.code is ErrorCode.INVALID_MESSAGE
    assert await Message.objects.acount() == 0
    # The seqs it took were rolled back with it.
    messages, _ = await messages_publish_batch(items=[("a", 1)], publisher_id=None)
    assert messages[0].seq == 1


async def test_batch_key_replays_the_first_body(where: str) -> None:
    items = [("a", 1), ("b", 2)]
    first, replayed = await messages_publish_batch(
        items=items, publisher_id=None, principal="user:1", idempotency_key="b1"
    )
    again, replayed_again = await messages_publish_batch(
        items=items, publisher_id=None, principal="user:1", idempotency_key="b1"
    )
    assert not replayed and replayed_again
    assert [(m.channel, m.seq, m.message_id) for m in again] == [
        (m.channel, m.seq, m.message_id) for m in first
    ]
    # A single publish with the same key is another scope (the channel).
    single, replayed_single = await message_publish_queued(
        channel="a", data=1, publisher_id=None, principal="user:1", idempotency_key="b1"
    )
    assert not replayed_single and single.seq == 2


# ----- idempotency survives retention ----------------------------------------------------------


def _api_client() -> APIClient:
    user = User.objects.create_user("svc", password="x")
    ChannelGrant.objects.create(user=user, pattern="*", can_publish=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return api


@override_settings(PUSH={"RETENTION_RULES": [("orders", 1, None)]})
def test_a_retry_after_retention_deleted_the_message_is_still_answered_once() -> None:
    api = _api_client()

    def post(data: object, key: str | None = None) -> Any:
        headers = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
        return api.post(
            "/api/v1/channels/orders/messages",
            data=json.dumps({"data": data}),
            content_type="application/json",
            **headers,
        )

    first = post({"n": 1}, key="order-1")
    assert first.status_code == 201 and first.json()["seq"] == 1
    assert post({"n": 2}).json()["seq"] == 2
    assert history_trim() == {"orders": 1}  # seq 1 is gone
    retry = post({"n": 1}, key="order-1")
    assert retry.status_code == 200 and retry.json() == first.json()
    assert list(Message.objects.values_list("seq", flat=True)) == [2]


async def test_deleting_a_channel_deletes_its_messages() -> None:
    """The database holds no constraint from a message to its channel (it cost a
    check per message stored); Django's CASCADE is what deletes a channel's messages."""
    pipeline = _pipeline([])
    try:
        for channel in ("gone", "kept"):
            assert isinstance(await pipeline.publish(_unit(channel, 1)), Published)
    finally:
        await pipeline.stop()

    def delete_and_count() -> dict[str, int]:
        Channel.objects.filter(name="gone").delete()
        return {
            name: Message.objects.filter(channel__name=name).count() for name in ("gone", "kept")
        }

    assert await sync_to_async(delete_and_count)() == {"gone": 0, "kept": 1}
    orphans = await sync_to_async(
        lambda: Message.objects.exclude(channel_id__in=Channel.objects.values("id")).count()
    )()
    assert orphans == 0


async def _link_results(link: Any, count: int) -> list[Any]:
    return [await link.next() for _ in range(count)]


async def test_prepared_statements_are_prepared_once_and_again_after_a_skipped_prepare() -> None:
    """A statement sent with ``prepare=True`` is prepared on first use and reused; one
    whose preparation PostgreSQL skipped (behind a failed statement) is prepared again
    after the recovery, and a failure rolls nothing of the preparations back."""
    conninfo = pipeline_conninfo(connection.get_connection_params())
    conn = await psycopg.AsyncConnection.connect(**conninfo, autocommit=True)
    link = PipelinedConnection(conn, on_result=lambda: None)
    try:
        link.send("BEGIN")
        link.send("SELECT %s::int + 1", [1], prepare=True)
        link.send("COMMIT")
        link.flush()
        _, added, _ = await _link_results(link, 3)
        assert link.rows(added) == [(2,)]

        link.send("BEGIN")
        link.send("SELECT 1 / %s::int", [0])  # fails: everything behind it is skipped
        link.send("SELECT %s::int + 1", [2], prepare=True)
        link.send("SELECT %s::int * 2", [3], prepare=True)  # its preparation is skipped
        link.send("COMMIT")
        link.flush()
        begun, failed, skipped_add, skipped_double, _ = await _link_results(link, 5)
        link.check(begun)
        with pytest.raises(psycopg.errors.DivisionByZero):
            link.check(failed)
        for skipped in (skipped_add, skipped_double):
            with pytest.raises(PipelineAborted):
                link.check(skipped)
        link.recover()
        assert (await link.next())[0].status == psycopg.pq.ExecStatus.PIPELINE_SYNC
        link.check(await link.next())  # the ROLLBACK's

        link.send("SELECT %s::int + 1", [4], prepare=True)
        link.send("SELECT %s::int * 2", [5], prepare=True)
        link.send("SELECT name FROM pg_prepared_statements ORDER BY name")
        link.flush()
        added, doubled, names = await _link_results(link, 3)
        for results in (added, doubled, names):
            link.check(results)
        assert (link.rows(added), link.rows(doubled)) == ([(5,)], [(10,)])
        assert len(link.rows(names)) == 2  # one each: the skipped one prepared once more
    finally:
        link.close()
        await conn.close()


async def test_typed_parameters_travel_as_declared_whatever_their_values() -> None:
    """A statement sent with ``types`` adapts each parameter as its type, in binary:
    the values come back as psycopg's own adaptation sends them (nulls, ints of every
    size, any script, empty arrays), the statement is prepared once for all of them
    (psycopg left to choose would pick int2[] or int8[] from the largest value), and a
    count of types that is not the parameters' is refused before anything is sent."""
    conninfo = pipeline_conninfo(connection.get_connection_params())
    conn = await psycopg.AsyncConnection.connect(**conninfo, autocommit=True)
    link = PipelinedConnection(conn, on_result=lambda: None)
    sql = "SELECT %s::timestamptz, %b::bigint[], %b::text[]"
    types = ("timestamptz", "bigint[]", "text[]")
    moment = datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC)
    values = [
        [moment, [1, None, 2], ["a", "é 中文 😀", "", 'q"\\{},']],
        [moment, [2**40, -(2**62)], ["NULL"]],
        [moment, [None], []],
        [moment, [], ["x" * 10_000]],
    ]
    try:
        with pytest.raises(psycopg.ProgrammingError):
            link.send(sql, [moment, [1]], prepare=True, types=types)
        for params in values:
            link.send(sql, params, prepare=True, types=types)
        link.send(
            "SELECT parameter_types::text FROM pg_prepared_statements WHERE statement LIKE %s",
            ["SELECT $1::timestamptz%"],
        )
        link.flush()
        results = await _link_results(link, len(values) + 1)
        for result in results:
            link.check(result)
        assert [list(link.rows(r)[0]) for r in results[:-1]] == values
        assert link.rows(results[-1]) == [('{"timestamp with time zone",bigint[],text[]}',)]
    finally:
        link.close()
        await conn.close()


def test_every_statement_of_a_batch_declares_its_parameters_types() -> None:
    """The pipeline adapts statements by their declared types, so each must declare one
    per parameter (fewer would send the rest unadapted): with keys and without."""
    units = [_unit("a", 1, exclude="1.2"), _unit("b", 2, principal="p", idempotency_key="k")]
    plan = batch_plan(units, micros=now_micros(), window_secs=60, dialect=POSTGRESQL_BINARY_ARRAYS)
    statements = [next(plan), plan.send([]), plan.send([])]  # the key lost: its result read
    statements.append(plan.send([("p", "b", "k", None)]))  # then the others stored
    with pytest.raises(StopIteration):
        plan.send([(1, "a", 1)])
    keyed = [_unit("a", 1, principal="p", idempotency_key="k")]
    plan = batch_plan(keyed, micros=now_micros(), window_secs=60, dialect=POSTGRESQL_BINARY_ARRAYS)
    statements += [next(plan), plan.send([]), plan.send([("p", "a", "k")])]
    statements.append(plan.send([(1, "a", 1)]))  # the key's result recorded
    assert len(statements) == 8
    for statement in statements:
        assert statement.types is not None and len(statement.types) == len(statement.params)
