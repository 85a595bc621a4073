"""SSE resumes a client cannot take whole: what the stream tells it, in process."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import override_settings

from push.services.publishing import message_publish
from push.tests.sse_inprocess import InProcessStream

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


async def _publish(channel: str, count: int) -> None:
    for n in range(count):
        await sync_to_async(message_publish)(channel=channel, data=n)


async def _next_event(stream: InProcessStream) -> tuple[str, Any]:
    event = await stream.next_event()
    assert event is not None, "the stream ended"
    return event


# Retention keeps the last 5 of a channel; no resume served from the node's memory.
@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 5, "RECENT_PER_CHANNEL": 1})
async def test_an_sse_resume_over_a_trimmed_range_says_it_was_not_recovered() -> None:
    """A WebSocket resume from a cursor older than what retention keeps is answered
    ``recovered: false``; an SSE stream has no ``subscribed`` event, so it is told by a
    ``subscribed`` event with ``recovered: false`` before the kept messages, never
    given the gap silently. A channel resumed whole gets no such event."""
    await _publish("sse-trimmed", 12)
    await _publish("sse-whole", 2)
    stream = InProcessStream(
        "channel=sse-trimmed&channel=sse-whole&since=sse-trimmed:2,sse-whole:1"
    )
    assert await stream.start() == 200
    assert (await stream.next_event() or ("",))[0] == "connection_established"
    events = [await _next_event(stream) for _ in range(7)]
    assert events[0] == (
        "subscribed",
        {"type": "subscribed", "channel": "sse-trimmed", "seq": 12, "recovered": False},
    )
    assert [(kind, e["channel"], e["seq"]) for kind, e in events[1:]] == [
        *[("message", "sse-trimmed", seq) for seq in range(8, 13)],
        ("message", "sse-whole", 2),
    ]
    assert stream.last_event_id == "sse-trimmed:12,sse-whole:2"
    await stream.close()


async def test_an_sse_cursor_past_the_channels_latest_seq_says_it_was_not_recovered() -> None:
    """A cursor past anything the channel had (a reset database, a made-up cursor): the
    WebSocket says the real latest seq with ``recovered: false``, and so does the
    stream; the next message is then the channel's next, not a surprise seq."""
    await _publish("sse-ahead", 3)
    stream = InProcessStream("channel=sse-ahead&since=sse-ahead:1000")
    assert await stream.start() == 200
    assert (await stream.next_event() or ("",))[0] == "connection_established"
    assert await stream.next_event() == (
        "subscribed",
        {"type": "subscribed", "channel": "sse-ahead", "seq": 3, "recovered": False},
    )
    await _publish("sse-ahead", 1)
    kind, message = await _next_event(stream)
    assert (kind, message["seq"]) == ("message", 4)
    assert stream.last_event_id == "sse-ahead:4"
    await stream.close()


@override_settings(PUSH={"MAX_SUBSCRIPTIONS_PER_CONNECTION": 2})
async def test_a_stream_naming_more_channels_than_the_limit_is_refused_before_it_starts() -> None:
    """Past the subscription limit the stream started all the same: every channel was
    read, refused one by one with an ``error`` event, and kept in the cursor, so every
    message event's id line named them all (a query string of 64 KiB names thousands).
    The limit's worth of channels still makes a stream."""
    await _publish("sse-limit-a", 1)
    stream = InProcessStream("channel=sse-limit-a&channel=sse-limit-b&channel=sse-limit-c")
    assert await stream.start() == 403
    body = await stream.communicator.receive_output(5)
    assert json.loads(body["body"])["code"] == "FORBIDDEN"
    within = InProcessStream("channel=sse-limit-a&channel=sse-limit-b")
    assert await within.start() == 200
    assert (await _next_event(within))[0] == "connection_established"
    await _publish("sse-limit-a", 1)
    assert (await _next_event(within))[1]["seq"] == 2
    assert within.last_event_id == "sse-limit-a:2,sse-limit-b:0"
    await within.close()
