"""Delivery guarantees: idempotent publishing, retention, storage failure, publishing
inside application transactions."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import OperationalError, connection, transaction
from django.test import override_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

import push
from accounts.models import ChannelGrant
from push.models import Channel, IdempotencyKey, Message
from push.services.publishing import message_publish, publish
from push.storage import retention, write_batch
from push.storage.retention import channel_trim, history_trim, retention_policy
from push.tests.backends import terminate_backends
from push.tests.wsclient import connected_client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


def _api_for(username: str) -> APIClient:
    user = User.objects.create_user(username, password="x")
    ChannelGrant.objects.create(user=user, pattern="*", can_publish=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return api


def _post(api: APIClient, channel: str, data: object, key: str | None = None):  # type: ignore[no-untyped-def]  # its response type is private in the stubs
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return api.post(
        f"/api/v1/channels/{channel}/messages",
        data=json.dumps({"data": data}),
        content_type="application/json",
        **headers,
    )


# ----- idempotency ------------------------------------------------------------------------


def test_retry_with_the_same_key_returns_the_first_result() -> None:
    api = _api_for("svc")
    first = _post(api, "orders", {"n": 1}, key="order-1")
    retry = _post(api, "orders", {"n": 1}, key="order-1")
    assert first.status_code == 201 and retry.status_code == 200
    assert retry.json() == first.json()
    assert Message.objects.filter(channel__name="orders").count() == 1


def test_key_is_scoped_to_credential_and_channel() -> None:
    alice, bob = _api_for("alice"), _api_for("bob")
    assert _post(alice, "orders", 1, key="k").json()["seq"] == 1
    assert _post(alice, "invoices", 1, key="k").status_code == 201
    assert _post(bob, "orders", 1, key="k").json()["seq"] == 2
    assert _post(alice, "orders", 1, key="k").json()["seq"] == 1


@override_settings(PUSH={"IDEMPOTENCY_WINDOW_SECS": 60})
def test_key_is_forgotten_after_the_window() -> None:
    api = _api_for("svc")
    assert _post(api, "orders", 1, key="k").json()["seq"] == 1
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(seconds=61))
    again = _post(api, "orders", 1, key="k")
    assert again.status_code == 201 and again.json()["seq"] == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "bad\nkey"])
def test_malformed_key_is_refused(key: str) -> None:
    response = _post(_api_for("svc"), "orders", 1, key=key)
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_MESSAGE"


def test_racing_retries_publish_once() -> None:
    user = User.objects.create_user("racer", password="x")
    ChannelGrant.objects.create(user=user, pattern="*", can_publish=True)
    token = Token.objects.create(user=user).key

    def post(_: int) -> tuple[int, dict]:
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        try:
            response = _post(api, "race", {"once": True}, key="same")
            return response.status_code, response.json()
        finally:
            connection.close()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(8)))
    assert sorted(status for status, _ in results) == [200] * 7 + [201]
    assert len({body["message_id"] for _, body in results}) == 1
    assert Channel.objects.get(name="race").last_seq == 1


async def test_subscriber_sees_an_idempotent_retry_once(wire_format: str) -> None:
    api = await sync_to_async(_api_for)("svc")
    subscriber = await connected_client(subprotocol=wire_format)
    await subscriber.request({"type": "subscribe", "channel": "orders"})
    for _ in range(3):
        await sync_to_async(_post)(api, "orders", {"id": 7}, key="order-7")
    message = await subscriber.recv_type("message")
    assert message["seq"] == 1
    await subscriber.expect_nothing(0.5)
    await subscriber.close()


# ----- retention --------------------------------------------------------------------------


@override_settings(
    PUSH={
        "RETENTION_MAX_MESSAGES": 5,
        "RETENTION_MAX_AGE_SECS": 0,
        "RETENTION_RULES": [("ticker:*", 3, None), ("chat:*", None, 3600)],
    }
)
def test_retention_by_pattern_count_and_age() -> None:
    for _ in range(10):
        message_publish(channel="news", data=1)
        message_publish(channel="ticker:ACME", data=1)
        message_publish(channel="chat:lobby", data=1)
    Message.objects.filter(channel__name="chat:lobby", seq__lte=4).update(
        created_at=timezone.now() - timedelta(hours=2)
    )
    assert retention_policy("ticker:ACME").max_messages == 3
    call_command("trim_history", stdout=open("/dev/null", "w"))  # noqa: SIM115
    kept = {
        name: list(
            Message.objects.filter(channel__name=name).order_by("seq").values_list("seq", flat=True)
        )
        for name in ("news", "ticker:ACME", "chat:lobby")
    }
    assert kept["news"] == [6, 7, 8, 9, 10]
    assert kept["ticker:ACME"] == [8, 9, 10]
    assert kept["chat:lobby"] == list(range(5, 11))


@override_settings(PUSH={"RETENTION_RULES": [("chat:*", None, 3600)]})
def test_a_trim_pass_reads_only_what_it_deletes_and_a_row_per_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The age limit's trim looked for old rows among every row of the channel, on
    every pass: all of a big table every few minutes, to delete none. It walks the
    channel from its oldest row and stops at the first one inside the limit."""
    now = timezone.now()
    young = Channel.objects.create(name="chat:young", last_seq=3000)
    aging = Channel.objects.create(name="chat:aging", last_seq=12)
    Message.objects.bulk_create(
        Message(channel=channel, seq=n, message_id=uuid.uuid4(), data="1", created_at=at)
        for channel, count, old in ((young, 3000, 0), (aging, 12, 10))
        for n in range(1, count + 1)
        for at in [now - timedelta(hours=2) if n <= old else now]
    )
    monkeypatch.setattr(retention, "DELETE_BATCH", 3)  # (several batches of the aging one)
    with transaction.atomic():
        assert (channel_trim(young), channel_trim(aging)) == (0, 10)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) "
                "FROM pg_stat_xact_user_tables WHERE relname = %s",
                [Message._meta.db_table],
            )
            (rows_read,) = cursor.fetchone()
    # The young channel's first row; each of the aging one's at most three times (the
    # look at its first row, its batch, the delete).
    assert rows_read <= 1 + 3 * 12, rows_read
    assert list(Message.objects.filter(channel=aging).values_list("seq", flat=True)) == [11, 12]


class _Stop(Exception):
    """Raised when the test has seen the passes it waited for."""


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 2})
def test_periodic_trimming_goes_on_after_postgresql_ended_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``trim_history --every``: a restart of PostgreSQL between two passes costs
    nothing. Its connection used to be kept for the next pass: ended with the restart,
    it failed that pass, and the command exited."""
    from push.management.commands import trim_history

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's backends")
    passes: list[int] = []  # the backend each pass trimmed on

    def trimming() -> dict[str, int]:
        trimmed = history_trim()
        passes.append(connection.connection.info.backend_pid)
        return trimmed

    def publishing() -> None:  # on a thread of its own, as a node would
        try:
            for n in range(4):
                message_publish(channel="periodic", data=n)
        finally:
            connection.close()

    def between_passes(secs: float) -> None:
        if len(passes) == 2:
            raise _Stop
        with ThreadPoolExecutor(1) as publisher:
            publisher.submit(publishing).result()
        terminate_backends(passes[-1])

    monkeypatch.setattr(trim_history, "history_trim", trimming)
    monkeypatch.setattr(trim_history, "time", SimpleNamespace(sleep=between_passes))
    with pytest.raises(_Stop):
        call_command("trim_history", "--every", "300", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert len(passes) == 2 and passes[1] != passes[0]
    stored = Message.objects.filter(channel__name="periodic").values_list("seq", flat=True)
    assert sorted(stored) == [3, 4], "the second pass trimmed"


def test_periodic_trimming_goes_on_after_a_pass_postgresql_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``trim_history --every``: a pass PostgreSQL failed (down, failing over) is told
    on stderr, and the next pass runs on time. The command used to exit, leaving
    retention undone wherever nothing restarted it."""
    from push.management.commands import trim_history

    outcomes: list[str] = []

    def trimming() -> dict[str, int]:
        outcomes.append("failed" if not outcomes else "trimmed")
        if outcomes[-1] == "failed":
            raise OperationalError("connection refused")
        return {}

    def between_passes(secs: float) -> None:
        if len(outcomes) == 2:
            raise _Stop

    monkeypatch.setattr(trim_history, "history_trim", trimming)
    monkeypatch.setattr(trim_history, "time", SimpleNamespace(sleep=between_passes))
    errors = io.StringIO()
    with pytest.raises(_Stop):
        call_command("trim_history", "--every", "300", stdout=io.StringIO(), stderr=errors)
    assert outcomes == ["failed", "trimmed"]
    assert errors.getvalue().strip() == "trim pass failed: connection refused; next in 300 s"


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 3, "RECENT_PER_CHANNEL": 0})
async def test_resume_from_before_retention_is_not_recovered(wire_format: str) -> None:
    for n in range(8):
        await sync_to_async(message_publish)(channel="trimmed", data=n)
    channel = await Channel.objects.aget(name="trimmed")
    await sync_to_async(channel_trim)(channel)
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": "trimmed", "since": 2})
    assert reply["recovered"] is False and reply["seq"] == 8
    replayed = [await client.recv_type("message") for _ in range(3)]
    assert [m["seq"] for m in replayed] == [6, 7, 8]
    await client.close()


def _publish_at(monkeypatch: pytest.MonkeyPatch, channel: str, secs_ago: float) -> None:
    """Publish as a node whose clock reads ``secs_ago`` seconds in the past."""
    micros = int((time.time() - secs_ago) * 1_000_000)
    monkeypatch.setattr(write_batch, "now_micros", lambda: micros)
    message_publish(channel=channel, data=secs_ago)


def _published_by_skewed_nodes(monkeypatch: pytest.MonkeyPatch, channel: str) -> None:
    """Seqs 1 to 5 of ``channel`` under a one-hour age limit, published by nodes whose
    clocks disagree: seq 2 by one running ahead (inside the hour), seq 3 a moment later
    by one running behind (past the hour), then 4 and 5 now."""
    for secs_ago in (7200, 3500, 3700, 0, 0):
        _publish_at(monkeypatch, channel, secs_ago)
    monkeypatch.undo()


@override_settings(PUSH={"RETENTION_RULES": [("chat:*", None, 3600)], "RECENT_PER_CHANNEL": 0})
async def test_an_age_limit_never_leaves_a_gap_inside_what_a_resume_replays(
    monkeypatch: pytest.MonkeyPatch, wire_format: str
) -> None:
    """Seq 3 is past the age limit while seq 2, stamped by a node whose clock ran ahead,
    is not: a resume from 1 was answered ``recovered: true`` and replayed 2, 4, 5, a
    gap the client was told there was none of. What the limit keeps is the run after
    the last message past it, read from the rows or trimmed."""
    await sync_to_async(_published_by_skewed_nodes)(monkeypatch, "chat:skew")
    for trimmed in (False, True):
        if trimmed:
            channel = await Channel.objects.aget(name="chat:skew")
            await sync_to_async(channel_trim)(channel)
        client = await connected_client(subprotocol=wire_format)
        reply = await client.request({"type": "subscribe", "channel": "chat:skew", "since": 1})
        assert (reply["recovered"], reply["seq"]) == (False, 5)
        replayed = [await client.recv_type("message") for _ in range(2)]
        assert [m["seq"] for m in replayed] == [4, 5]
        await client.expect_nothing()
        await client.close()
    stored = Message.objects.filter(channel__name="chat:skew").values_list("seq", flat=True)
    assert await sync_to_async(list)(stored.order_by("seq")) == [4, 5]


@override_settings(PUSH={"RETENTION_RULES": [("chat:*", None, 3600)]})
async def test_an_age_limit_never_leaves_a_gap_inside_a_resume_from_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same from the node's memory of the channel, which it holds as a subscriber
    received it."""
    watcher = await connected_client()
    await watcher.request({"type": "subscribe", "channel": "chat:live"})
    await sync_to_async(_published_by_skewed_nodes)(monkeypatch, "chat:live")
    assert [(await watcher.recv_type("message"))["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": "chat:live", "since": 1})
    assert (reply["recovered"], reply["seq"]) == (False, 5)
    assert [(await client.recv_type("message"))["seq"] for _ in range(2)] == [4, 5]
    await client.expect_nothing()
    await client.close()
    await watcher.close()


async def test_resume_with_gap_replays_exactly_what_was_missed(wire_format: str) -> None:
    for n in range(1, 6):
        await sync_to_async(message_publish)(channel="gap", data=n)
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": "gap", "since": 2, "id": 1})
    assert reply == {"type": "subscribed", "channel": "gap", "seq": 5, "recovered": True, "id": 1}
    replayed = [await client.recv_type("message") for _ in range(3)]
    assert [(m["seq"], m["data"]) for m in replayed] == [(3, 3), (4, 4), (5, 5)]
    await sync_to_async(message_publish)(channel="gap", data=6)
    assert (await client.recv_type("message"))["seq"] == 6
    await client.expect_nothing()
    await client.close()


async def test_resume_without_gap_replays_nothing(wire_format: str) -> None:
    await sync_to_async(message_publish)(channel="nogap", data=1)
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": "nogap", "since": 1})
    assert reply["recovered"] is True and reply["seq"] == 1
    await client.expect_nothing()
    await client.close()


# ----- failures and transactions ----------------------------------------------------------


@pytest.fixture
def failing_storage() -> Iterator[None]:
    """A real PostgreSQL failure: inserts into channels named fail-* raise."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL triggers")
    with connection.cursor() as cursor:
        cursor.execute(
            """
            CREATE OR REPLACE FUNCTION push_test_refuse() RETURNS trigger AS $$
            BEGIN
              IF EXISTS (SELECT 1 FROM push_channel c WHERE c.id = NEW.channel_id
                         AND c.name LIKE 'fail-%') THEN
                RAISE EXCEPTION 'storage refused';
              END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER push_test_refuse BEFORE INSERT ON push_message
              FOR EACH ROW EXECUTE FUNCTION push_test_refuse();
            """
        )
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER IF EXISTS push_test_refuse ON push_message")
        cursor.execute("DROP FUNCTION IF EXISTS push_test_refuse()")


@pytest.mark.usefixtures("failing_storage")
async def test_storage_failure_gives_an_error_and_delivers_nothing(wire_format: str) -> None:
    user = await sync_to_async(User.objects.create_user)("pub", password="x")
    await ChannelGrant.objects.acreate(user=user, pattern="*", can_publish=True)
    token = (await Token.objects.acreate(user=user)).key
    subscriber = await connected_client(subprotocol=wire_format)
    await subscriber.request({"type": "subscribe", "channel": "fail-orders"})
    publisher = await connected_client(subprotocol=wire_format, token=token)
    reply = await publisher.request(
        {"type": "publish", "channel": "fail-orders", "data": 1, "id": 4}
    )
    assert reply["type"] == "error" and reply["code"] == "UNAVAILABLE" and reply["id"] == 4
    await subscriber.expect_nothing(0.5)
    assert not await Message.objects.filter(channel__name="fail-orders").aexists()
    assert await Channel.objects.filter(name="fail-orders", last_seq__gt=0).acount() == 0
    heartbeat = await publisher.request({"type": "heartbeat"})
    assert heartbeat["type"] == "heartbeat_ack"
    await subscriber.close()
    await publisher.close()


@pytest.mark.usefixtures("failing_storage")
def test_storage_failure_over_rest_is_503() -> None:
    response = _post(_api_for("svc"), "fail-x", 1)
    assert response.status_code == 503
    assert response.json()["code"] == "UNAVAILABLE"


async def test_publish_inside_transaction_is_delivered_after_commit(wire_format: str) -> None:
    subscriber = await connected_client(subprotocol=wire_format)
    await subscriber.request({"type": "subscribe", "channel": "orders"})
    gate_checked = []

    def committed_order() -> None:
        with transaction.atomic():
            publish("orders", {"state": "paid"})
            # Not yet committed: nothing may have reached the subscriber.
            gate_checked.append(True)
        connection.close()

    def rolled_back_order() -> None:
        try:
            with transaction.atomic():
                publish("orders", {"state": "never"})
                raise RuntimeError("payment failed")
        except RuntimeError:
            pass
        finally:
            connection.close()

    await sync_to_async(rolled_back_order, thread_sensitive=False)()
    await subscriber.expect_nothing(0.3)
    await sync_to_async(committed_order, thread_sensitive=False)()
    message = await subscriber.recv_type("message")
    assert message["data"] == {"state": "paid"} and message["seq"] == 1
    assert gate_checked == [True]
    await subscriber.close()


async def test_nothing_reaches_subscribers_before_the_transaction_commits() -> None:
    subscriber = await connected_client()
    await subscriber.request({"type": "subscribe", "channel": "invoices"})
    published, release = threading.Event(), threading.Event()

    def invoice_paid() -> None:
        try:
            with transaction.atomic():
                push.publish("invoices", {"state": "paid"})
                published.set()
                release.wait(10)
        finally:
            connection.close()

    paying = asyncio.ensure_future(sync_to_async(invoice_paid, thread_sensitive=False)())
    assert await asyncio.get_running_loop().run_in_executor(None, published.wait, 10)
    # Stored inside a transaction that is still open: nobody may see it yet.
    await subscriber.expect_nothing(0.3)
    release.set()
    await paying
    message = await subscriber.recv_type("message")
    assert message["data"] == {"state": "paid"} and message["seq"] == 1
    await subscriber.close()
