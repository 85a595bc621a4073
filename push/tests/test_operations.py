"""Heartbeat timeouts, drain, and logs without secrets."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from django.test import override_settings

from push.errors import CloseCode
from push.logs import JsonFormatter, RedactFilter, redact
from push.node import get_node
from push.tests.wsclient import connected_client

pytestmark = pytest.mark.django_db(transaction=True)


@override_settings(PUSH={"HEARTBEAT_TIMEOUT_SECS": 0.6})
async def test_silent_client_is_closed_4001_and_a_talking_one_is_not(wire_format: str) -> None:
    silent = await connected_client(subprotocol=wire_format)
    talking = await connected_client(subprotocol=wire_format)
    for _ in range(6):
        await talking.request({"type": "heartbeat"})
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


def test_secrets_never_reach_the_log() -> None:
    line = 'GET /sse/?channel=a&token=abc123secret HTTP/1.1 "Authorization: Token zzz"'
    cleaned = redact(line)
    assert "abc123secret" not in cleaned and "zzz" not in cleaned
    assert "channel=a" in cleaned
    record = logging.LogRecord("x", logging.INFO, "", 0, "opened %s", ("/ws/?token=s3cr3t",), None)
    RedactFilter().filter(record)
    assert "s3cr3t" not in record.getMessage()


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("push.consumers", logging.INFO, "", 0, "closed", (), None)
    record.connection_id = "c-1"
    record.duration_secs = 1.5
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "closed" and entry["connection_id"] == "c-1"
    assert entry["duration_secs"] == 1.5 and entry["level"] == "INFO"
