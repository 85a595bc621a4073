"""Heartbeat timeouts, drain, connection log lines, and logs without secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client, override_settings
from rest_framework.authtoken.models import Token

from common.errors import CloseCode
from push.cluster.node import STOP_FLUSH_MIN_SECS
from push.ops.logs import JsonFormatter, RedactFilter, SampledClientNoise, redact
from push.services.runtime import get_node
from push.tests.redis_proxy import proxied_settings
from push.tests.wsclient import connected_client, open_client
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


@override_settings(PUSH={"HEARTBEAT_TIMEOUT_SECS": 0.6})
async def test_silent_client_is_closed_4001_and_a_talking_one_is_not(wire_format: str) -> None:
    silent = await connected_client(subprotocol=wire_format)
    talking = await connected_client(subprotocol=wire_format)
    for _ in range(6):
        await talking.request({"type": "heartbeat"})
        # The point is time passing: 1.2 s of heartbeats every 0.2 s, twice the timeout.
        await asyncio.sleep(0.2)
    assert await silent.expect_close(timeout=3) == CloseCode.HEARTBEAT_TIMEOUT
    assert (await talking.request({"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await talking.close()


async def test_drain_tells_clients_to_go_and_refuses_new_ones(wire_format: str) -> None:
    first = await connected_client(subprotocol=wire_format)
    await first.request({"type": "subscribe", "channel": "news"})
    node = await get_node()
    await node.drain(code=CloseCode.GOING_AWAY, deadline_secs=2)
    assert await first.expect_close() == CloseCode.GOING_AWAY
    assert not node.connections


async def test_a_drained_node_refuses_new_clients_and_is_not_ready_until_the_process_exits(
    wire_format: str,
) -> None:
    """Between the end of its drain and the server's exit (a tick of the server's loop,
    or while the stop sends what was queued for a slow Redis) the node is stopped: a
    client greeted there would have subscribed to a node that delivers nothing, and a
    load balancer told it is ready sends it more."""
    node = await get_node()
    await node.drain(code=CloseCode.GOING_AWAY, deadline_secs=2)
    accepted, late, _ = await open_client(subprotocol=wire_format)
    assert accepted
    assert await late.expect_close() == CloseCode.GOING_AWAY
    response = await sync_to_async(Client().get)("/ready")
    assert response.status_code == 503 and response.json()["status"] == "draining"


async def test_a_drain_whose_redis_stopped_answering_ends_within_its_deadline() -> None:
    """What a drain does after its clients left (the registry's last writes, the
    occupancy sets, the last events, leaving the directory) waited on Redis without a
    bound of its own: a Redis that stopped answering held the node's exit many seconds
    past PUSH_DRAIN_DEADLINE_SECS, into the orchestrator's kill."""
    async with proxied_settings() as proxy:
        client = await connected_client()
        await client.request({"type": "subscribe", "channel": "news"})
        node = await get_node()
        proxy.frozen = True
        started = time.monotonic()
        await node.drain(code=CloseCode.GOING_AWAY, deadline_secs=1)
        drained_after = time.monotonic() - started
    # The deadline, then at least STOP_FLUSH_MIN_SECS for the drain's last writes and as
    # much for the stop's; a command without an answer waited 5 s on top before.
    assert drained_after < 1 + 2 * STOP_FLUSH_MIN_SECS + 1.5, drained_after


@pytest.fixture
def _application_imported() -> None:
    """The ASGI application imported before the test runs: its import calls
    ``django.setup()``, which configures logging afresh and so removed the handler
    ``caplog`` had put on the root logger for the test, when the test's own first
    connection imported it (the test failed when run alone, or first in its process).
    Imported here, in the test's setup, the handler is put on after it."""
    import realtime_project.asgi  # noqa: F401


@pytest.mark.usefixtures("_application_imported")
async def test_open_and_close_each_log_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="push.connections")
    user = await sync_to_async(User.objects.create_user)("erin", password="pw")
    token = (await Token.objects.acreate(user=user)).key
    client = await connected_client(token=token, subprotocol="v1.msgpack")
    await client.request({"type": "subscribe", "channel": "news"})
    await client.close()

    def connection_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "push.connections"]

    # The close is logged once the node has ended the connection, which may come a
    # moment after the client's side is closed.
    await wait_until(lambda: len(connection_lines()) >= 2, "the close's line")
    lines = connection_lines()
    assert len(lines) == 2, [r.getMessage() for r in lines]
    opened, closed = lines
    expected = {
        "user_id": user.pk,
        "principal": f"user:{user.pk}",
        "node": settings.NODE_ID,
        "wire_format": "msgpack",
    }
    for line in lines:
        assert {k: getattr(line, k) for k in expected} == expected
        assert line.connection_id == opened.connection_id and hasattr(line, "ip")
        assert line.levelno == logging.INFO
    assert "opened" in opened.getMessage() and settings.NODE_ID in opened.getMessage()
    assert closed.close_code == 1000 and closed.reason == "client closed"
    assert closed.closed_by == "client" and closed.duration_secs >= 0
    assert "code 1000, client closed" in closed.getMessage()


@pytest.mark.usefixtures("_application_imported")
async def test_an_anonymous_connection_closed_by_the_server_is_logged_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="push.connections")
    client = await connected_client()
    node = await get_node()
    node.close_silent(0)
    assert await client.expect_close() == CloseCode.HEARTBEAT_TIMEOUT
    await client.close()
    opened, closed = [r for r in caplog.records if r.name == "push.connections"]
    assert opened.user_id is None and opened.principal == "anonymous"
    assert "anonymous" in opened.getMessage()
    assert closed.close_code == CloseCode.HEARTBEAT_TIMEOUT and closed.closed_by == "server"
    assert closed.reason == "heartbeat timeout"


def test_secrets_never_reach_the_log() -> None:
    line = 'GET /sse/?channel=a&token=abc123secret HTTP/1.1 "Authorization: Token zzz"'
    cleaned = redact(line)
    assert "abc123secret" not in cleaned and "zzz" not in cleaned
    assert "channel=a" in cleaned
    cleaned = redact('POST https://hooks:pw-secret@example.com/in "HTTP/1.1 200 OK" a@b.c')
    assert "pw-secret" not in cleaned and "example.com/in" in cleaned and "a@b.c" in cleaned
    record = logging.LogRecord("x", logging.INFO, "", 0, "opened %s", ("/ws/?token=s3cr3t",), None)
    RedactFilter().filter(record)
    assert "s3cr3t" not in record.getMessage()


def test_an_sse_streams_subscription_tokens_never_reach_the_log() -> None:
    """A browser's stream carries them in its URL, which servers log."""
    cleaned = redact("GET /sse/?channel=private-a&subscription_token=private-a:eyJjaA.s1g HTTP/1.1")
    assert "eyJjaA" not in cleaned and "s1g" not in cleaned
    assert "channel=private-a" in cleaned


@pytest.mark.parametrize(
    "query",
    [
        "%74oken=s3cr3t",
        "tok%65n=s3cr3t",
        "%54%4F%4B%45%4E=s3cr3t",
        "api%5Fkey=s3cr3t",
        "%6bey=s3cr3t",
    ],
)
def test_percent_encoded_secret_names_are_redacted(query: str) -> None:
    """The server decodes the name before it reads the token: so does the redaction."""
    cleaned = redact(f"GET /ws/?channel=a&{query}&b=1 HTTP/1.1")
    assert "s3cr3t" not in cleaned
    assert "channel=a" in cleaned and "b=1" in cleaned


@pytest.mark.parametrize("formatter", [logging.Formatter(), JsonFormatter()])
def test_secrets_in_extra_fields_and_exceptions_are_redacted(
    formatter: logging.Formatter,
) -> None:
    try:
        raise ValueError("could not open /sse/?channel=a&token=in-exception")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x",
            logging.ERROR,
            "",
            0,
            "failed",
            (),
            sys.exc_info(),
            extra={
                "path": "/ws/?token=in-extra",
                "headers": ["Authorization: Token in-list"],
                "request": {"query": "api_key=in-dict"},
                "count": 3,
            },
        )
    RedactFilter().filter(record)
    text = formatter.format(record)
    for secret in ("in-exception", "in-extra", "in-list", "in-dict"):
        assert secret not in text, secret
    assert "ValueError" in text and record.count == 3


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("push.transport.consumers", logging.INFO, "", 0, "closed", (), None)
    record.connection_id = "c-1"
    record.duration_secs = 1.5
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "closed" and entry["connection_id"] == "c-1"
    assert entry["duration_secs"] == 1.5 and entry["level"] == "INFO"


def test_warnings_any_client_can_cause_are_logged_at_most_once_per_interval() -> None:
    noise = SampledClientNoise(interval_secs=0.5)

    def let_through(msg: str) -> str | None:
        record = logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, msg, None, None)
        return record.getMessage() if noise.filter(record) else None

    invalid = "Invalid HTTP request received."
    assert let_through(invalid) == invalid
    assert [let_through(invalid) for _ in range(1000)] == [None] * 1000
    assert let_through("Unsupported upgrade request.") == "Unsupported upgrade request."
    assert let_through("Something else.") == "Something else."  # others: all of them
    time.sleep(0.6)
    assert let_through(invalid) == (
        f"{invalid} (1000 more since the last such line, not logged: at most one every 0.5 s)"
    )
