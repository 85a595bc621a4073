"""A resume whose history read fails after ``subscribed`` went out: what the client
sees, on a node of this process with PostgreSQL (the failure is one read that
raises, as a dropped database connection makes it)."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError
from django.test import override_settings

from common.db import database_unavailable
from push.models import Message
from push.services.publishing import message_publish
from push.storage import history
from push.tests.wsclient import ConnectionClosed, WsClient, connected_client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


@pytest.fixture
def second_page_fails(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The second history page read of this test raises once; the sinces asked."""
    asked: list[int] = []
    read = history._history_page

    async def failing_once(**kwargs: Any) -> Any:
        asked.append(kwargs["since"])
        if len(asked) == 2:
            raise OperationalError("server closed the connection unexpectedly")
        return await read(**kwargs)

    monkeypatch.setattr(history, "_history_page", failing_once)
    return asked


# Pages of 5 (half the send queue), and no resume served from the node's memory.
@override_settings(PUSH={"SEND_QUEUE_MAX_FRAMES": 10, "RECENT_PER_CHANNEL": 1})
async def test_a_replay_whose_later_page_fails_once_still_delivers_everything(
    second_page_fails: list[int],
) -> None:
    """``subscribed`` and the first page went out when the next read fails: the client
    holds the subscription as made, so the server must not drop it behind its back
    (an error under the subscribe's id, which the client had settled already, and
    nothing more on the channel). The replay reads the page again and goes on."""
    for n in range(12):
        await sync_to_async(message_publish)(channel="replayed", data=n)
    client = await connected_client()
    subscribed = await client.request(
        {"type": "subscribe", "channel": "replayed", "since": 0, "id": 1}
    )
    assert (subscribed["type"], subscribed["seq"], subscribed["recovered"]) == (
        "subscribed",
        12,
        True,
    )
    seqs = [(await client.recv_type("message"))["seq"] for _ in range(12)]
    assert seqs == list(range(1, 13))
    await sync_to_async(message_publish)(channel="replayed", data=12)
    assert (await client.recv_type("message"))["seq"] == 13
    await client.expect_nothing()
    assert second_page_fails[:2] == [0, 5]
    await client.close()


async def _messages_until_closed(client: WsClient) -> tuple[list[int], int | None]:
    """The seqs of the messages a client receives until the server closes it, each the
    one after the last (no silent gap); and the close code."""
    seqs: list[int] = []
    while True:
        try:
            seq = (await client.recv_type("message"))["seq"]
        except ConnectionClosed as closed:
            return seqs, closed.code
        assert seq == (seqs[-1] if seqs else 0) + 1, f"{seq} after {seqs}"
        seqs.append(seq)


# Pages of 5, and no resume served from the node's memory.
@override_settings(PUSH={"SEND_QUEUE_MAX_FRAMES": 10, "RECENT_PER_CHANNEL": 1})
async def test_a_replay_trimmed_between_pages_closes_rather_than_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retention trims seqs 1..7 after the first page of a replay went out with
    ``recovered: true``: the rest of the range is gone, and sending 8.. would be a
    silent gap the client was promised it would not get. The connection is closed
    4002 ("reconnect, resume with since") after the contiguous messages, and the
    client's resume from its last seq is told ``recovered: false``."""
    read = history._history_page
    asked: list[int] = []

    async def trimming_before_the_second_page(**kwargs: Any) -> Any:
        asked.append(kwargs["since"])
        if len(asked) == 2:
            await sync_to_async(
                Message.objects.filter(channel__name="trimmed", seq__lte=7).delete
            )()
        return await read(**kwargs)

    for n in range(12):
        await sync_to_async(message_publish)(channel="trimmed", data=n)
    monkeypatch.setattr(history, "_history_page", trimming_before_the_second_page)
    client = await connected_client()
    subscribed = await client.request(
        {"type": "subscribe", "channel": "trimmed", "since": 0, "id": 1}
    )
    assert (subscribed["seq"], subscribed["recovered"]) == (12, True)
    seqs, code = await _messages_until_closed(client)
    assert (seqs, code) == ([1, 2, 3, 4, 5], 4002)
    again = await connected_client()
    resumed = await again.request(
        {"type": "subscribe", "channel": "trimmed", "since": seqs[-1], "id": 1}
    )
    assert (resumed["seq"], resumed["recovered"]) == (12, False)
    assert [(await again.recv_type("message"))["seq"] for _ in range(5)] == [8, 9, 10, 11, 12]
    await again.expect_nothing()
    await again.close()


@override_settings(PUSH={"RECENT_PER_CHANNEL": 1})
async def test_an_sse_channel_whose_replay_cannot_be_read_keeps_its_place_in_the_cursor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An SSE stream resuming two channels; the history of one cannot be read. That one
    gets an ``error`` event, and the stream's cursor still names it where the client
    was: a browser reconnecting with that ``Last-Event-ID`` resumes it from there, where
    without it the channel would start at its latest seq and the missed messages be
    skipped."""
    from push.tests.sse_inprocess import InProcessStream

    read = history._history_page

    async def failing_for_broken(**kwargs: Any) -> Any:
        if kwargs["channel"] == "sse-broken":  # as db_call raises a dropped connection
            raise database_unavailable(OperationalError("server closed the connection"))
        return await read(**kwargs)

    for n in range(3):
        await sync_to_async(message_publish)(channel="sse-broken", data=n)
    monkeypatch.setattr(history, "_history_page", failing_for_broken)
    stream = InProcessStream("channel=sse-broken&channel=sse-fine&since=sse-broken:1,sse-fine:0")
    assert await stream.start() == 200
    assert (await stream.next_event() or ("",))[0] == "connection_established"
    kind, error = await stream.next_event()
    assert (kind, error["channel"], error["code"]) == ("error", "sse-broken", "UNAVAILABLE")
    await sync_to_async(message_publish)(channel="sse-fine", data="after")
    kind, message = await stream.next_event()
    assert (kind, message["channel"]) == ("message", "sse-fine")
    assert stream.last_event_id == "sse-broken:1,sse-fine:1"
    await stream.close()
