"""The SSE stream's pieces without a server: cursor syntax, request parsing, and the
hub's fan-out to SSE streams (one encode per message, each stream its own id)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.errors import PushError
from push.cluster.address_budgets import NO_LIMIT
from push.fanout.hub import HistoryBudget, Hub
from push.fanout.message import ChannelMessage
from push.fanout.outbox import OutFrame
from push.tests.test_hub import MemoryHistory, make_message
from push.transport.sse import SseOutbox, cursor_format, cursor_parse, stream_request
from push.wire.codecs.sse_codec import SSE_CODEC


def test_cursor_round_trips_channel_names_with_colons() -> None:
    cursor = {"news": 43, "user:42": 7, "a.b@c": 0}
    assert cursor_format(cursor) == "news:43,user:42:7,a.b@c:0"
    assert cursor_parse(cursor_format(cursor)) == cursor
    assert cursor_parse("") == {}


@pytest.mark.parametrize("text", ["news", "news:", "news:-1", "news:4x", ":3", "bad name:1"])
def test_bad_cursor_is_invalid_message(text: str) -> None:
    with pytest.raises(PushError) as caught:
        cursor_parse(text)
    assert caught.value.code == "INVALID_MESSAGE"


@pytest.mark.parametrize(
    "text",
    ["news:" + "9" * 5000, "news:" + "1" * 20, f"news:{2**63}"],
    ids=["thousands of digits", "20 digits", "past bigint"],
)
def test_a_seq_past_a_bigint_is_invalid_message(text: str) -> None:
    """int() of 5000 digits raises ValueError (an answer of 500): refused before it."""
    with pytest.raises(PushError) as caught:
        cursor_parse(text)
    assert caught.value.code == "INVALID_MESSAGE"
    assert cursor_parse(f"news:{2**63 - 1}") == {"news": 2**63 - 1}


def test_a_cursor_longer_than_its_channels_allow_is_refused_before_it_is_split() -> None:
    entry = "c" * 100 + ":" + "1" * 19
    assert len(cursor_parse(",".join([entry] * 3), max_entries=3)) == 1
    with pytest.raises(PushError) as caught:
        cursor_parse(",".join([entry] * 4), max_entries=3)
    assert caught.value.code == "INVALID_MESSAGE"


def _scope(query: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"query_string": query.encode(), "headers": headers or []}


def test_request_takes_channels_once_and_last_event_id_over_since() -> None:
    request = stream_request(_scope("channel=a&channel=b&channel=a&since=a:1"))
    assert request.channels == ["a", "b"] and request.since == {"a": 1}
    header = [(b"last-event-id", b"a:5,b:2")]
    assert stream_request(_scope("channel=a&channel=b&since=a:1", header)).since == {
        "a": 5,
        "b": 2,
    }


@pytest.mark.parametrize(
    "rewind", ["%C2%B2", "%D9%A3", "9" * 5000], ids=["superscript", "arabic-indic", "5000 digits"]
)
def test_a_rewind_that_is_not_ascii_digits_is_invalid_message(rewind: str) -> None:
    """``str.isdigit`` takes "²" (which int() refuses) and 5000 digits (past what
    int() reads): they were a ValueError, a 500 and a logged traceback per request."""
    with pytest.raises(PushError) as caught:
        stream_request(_scope(f"channel=a&rewind={rewind}"))
    assert (caught.value.code, caught.value.field) == ("INVALID_MESSAGE", "rewind")


def test_request_without_channel_is_refused() -> None:
    with pytest.raises(PushError):
        stream_request(_scope("since=a:1"))


class SseClient:
    """A subscriber with an SSE outbox that records the bytes each stream would get."""

    def __init__(self) -> None:
        self.codec = SSE_CODEC
        self.ip: str | None = None
        self.history_budget: HistoryBudget = NO_LIMIT
        self.gone = False
        self.bodies: list[bytes] = []
        self.outbox = SseOutbox(
            self._send, max_frames=100, max_bytes=10**9, on_overflow=lambda: None
        )

    async def _send(self, event: dict[str, Any]) -> None:
        self.bodies.append(event["body"])


async def test_each_message_is_encoded_once_for_every_sse_stream() -> None:
    encodes = 0
    encode_message = SSE_CODEC.encode_message

    def counting(message: ChannelMessage) -> bytes:
        nonlocal encodes
        encodes += 1
        return encode_message(message)

    SSE_CODEC.encode_message = counting  # type: ignore[assignment]  # counting stand-in, restored below
    try:
        hub = Hub(
            history=MemoryHistory(),
            join=_nothing,
            leave=_nothing,
            drop_oldest_patterns=[],
            gap_wait_secs=0.05,
        )
        streams = [SseClient() for _ in range(20)]
        for stream in streams:
            await hub.subscribe(stream, "news", since=None, reply=lambda seq, recovered: None)
            stream.outbox.cursor.update({"news": 0, "chat": 4})
        messages = [make_message("news", seq) for seq in (1, 2)]
        for message in messages:
            hub.deliver(message)
    finally:
        del SSE_CODEC.encode_message
    assert encodes == 2
    expected = [
        encode_message(messages[0]) + b"id: news:1,chat:4\n\n",
        encode_message(messages[1]) + b"id: news:2,chat:4\n\n",
    ]
    assert all(stream.bodies == expected for stream in streams)
    assert expected[0].startswith(b'event: message\ndata: {"type":"message","channel":"news"')


async def test_every_event_of_a_replay_carries_the_streams_cursor() -> None:
    """A resume's history goes to the stream in runs of frames (``push_many``): each
    event still ends with its own ``id:``, the cursor just after that message."""
    history = MemoryHistory()
    for seq in (1, 2, 3):
        history.store("news", seq)
    hub = Hub(
        history=history,
        join=_nothing,
        leave=_nothing,
        drop_oldest_patterns=[],
        gap_wait_secs=0.05,
        recent_size=1,
    )
    stream = SseClient()
    await hub.subscribe(stream, "news", since=0, reply=lambda seq, recovered: None)
    assert [body.rsplit(b"id: ", 1)[1] for body in stream.bodies] == [
        b"news:1\n\n",
        b"news:2\n\n",
        b"news:3\n\n",
    ]


async def test_stalled_streams_queue_one_copy_of_each_event() -> None:
    """Streams that stopped reading queue the event's bytes shared, as WebSocket
    connections do, not each its own copy with its ``id:`` joined on (a thousand
    stalled streams on a busy channel held 8 MiB each); the bytes written are the same."""
    written: list[bytes] = []

    async def stalled(event: dict[str, Any]) -> None:
        written.append(event["body"])
        await asyncio.Event().wait()  # never reads again

    outboxes = [
        SseOutbox(stalled, max_frames=100, max_bytes=10**9, on_overflow=lambda: None)
        for _ in range(3)
    ]
    frames = [
        OutFrame(SSE_CODEC.send_event(b"event: message\ndata: %d\n" % n), 20, channel="c", seq=n)
        for n in (1, 2, 3)
    ]
    for outbox in outboxes:
        for frame in frames:
            outbox.push(frame)
    await asyncio.sleep(0)
    for outbox in outboxes:
        queued = list(outbox._queue or [])
        assert len(queued) == 2  # the first is being written
        for frame, shared in zip(queued, frames[1:], strict=True):
            assert frame._body is shared.event["body"]  # type: ignore[attr-defined]  # an SSE frame
            assert frame.event["body"] == shared.event["body"] + b"id: c:%d\n\n" % shared.seq
            body = frame.event["body"]
            assert frame.wire == b"%x\r\n%b\r\n" % (len(body), body)
    assert written == [b"event: message\ndata: 1\nid: c:1\n\n"] * 3
    for outbox in outboxes:
        outbox.discard()


async def _nothing(channel: str) -> None:
    return None
