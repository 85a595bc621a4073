"""Recent-only channels (``PUSH_HISTORY_MODES``): seq and a window of messages in
Redis, no PostgreSQL row per message; seqs never repeat, even when Redis loses them."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.management import call_command
from django.db import OperationalError, transaction
from django.db.transaction import TransactionManagementError
from django.test import override_settings
from prometheus_client import REGISTRY
from rest_framework.test import APIClient

import push
from common.db import db_call
from common.errors import PushError
from common.redis_client import redis_async, redis_prefix
from devtools.processes import free_port, redis_server
from push.cluster.broadcast import broadcast_async
from push.fanout.message import ChannelMessage
from push.models import Channel, Message
from push.services.publishing import message_publish
from push.services.runtime import get_node
from push.storage import recent_store
from push.storage.history import RecentHistory
from push.storage.write_batch import Published
from push.tests.redis_proxy import proxied_settings
from push.tests.sse_inprocess import InProcessStream
from push.tests.wsclient import ConnectionClosed, WsClient, connected_client

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fresh_node"),
    pytest.mark.skipif(not settings.REDIS_URL, reason="recent channels live in Redis"),
]

RECENT = {"HISTORY_MODES": [("tick:*", "recent")], "RECENT_WINDOW_MESSAGES": 5}


def _api(token: str) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return api


@sync_to_async
def _rest_publish(token: str, channel: str, data: Any, **headers: str) -> Any:
    return _api(token).post(
        f"/api/v1/channels/{channel}/messages",
        data=json.dumps({"data": data}),
        content_type="application/json",
        **headers,
    )


@sync_to_async
def _rest_history(token: str, channel: str, query: str) -> dict[str, Any]:
    response = _api(token).get(f"/api/v1/channels/{channel}/messages?{query}")
    assert response.status_code == 200, response.content
    return response.json()


async def _publish(channel: str, count: int, start: int = 0) -> list[int]:
    seqs = []
    for n in range(start, start + count):
        message = await recent_store.publish(
            channel, json.dumps({"n": n}), None, broadcast=broadcast_async
        )
        seqs.append(message.seq)
    return seqs


async def _subscriber(channel: str, since: int | None = None) -> tuple[WsClient, dict[str, Any]]:
    client = await connected_client()
    request: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if since is not None:
        request["since"] = since
    return client, await client.request(request)


async def _received(client: WsClient, count: int) -> list[dict[str, Any]]:
    return [await client.recv_type("message") for _ in range(count)]


async def _lose_keys(channel: str) -> None:
    """What a Redis restart without persistence does to one channel."""
    redis = redis_async()
    prefix = redis_prefix()
    await redis.delete(
        recent_store.lease_key(prefix, channel), recent_store.window_key(prefix, channel)
    )
    await redis.aclose()


def _seq_blocks(kind: str) -> float:
    value = REGISTRY.get_sample_value("push_recent_seq_blocks_total", {"kind": kind})
    return value or 0.0


async def _store_connections() -> int:
    """Redis connections the recent stores of this test run hold open."""
    redis = redis_async()
    clients = await redis.client_list()
    await redis.aclose()
    return sum(1 for c in clients if c.get("name") == f"{redis_prefix()}-recent")


@sync_to_async
def _rows(channel: str) -> tuple[int, int]:
    """(messages stored in PostgreSQL, the channel's reserved ceiling)."""
    ceiling = Channel.objects.filter(name=channel).values_list("last_seq", flat=True).first()
    return Message.objects.filter(channel__name=channel).count(), ceiling or 0


# ----- publishing and receiving ------------------------------------------------------------


@override_settings(PUSH=RECENT)
async def test_a_recent_channel_delivers_without_a_row_per_message(publisher_token: str) -> None:
    subscriber, subscribed = await _subscriber("tick:a")
    assert subscribed["seq"] == 0
    publisher = await connected_client(token=publisher_token)
    replies = [
        await publisher.request({"type": "publish", "channel": "tick:a", "data": {"p": n}})
        for n in range(3)
    ]
    assert [r["seq"] for r in replies] == [1, 2, 3]
    messages = await _received(subscriber, 3)
    assert [(m["seq"], m["data"]) for m in messages] == [
        (1, {"p": 0}),
        (2, {"p": 1}),
        (3, {"p": 2}),
    ]
    assert [m["message_id"] for m in messages] == [r["message_id"] for r in replies]
    response = await _rest_publish(publisher_token, "tick:a", [1, "x"])
    assert response.status_code == 201 and response.json()["seq"] == 4
    assert (await subscriber.recv_type("message"))["data"] == [1, "x"]
    # One row for the channel, holding the reserved ceiling; no message rows.
    assert await _rows("tick:a") == (0, 1000)
    await subscriber.close()
    await publisher.close()


@override_settings(PUSH={**RECENT, "RECENT_SEQ_BLOCK": 3})
async def test_seqs_stay_gapless_across_leases_and_concurrent_publishers() -> None:
    subscriber, _ = await _subscriber("tick:many")
    published = await asyncio.gather(*(_publish("tick:many", 5, start=k * 5) for k in range(4)))
    assert sorted(seq for seqs in published for seq in seqs) == list(range(1, 21))
    assert [m["seq"] for m in await _received(subscriber, 20)] == list(range(1, 21))
    stored, ceiling = await _rows("tick:many")
    assert stored == 0 and ceiling >= 20  # at or above every seq handed out
    await subscriber.close()


@override_settings(PUSH={**RECENT, "RECENT_SEQ_BLOCK": 10})
async def test_publishers_that_find_the_lease_used_up_together_renew_it_once() -> None:
    await _publish("tick:renew", 10)
    one_each = [
        recent_store.publish("tick:renew", "1", None, broadcast=broadcast_async) for _ in range(8)
    ]
    assert sorted(m.seq for m in await asyncio.gather(*one_each)) == list(range(11, 19))
    # One more block of 10 (two if a publisher saw the lease used up just after the
    # renewal), not one per publisher: eight would make a ceiling of 90.
    stored, ceiling = await _rows("tick:renew")
    assert stored == 0 and ceiling in (20, 30)


async def _publish_calls() -> int:
    """Scripts Redis has run so far (the publish script is run by its SHA)."""
    redis = redis_async()
    stats = await redis.info("commandstats")
    await redis.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@override_settings(PUSH={**RECENT, "RECENT_SEQ_BLOCK": 7})
async def test_concurrent_publishes_to_many_channels_share_publish_calls() -> None:
    channels = [f"tick:group{n}" for n in range(8)]
    subscribers = [(await _subscriber(channel))[0] for channel in channels]
    await _publish(channels[0], 1)  # the store knows its Redis server from here on
    before = await _publish_calls()
    # 25 publishers per channel at once: each channel passes its first lease of 7 seqs
    # (and more) in the middle of a call that numbers the other channels too.
    published = await asyncio.gather(
        *(
            recent_store.publish(channel, json.dumps(n), None, broadcast=broadcast_async)
            for n in range(25)
            for channel in channels
        )
    )
    calls = await _publish_calls() - before
    for index, (channel, subscriber) in enumerate(zip(channels, subscribers, strict=True)):
        first = 2 if index == 0 else 1
        seqs = [m.seq for m in published if m.channel == channel]
        assert sorted(seqs) == list(range(first, first + 25))
        # Each channel's messages arrive in seq order, none missing or repeated.
        received = await _received(subscriber, 25 + first - 1)
        assert [m["seq"] for m in received] == list(range(1, first + 25))
        await subscriber.close()
    # Lease renewals and claims are scripts too, a few per channel: far fewer calls
    # than the 200 publishes, which took one call each before they were grouped.
    assert calls < 100, calls


@override_settings(PUSH={**RECENT, "RECENT_WINDOW_MESSAGES": 100, "RECENT_SEQ_BLOCK": 7})
async def test_submitted_publishes_are_answered_with_what_their_window_holds() -> None:
    """Publishes of several channels, some of several messages, numbered in shared
    calls (and across lease renewals): each answer's messages are the entries stored
    for them (seq, id, timestamp, data), are what was broadcast, and take each
    channel's seqs in the order they were submitted."""
    channels = [f"tick:kept{n}" for n in range(5)]
    broadcast: list[ChannelMessage] = []
    sent = [(channels[n % 5], [json.dumps([n, k]) for k in range(1 + n % 3)]) for n in range(60)]
    answers = [
        recent_store.publish_submitted(channel, datas, broadcast=broadcast.append)
        for channel, datas in sent
    ]
    outcomes = [await answer for answer in answers]
    assert all(isinstance(outcome, Published) for outcome in outcomes), outcomes
    answered = [m for outcome in outcomes for m in outcome.messages]  # type: ignore[union-attr]  # Published, asserted above
    assert [m.data_json for m in answered] == [d for _, datas in sent for d in datas]

    def fields(message: ChannelMessage) -> tuple[Any, ...]:
        return (message.seq, message.message_id, message.timestamp, message.data_json)

    assert sorted(map(fields, broadcast)) == sorted(map(fields, answered))
    assert len({m.message_id for m in answered}) == len(answered)
    window = recent_store.Window.from_settings()
    for channel in channels:
        latest, stored = await recent_store.store().read(channel, 0, 100, window)  # type: ignore[misc]  # None only for a channel it does not hold
        mine = [fields(m) for m in answered if m.channel == channel]
        assert [fields(m) for m in stored] == mine
        assert [m[0] for m in mine] == list(range(1, len(mine) + 1)) and latest == len(mine)


@override_settings(PUSH=RECENT)
async def test_a_submitted_publish_whose_caller_gave_up_is_still_numbered_and_broadcast() -> None:
    broadcast: list[ChannelMessage] = []
    given_up = recent_store.publish_submitted("tick:gaveup", ['"a"'], broadcast=broadcast.append)
    kept = recent_store.publish_submitted("tick:gaveup", ['"b"'], broadcast=broadcast.append)
    given_up.cancel()  # its client left: only the answer is given up
    outcome = await kept
    assert [m.seq for m in outcome.messages] == [2]  # type: ignore[union-attr]  # a refusal would fail here
    assert [(m.seq, m.data_json) for m in broadcast] == [(1, '"a"'), (2, '"b"')]


@override_settings(PUSH=RECENT)
async def test_the_keys_a_store_keeps_for_its_calls_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recent_store, "PUBLISH_KEYS_KEPT", 2)
    channels = [f"tick:keys{n}" for n in range(5)]
    for round_ in range(2):
        for channel in channels:
            assert await _publish(channel, 1) == [round_ + 1]
    assert len(recent_store.store()._publish_keys) <= 2


@override_settings(PUSH={**RECENT, "RECENT_SEQ_BLOCK": 3})
async def test_publishes_in_flight_on_one_connection_keep_their_order(
    publisher_token: str,
) -> None:
    subscriber, _ = await _subscriber("tick:order")
    publisher = await connected_client(token=publisher_token)
    # Sent back to back, none waiting for its answer: the connection has several in
    # flight, and the lease of 3 seqs runs out (and is renewed) every few of them.
    for n in range(30):
        await publisher.send({"type": "publish", "channel": "tick:order", "data": n, "id": n})
    replies = [await publisher.recv_type("published") for _ in range(30)]
    seq_of = {reply["id"]: reply["seq"] for reply in replies}
    assert [seq_of[n] for n in range(30)] == list(range(1, 31))
    received = await _received(subscriber, 30)
    assert [(m["seq"], m["data"]) for m in received] == [(n + 1, n) for n in range(30)]
    await subscriber.close()
    await publisher.close()


@override_settings(PUSH={**RECENT, "WRITE_QUEUE_MAX_MESSAGES": 3})
async def test_publishes_past_the_queue_bound_are_refused_while_redis_is_slow() -> None:
    # Through a proxy of its own: a CLIENT PAUSE would stop the Redis server that the
    # other test process shares, and fail its tests.
    async with proxied_settings() as proxy:
        await recent_store.store_close()  # the next store talks through the proxy
        await _publish("tick:slow", 1)
        proxy.frozen = True  # Redis is slow: answers wait 0.6 s
        asyncio.get_running_loop().call_later(0.6, setattr, proxy, "frozen", False)
        outcomes = await asyncio.gather(
            *(
                recent_store.publish("tick:slow", str(n), None, broadcast=broadcast_async)
                for n in range(10)
            ),
            return_exceptions=True,
        )
        await recent_store.store_close()
    refused = [o for o in outcomes if isinstance(o, PushError)]
    published = sorted(o.seq for o in outcomes if not isinstance(o, BaseException))
    # All ten arrive before the next call is sent: three queued, seven refused at once.
    assert len(refused) == 7 and {o.code.value for o in refused} == {"UNAVAILABLE"}
    assert published == [2, 3, 4]


@override_settings(PUSH={**RECENT, "RECENT_SEQ_BLOCK": 2})
async def test_a_batch_takes_consecutive_seqs_at_once() -> None:
    subscriber, _ = await _subscriber("tick:batch")
    await _publish("tick:batch", 1)
    batch = await recent_store.publish_batch(
        "tick:batch", ["1", '"two"', "[3]"], None, broadcast=broadcast_async
    )
    assert [(m.seq, m.data) for m in batch] == [(2, 1), (3, "two"), (4, [3])]
    assert [m["seq"] for m in await _received(subscriber, 4)] == [1, 2, 3, 4]
    await subscriber.close()


@override_settings(PUSH=RECENT)
async def test_an_sse_stream_of_a_recent_channel_starts_at_its_latest_seq() -> None:
    await _publish("tick:sse", 3)
    node = await get_node()
    stream = InProcessStream("channel=tick:sse&channel=news")
    assert await stream.start() == 200
    assert (await stream.next_event())[0] == "connection_established"  # type: ignore[index]  # None once the stream ends
    # The greeting comes before the stream subscribes: a message published before it
    # reads the channels' latest seqs is not the stream's to deliver.
    async with asyncio.timeout(5):
        while "news" not in node.hub.channels or not node.hub.channels["news"].subscriber_count():
            await asyncio.sleep(0.01)
    await sync_to_async(push.publish)("news", 1)
    assert (await stream.next_event())[0] == "message"  # type: ignore[index]  # None once the stream ends
    # The cursor names the recent channel's latest seq, not its reserved ceiling (a
    # browser resuming from a ceiling would skip what is published up to it).
    assert stream.last_event_id == "tick:sse:3,news:1"
    await _publish("tick:sse", 1)
    event, envelope = await stream.next_event()  # type: ignore[misc]  # None once the stream ends
    assert (event, envelope["seq"], stream.last_event_id) == ("message", 4, "tick:sse:4,news:1")
    await stream.close()


@override_settings(PUSH=RECENT)
async def test_an_sse_stream_whose_recent_channel_latest_seq_is_unknown_starts_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream's read of its channels' latest seqs answers for the durable one while
    Redis fails for the recent one (a timeout): that channel's place is unknown, not 0.
    Taken as 0 it replayed the whole window, messages from before the stream opened;
    it starts live instead, and joins the cursor at the seq it starts from."""
    await _publish("tick:sse", 3)
    await sync_to_async(push.publish)("news", 0)
    node = await get_node()
    read = RecentHistory.latest_seqs

    async def failing_once(self: Any, channels: list[str]) -> dict[str, int]:
        monkeypatch.setattr(RecentHistory, "latest_seqs", read)
        raise ConnectionError("Redis timed out")

    monkeypatch.setattr(RecentHistory, "latest_seqs", failing_once)
    stream = InProcessStream("channel=news&channel=tick:sse")
    assert await stream.start() == 200
    assert (await stream.next_event())[0] == "connection_established"  # type: ignore[index]  # None once the stream ends
    async with asyncio.timeout(5):
        while any(
            channel not in node.hub.channels or not node.hub.channels[channel].subscriber_count()
            for channel in ("news", "tick:sse")
        ):
            await asyncio.sleep(0.01)
    await _publish("tick:sse", 1)
    event, envelope = await stream.next_event()  # type: ignore[misc]  # None once the stream ends
    assert (event, envelope["seq"]) == ("message", 4)
    assert stream.last_event_id == "news:1,tick:sse:4"
    await stream.close()


async def test_durable_channels_are_unchanged() -> None:
    with override_settings(PUSH=RECENT):
        await sync_to_async(push.publish)("news", {"d": 1})
        assert await _rows("news") == (1, 1)


@override_settings(PUSH=RECENT)
async def test_a_process_without_a_server_publishes_over_lasting_connections() -> None:
    """A worker publishing ticks with ``push.publish`` (no event loop of its own)."""

    def publish_many(first: int) -> list[int]:
        return [push.publish("tick:worker", n).seq for n in range(first, first + 30)]  # type: ignore[union-attr]  # None only on rollback

    before = await _store_connections()
    assert await asyncio.to_thread(publish_many, 0) == list(range(1, 31))
    # One held for the numbering calls, one for the rest (the server's id).
    opened = await _store_connections() - before
    assert opened <= 2
    assert await asyncio.to_thread(publish_many, 30) == list(range(31, 61))
    assert await _store_connections() - before == opened, "a connection per publish"


# ----- resume and history ------------------------------------------------------------------


@override_settings(PUSH=RECENT)
async def test_resume_within_the_window_replays_exactly_what_was_missed() -> None:
    await _publish("tick:r", 4)
    client, subscribed = await _subscriber("tick:r", since=1)
    assert (subscribed["seq"], subscribed["recovered"]) == (4, True)
    messages = await _received(client, 3)
    assert [(m["seq"], m["data"]) for m in messages] == [
        (2, {"n": 1}),
        (3, {"n": 2}),
        (4, {"n": 3}),
    ]
    await client.expect_nothing()
    await _publish("tick:r", 1)
    assert (await client.recv_type("message"))["seq"] == 5
    await client.close()


@override_settings(PUSH=RECENT)
async def test_resume_beyond_the_window_is_not_recovered() -> None:
    await _publish("tick:w", 8)
    client, subscribed = await _subscriber("tick:w", since=1)
    assert (subscribed["seq"], subscribed["recovered"]) == (8, False)
    assert [m["seq"] for m in await _received(client, 5)] == [4, 5, 6, 7, 8]
    await client.expect_nothing()
    await client.close()


@override_settings(PUSH={**RECENT, "RECENT_WINDOW_SECS": 1})
async def test_messages_older_than_the_window_are_gone(publisher_token: str) -> None:
    await _publish("tick:ttl", 3)
    await asyncio.sleep(1.3)  # the point: the three grow older than the 1 s window
    client, subscribed = await _subscriber("tick:ttl", since=0)
    assert (subscribed["seq"], subscribed["recovered"]) == (3, False)
    await client.expect_nothing()
    assert (await _rest_history(publisher_token, "tick:ttl", "since=0"))["results"] == []
    # The seq lives on after the window expired.
    assert await _publish("tick:ttl", 1) == [4]
    assert (await client.recv_type("message"))["seq"] == 4
    await client.close()


@override_settings(
    PUSH={
        **RECENT,
        "RECENT_WINDOW_MESSAGES": 40,
        "RECENT_WINDOW_SECS": 2,
        "SEND_QUEUE_MAX_FRAMES": 10,  # a replay reads pages of 5
    }
)
async def test_a_resume_from_before_messages_past_the_age_replays_the_rest_of_the_window(
    publisher_token: str,
) -> None:
    """The window's oldest entries are past its age (the channel kept publishing, so
    the window itself lives on) and fill the replay's first page: the replay must go on
    to the entries after them (``recovered: false``, then what the window serves), not
    take that empty page for the end of history."""
    assert await _publish("tick:aged", 6) == list(range(1, 7))
    await asyncio.sleep(1.2)
    assert await _publish("tick:aged", 1, start=6) == [7]
    await asyncio.sleep(1.2)  # the point: 1..6 are now older than the 2 s window
    assert await _publish("tick:aged", 1, start=7) == [8]
    client, subscribed = await _subscriber("tick:aged", since=0)
    assert (subscribed["seq"], subscribed["recovered"]) == (8, False)
    assert [m["seq"] for m in await _received(client, 2)] == [7, 8]
    await client.expect_nothing()
    await client.close()
    # A client told ``recovered: false`` refetches from REST, page by page: the same.
    history = await _rest_history(publisher_token, "tick:aged", "since=0&limit=5")
    assert [m["seq"] for m in history["results"]] == [7, 8]


@override_settings(PUSH={**RECENT, "RECENT_WINDOW_BYTES": 300})
async def test_the_window_is_bounded_in_bytes(publisher_token: str) -> None:
    for n in range(4):
        await recent_store.publish(
            "tick:big", json.dumps("x" * 100 + str(n)), None, broadcast=broadcast_async
        )
    history = await _rest_history(publisher_token, "tick:big", "since=0")
    # Each entry is ~200 bytes: only the newest fits in 300.
    assert [m["seq"] for m in history["results"]] == [4]


@override_settings(PUSH={**RECENT, "RECENT_WINDOW_BYTES": 300})
async def test_a_node_resumes_from_memory_only_what_the_windows_bytes_keep() -> None:
    """The node delivered 1..4 and remembers them all, but the window (300 bytes, each
    entry ~200) holds only 4. A resume from 2 must be told what any node reading the
    window would say, ``recovered: false`` and 4 alone, not 3 and 4 from memory; one
    from 3, which the window holds, is still ``recovered: true``."""
    live, _ = await _subscriber("tick:bytes")
    for n in range(4):
        await recent_store.publish(
            "tick:bytes", json.dumps("x" * 100 + str(n)), None, broadcast=broadcast_async
        )
    assert [m["seq"] for m in await _received(live, 4)] == [1, 2, 3, 4]
    behind, subscribed = await _subscriber("tick:bytes", since=2)
    assert (subscribed["seq"], subscribed["recovered"]) == (4, False)
    assert [m["seq"] for m in await _received(behind, 1)] == [4]
    await behind.expect_nothing()
    within, subscribed = await _subscriber("tick:bytes", since=3)
    assert (subscribed["seq"], subscribed["recovered"]) == (4, True)
    assert [m["seq"] for m in await _received(within, 1)] == [4]
    await within.expect_nothing()
    for client in (live, behind, within):
        await client.close()


@override_settings(PUSH={**RECENT, "HISTORY_PAGE_MAX_BYTES": 250})
async def test_rest_history_pages_of_a_recent_channel_stop_at_the_page_byte_budget(
    publisher_token: str,
) -> None:
    """The window may hold far more than a page's budget (an operator raised
    ``RECENT_WINDOW_BYTES``): a REST page still stops at ``HISTORY_PAGE_MAX_BYTES`` of
    message data, as a durable page does, with ``next`` pointing on."""
    for n in range(5):
        await recent_store.publish(
            "tick:pages", json.dumps("x" * 100 + str(n)), None, broadcast=broadcast_async
        )
    first = await _rest_history(publisher_token, "tick:pages", "since=0")
    # Each message's data is 103 bytes: two fit in 250.
    assert [m["seq"] for m in first["results"]] == [1, 2] and first["next"] is not None
    second = (await sync_to_async(_api(publisher_token).get)(first["next"])).json()
    assert [m["seq"] for m in second["results"]] == [3, 4] and second["next"] is not None
    last = (await sync_to_async(_api(publisher_token).get)(second["next"])).json()
    assert [m["seq"] for m in last["results"]] == [5] and last["next"] is None


@override_settings(PUSH={**RECENT, "HISTORY_PAGE_MAX_BYTES": 10})
async def test_a_rest_page_of_a_recent_channel_holds_one_message_larger_than_its_budget(
    publisher_token: str,
) -> None:
    await _publish("tick:one", 2)
    first = await _rest_history(publisher_token, "tick:one", "since=0")
    assert [m["seq"] for m in first["results"]] == [1] and first["next"] is not None


@override_settings(PUSH=RECENT)
async def test_rest_history_serves_the_window(publisher_token: str) -> None:
    await _publish("tick:h", 7)
    page = await _rest_history(publisher_token, "tick:h", "since=0")
    assert [m["seq"] for m in page["results"]] == [3, 4, 5, 6, 7]
    assert page["results"][0] == {
        "type": "message",
        "channel": "tick:h",
        "seq": 3,
        "message_id": page["results"][0]["message_id"],
        "data": {"n": 2},
        "timestamp": page["results"][0]["timestamp"],
    }
    first = await _rest_history(publisher_token, "tick:h", "since=4&limit=2")
    assert [m["seq"] for m in first["results"]] == [5, 6] and first["next"] is not None
    rest = await sync_to_async(_api(publisher_token).get)(first["next"])
    assert [m["seq"] for m in rest.json()["results"]] == [7] and rest.json()["next"] is None


@override_settings(PUSH=RECENT)
async def test_rest_channel_info_answers_a_recent_channels_latest_seq(
    publisher_token: str,
) -> None:
    await _publish("tick:info", 3)
    info = await sync_to_async(_api(publisher_token).get)("/api/v1/channels/tick:info")
    assert info.status_code == 200, info.content
    assert info.json() == {"channel": "tick:info", "last_seq": 3, "subscribers": 0}
    listed = await sync_to_async(_api(publisher_token).get)("/api/v1/channels/?prefix=tick:info")
    assert listed.status_code == 200, listed.content
    assert listed.json()["results"] == [info.json()]


# ----- idempotency, transactions, retention -------------------------------------------------


@override_settings(PUSH=RECENT)
async def test_an_idempotency_key_is_refused_on_a_recent_channel(publisher_token: str) -> None:
    response = await _rest_publish(publisher_token, "tick:k", 1, HTTP_IDEMPOTENCY_KEY="order-1")
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_MESSAGE"
    assert "Idempotency-Key" in response.json()["message"]
    assert (await _rest_history(publisher_token, "tick:k", "since=0"))["results"] == []


@override_settings(PUSH=RECENT)
async def test_push_publish_in_a_transaction_publishes_after_the_commit() -> None:
    subscriber, _ = await _subscriber("tick:tx")

    @sync_to_async
    def publish_in(rollback: bool) -> Any:
        try:
            with transaction.atomic():
                result = push.publish("tick:tx", {"rollback": rollback})
                if rollback:
                    raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        return result

    @sync_to_async
    def publish_service_in_transaction() -> None:
        with transaction.atomic():
            message_publish(channel="tick:tx", data=1)

    # The service itself cannot join: it says so instead of publishing before the commit.
    with pytest.raises(TransactionManagementError, match=r"push\.publish\(\)"):
        await publish_service_in_transaction()
    assert await publish_in(rollback=True) is None
    await subscriber.expect_nothing(0.3)
    assert await publish_in(rollback=False) is None
    message = await subscriber.recv_type("message")
    assert (message["seq"], message["data"]) == (1, {"rollback": False})
    await subscriber.close()


@override_settings(PUSH={**RECENT, "RETENTION_MAX_MESSAGES": 2})
async def test_trim_history_leaves_a_recent_channel_alone() -> None:
    await _publish("tick:trim", 5)
    await sync_to_async(call_command)("trim_history")
    client, subscribed = await _subscriber("tick:trim", since=0)
    assert (subscribed["seq"], subscribed["recovered"]) == (5, True)
    assert [m["seq"] for m in await _received(client, 5)] == [1, 2, 3, 4, 5]
    await client.close()


# ----- Redis losing a channel ---------------------------------------------------------------


@override_settings(PUSH=RECENT)
async def test_a_lost_lease_jumps_past_every_seq_and_resume_is_not_recovered() -> None:
    live, _ = await _subscriber("tick:lost")
    assert await _publish("tick:lost", 5) == [1, 2, 3, 4, 5]
    assert [m["seq"] for m in await _received(live, 5)] == [1, 2, 3, 4, 5]
    starts = _seq_blocks("start")
    await _lose_keys("tick:lost")
    # The next seq starts past the ceiling reserved in PostgreSQL: a jump, no repeat.
    assert await _publish("tick:lost", 2) == [1001, 1002]
    assert _seq_blocks("start") == starts + 1
    assert [m["seq"] for m in await _received(live, 2)] == [1001, 1002]
    await live.expect_nothing()
    resumed, subscribed = await _subscriber("tick:lost", since=3)
    assert (subscribed["seq"], subscribed["recovered"]) == (1002, False)
    assert [m["seq"] for m in await _received(resumed, 2)] == [1001, 1002]
    await live.close()
    await resumed.close()


@override_settings(PUSH=RECENT)
async def test_a_lease_another_redis_process_wrote_is_started_again() -> None:
    """A Redis restart that restored an old snapshot, or a replica promoted before it
    had the last writes: the lease may be behind what was handed out."""
    assert await _publish("tick:snap", 3) == [1, 2, 3]
    redis = redis_async()
    await redis.hset(recent_store.lease_key(redis_prefix(), "tick:snap"), "n", 1)
    await redis.hset(recent_store.lease_key(redis_prefix(), "tick:snap"), "r", "older")
    await redis.aclose()
    # Not seq 2 again: the lease is started past everything reserved.
    assert await _publish("tick:snap", 1) == [1001]
    client, subscribed = await _subscriber("tick:snap", since=1)
    assert (subscribed["seq"], subscribed["recovered"]) == (1001, False)
    assert [m["seq"] for m in await _received(client, 1)] == [1001]
    await client.close()


@override_settings(PUSH=RECENT)
async def test_a_store_that_missed_a_server_change_catches_up_without_a_jump() -> None:
    assert await _publish("tick:known", 2) == [1, 2]
    store = recent_store.store()
    store._server_id = "a server it knew before"
    assert await _publish("tick:known", 1) == [3]
    store._server_id = "a server it knew before"
    assert (await store.read("tick:known", 0, 10, recent_store.Window.from_settings()))[0] == 3  # type: ignore[index]  # None only for a channel it does not hold


@override_settings(PUSH=RECENT)
async def test_while_the_lease_is_missing_a_resume_is_not_recovered() -> None:
    await _publish("tick:gone", 3)
    await _lose_keys("tick:gone")
    client, subscribed = await _subscriber("tick:gone", since=1)
    assert subscribed["recovered"] is False
    await client.expect_nothing()
    assert await _publish("tick:gone", 1) == [1001]
    assert (await client.recv_type("message"))["seq"] == 1001
    await client.close()


@override_settings(PUSH=RECENT)
async def test_a_resume_from_0_of_a_channel_whose_lease_is_missing_is_not_recovered() -> None:
    """A node that joins the channel after Redis lost it reads latest seq 0: that is
    no proof that nothing after 0 existed."""
    await _publish("tick:zero", 3)
    await _lose_keys("tick:zero")
    client, subscribed = await _subscriber("tick:zero", since=0)
    assert (subscribed["seq"], subscribed["recovered"]) == (0, False)
    assert await _publish("tick:zero", 1) == [1001]
    assert (await client.recv_type("message"))["seq"] == 1001
    # A channel never published to lost nothing: a resume from 0 is recovered.
    fresh, subscribed = await _subscriber("tick:never", since=0)
    assert (subscribed["seq"], subscribed["recovered"]) == (0, True)
    await client.close()
    await fresh.close()


@override_settings(PUSH={**RECENT, "RECENT_PER_CHANNEL": 2})
async def test_a_node_never_claims_to_replay_what_redis_lost() -> None:
    live, _ = await _subscriber("tick:mem")
    await _publish("tick:mem", 5)
    await _received(live, 5)
    await _lose_keys("tick:mem")
    # The node remembers only seqs 4 and 5; the window that held 2 and 3 is gone.
    client, subscribed = await _subscriber("tick:mem", since=1)
    assert (subscribed["seq"], subscribed["recovered"]) == (5, False)
    await client.expect_nothing()
    assert await _publish("tick:mem", 1) == [1001]
    assert (await client.recv_type("message"))["seq"] == 1001
    assert (await live.recv_type("message"))["seq"] == 1001
    await client.close()
    await live.close()


# Pages of 5 (half the send queue), and no resume served from the node's memory.
@override_settings(
    PUSH={
        **RECENT,
        "RECENT_WINDOW_MESSAGES": 100,
        "SEND_QUEUE_MAX_FRAMES": 10,
        "RECENT_PER_CHANNEL": 1,
    }
)
async def test_a_window_lost_between_pages_of_a_replay_closes_rather_than_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis loses the window after the first page of a replay went out with
    ``recovered: true``: the next page is empty, its latest seq unknown (0). Ending the
    replay there would let the next live seq (a new block's) follow as a silent gap;
    the connection is closed 4002 after the contiguous messages, and the client's
    resume from its last seq is told ``recovered: false``."""
    read = recent_store.RecentStore.read

    async def losing_before_the_second_page(self: Any, channel: str, since: Any, *args: Any) -> Any:
        if channel == "tick:lost" and since == 5:  # the page after the first five
            await _lose_keys(channel)
        return await read(self, channel, since, *args)

    await _publish("tick:lost", 12)
    monkeypatch.setattr(recent_store.RecentStore, "read", losing_before_the_second_page)
    client, subscribed = await _subscriber("tick:lost", since=0)
    assert (subscribed["seq"], subscribed["recovered"]) == (12, True)
    seqs = [m["seq"] for m in await _received(client, 5)]
    assert seqs == [1, 2, 3, 4, 5]
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()  # nothing more of the channel: 6 on would follow a gap
    assert closed.value.code == 4002
    again, resumed = await _subscriber("tick:lost", since=5)
    assert resumed["recovered"] is False
    await again.expect_nothing()
    await again.close()


@override_settings(PUSH={**RECENT, "RECENT_SEQ_BLOCK": 10})
async def test_a_block_reserved_before_the_loss_never_brings_seqs_back() -> None:
    """A node reserves a block (ceiling 20) but is slow to install it; another node
    reserves the next (30), installs it and hands out seqs up to 25; Redis then loses
    the channel, and the slow node installs its block. Starting the counter at that
    block's bottom (10) would hand out 11..25 again."""
    take = sync_to_async(recent_store.seq_block_take)
    assert await _publish("tick:race", 1) == [1]
    slow_top = await take("tick:race", 10)
    store = recent_store.store()
    await store.install_block("tick:race", await take("tick:race", 10))
    assert (await _publish("tick:race", 24))[-1] == 25
    await _lose_keys("tick:race")
    await store.install_block("tick:race", slow_top)
    # The lease starts again from a block reserved after the loss: 31..40.
    assert await _publish("tick:race", 1) == [31]


# ----- Redis down -----------------------------------------------------------------------------


@pytest.fixture
def redis_port() -> int:
    return free_port()


async def test_redis_down_answers_unavailable_then_publishing_recovers(
    publisher_token: str, redis_port: int, tmp_path: Path
) -> None:
    own_redis = redis_server(redis_port, tmp_path)
    with override_settings(
        PUSH={**RECENT, "RECENT_SEQ_BLOCK": 100},
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
    ):
        publisher = await connected_client(token=publisher_token)
        request = {"type": "publish", "channel": "tick:down", "data": 1, "id": 7}
        started = asyncio.get_running_loop().time()
        reply = await publisher.request(request)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "UNAVAILABLE", 7)
        assert asyncio.get_running_loop().time() - started < 3
        response = await _rest_publish(publisher_token, "tick:down", 1)
        assert response.status_code == 503 and response.json()["code"] == "UNAVAILABLE"
        # The node's sync still reads the durable channels it serves.
        await sync_to_async(push.publish)("news", 1)
        history = (await get_node()).hub.history
        assert await history.latest_seqs(["tick:down", "news"]) == {"news": 1}
        try:
            own_redis.launch()  # on this thread: the process dies with the one starting it
            await asyncio.to_thread(own_redis.wait_answering)
            assert (await publisher.request(request))["seq"] == 1
            assert (await publisher.request(request))["seq"] == 2
            # A real restart: Redis comes back empty and the seq jumps past the block.
            own_redis.stop(signal.SIGKILL)
            assert (await publisher.request(request))["code"] == "UNAVAILABLE"
            own_redis.launch()
            await asyncio.to_thread(own_redis.wait_answering)
            assert (await publisher.request(request))["seq"] == 101
        finally:
            own_redis.stop(signal.SIGKILL)
            await publisher.close()


async def test_a_publish_redis_never_answers_is_answered_unavailable_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis that takes the connection and then says nothing (no reset, no timeout on
    this client): the publish still ends, with the store's deadline."""
    import redis.asyncio as aioredis

    from push.tests.redis_proxy import Proxy

    monkeypatch.setattr(recent_store, "PUBLISH_DEADLINE_SECS", 0.3)
    monkeypatch.setattr(recent_store, "EXPIRY_CHECK_SECS", 0.05)
    target = aioredis.connection.parse_url(str(settings.REDIS_URL))
    proxy = Proxy((target.get("host", "127.0.0.1"), int(target.get("port", 6379))))
    port = await proxy.start()
    store = recent_store.RecentStore(
        aioredis.from_url(f"redis://127.0.0.1:{port}/{target.get('db', 0)}"), redis_prefix()
    )
    broadcast: list[ChannelMessage] = []
    monkeypatch.setattr(recent_store, "store", lambda: store)
    try:
        proxy.frozen = True
        # Both in the one call Redis never answers: one awaited (REST), one answered by
        # the call (a WebSocket publish).
        written = recent_store._Awaited("tick:silent", ['"x"'])
        store.append(written)
        submitted = recent_store.publish_submitted(
            "tick:silent", ['"y"'], broadcast=broadcast.append
        )
        async with asyncio.timeout(3):
            # Sent and never answered, the publish may have been stored: the publisher is
            # told so, not "not published".
            with pytest.raises(TimeoutError, match="did not answer in time; the publish may"):
                await written.future
            outcome = await submitted
        assert isinstance(outcome, PushError) and outcome.code == "UNAVAILABLE"
        assert "the publish may have been stored" in outcome.message
        assert broadcast == []
    finally:
        await proxy.stop()
        await store.close()


# ----- PostgreSQL down while a lease needs a block --------------------------------------------


@override_settings(PUSH=RECENT)
async def test_postgresql_down_at_a_lease_start_answers_unavailable_then_recovers(
    publisher_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new lease needs a block of seqs from PostgreSQL: while it cannot be reserved
    the publisher is told PostgreSQL is unavailable, and the next publish once it is
    back is numbered at once (the claim of the failed start is not left pending)."""

    def refused(channel: str, amount: int) -> int:
        raise OperationalError("connection refused")

    reserve = recent_store._seq_block_take
    monkeypatch.setattr(recent_store, "_seq_block_take", db_call(refused))
    publisher = await connected_client(token=publisher_token)
    request = {"type": "publish", "channel": "tick:pgdown", "data": 1, "id": 1}
    try:
        reply = await publisher.request(request)
        assert (reply["type"], reply["code"]) == ("error", "UNAVAILABLE")
        assert "PostgreSQL" in reply["message"]
        monkeypatch.setattr(recent_store, "_seq_block_take", reserve)
        started = asyncio.get_running_loop().time()
        reply = await publisher.request(request)
        assert (reply["type"], reply["seq"]) == ("published", 1)
        assert asyncio.get_running_loop().time() - started < 1
    finally:
        await publisher.close()


# The stopped loop never runs the read it was handed: closing it drops the coroutine.
@pytest.mark.filterwarnings("ignore:coroutine 'window_since' was never awaited")
def test_a_synchronous_caller_is_not_held_by_a_loop_that_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A node's loop that stopped (shutdown) with a sync view's read handed to it: the
    # view's thread gets UNAVAILABLE instead of waiting for good.
    stopped = asyncio.new_event_loop()
    monkeypatch.setattr(recent_store, "SYNC_CALL_TIMEOUT_SECS", 0.2)
    recent_store.serve_on(stopped)
    try:
        with pytest.raises(PushError) as refused:
            recent_store.window_since_sync("tick:stopped", 0, 10, 1000)
        assert refused.value.code == "UNAVAILABLE"
        del refused  # its traceback holds the dropped read
    finally:
        recent_store.serve_on(None)
        stopped.close()
        # The dropped read sits in a reference cycle: collected here, its warning is
        # this test's (filtered above), not whichever test the collector runs in later.
        gc.collect()


# A window of 12 hours: a lease's expiry is renewed every 2 seqs (and after the window
# expired), ``Window.lease_renewal``.
@override_settings(PUSH={**RECENT, "RECENT_WINDOW_SECS": 43_200})
async def test_a_lease_expiry_is_renewed_every_few_seqs_and_after_the_window_expired() -> None:
    channel = "tick:renewal"
    redis = redis_async()
    lease = recent_store.lease_key(redis_prefix(), channel)
    window = recent_store.window_key(redis_prefix(), channel)

    async def ttl_after_publish(seq: int) -> int:
        await redis.expire(lease, 100)
        assert await _publish(channel, 1) == [seq]
        return int(await redis.ttl(lease))

    try:
        assert await _publish(channel, 2) == [1, 2]
        assert await ttl_after_publish(3) <= 100  # 3 is in 2's renewal period
        assert await ttl_after_publish(4) > 100_000  # 4 starts the next
        assert await ttl_after_publish(5) <= 100
        assert await ttl_after_publish(6) > 100_000
        await redis.delete(window)  # as when the window expired
        assert await ttl_after_publish(7) > 100_000  # within 6's period, but after it
        assert await ttl_after_publish(8) > 100_000
        assert await ttl_after_publish(9) <= 100
    finally:
        await redis.aclose()


# A window of 16 messages may hold 2 more until a publish trims it (``Window.trim_slack``);
# readers serve the last 16 only.
@override_settings(PUSH={**RECENT, "RECENT_WINDOW_MESSAGES": 16})
async def test_entries_kept_past_the_count_until_the_next_trim_are_never_served(
    publisher_token: str,
) -> None:
    channel = "tick:slack"
    redis = redis_async()
    window = recent_store.window_key(redis_prefix(), channel)
    try:
        assert await _publish(channel, 18) == list(range(1, 19))
        assert await redis.llen(window) == 18  # 1 and 2 wait for the next trim
        served = list(range(3, 19))
        # Seq 2 is still in Redis but outside the window: a resume after 1 missed it.
        client, subscribed = await _subscriber(channel, since=1)
        assert (subscribed["seq"], subscribed["recovered"]) == (18, False)
        assert [m["seq"] for m in await _received(client, 16)] == served
        await client.expect_nothing()
        await client.close()
        client, subscribed = await _subscriber(channel, since=2)
        assert (subscribed["seq"], subscribed["recovered"]) == (18, True)
        assert [m["seq"] for m in await _received(client, 16)] == served
        await client.close()
        history = await _rest_history(publisher_token, channel, "since=0&limit=100")
        assert [m["seq"] for m in history["results"]] == served
        history = await _rest_history(publisher_token, channel, "since=1&limit=4")
        assert [m["seq"] for m in history["results"]] == [3, 4, 5, 6]
        assert await _publish(channel, 1) == [19]
        assert await redis.llen(window) == 16  # trimmed back to its count
    finally:
        await redis.aclose()


# A window of 16 s: a publish sets its expiry to 17 s, and the next ones set it again
# only a second (a sixteenth of the window) after that (``Window.expiry_refresh_ms``).
@override_settings(PUSH={**RECENT, "RECENT_WINDOW_SECS": 16})
async def test_the_window_expiry_is_set_again_a_sixteenth_of_the_window_after_the_last() -> None:
    channel = "tick:expiry"
    redis = redis_async()
    lease = recent_store.lease_key(redis_prefix(), channel)
    window = recent_store.window_key(redis_prefix(), channel)
    try:
        assert await _publish(channel, 1) == [1]
        assert 16_000 < await redis.pttl(window) <= 17_000
        await redis.pexpire(window, 5_000)
        assert await _publish(channel, 1) == [2]  # within the second: left as it was
        assert await redis.pttl(window) <= 5_000
        set_at = int(await redis.hget(lease, "e"))
        await redis.hset(lease, "e", set_at - 1_000)  # as if a second went by
        assert await _publish(channel, 1) == [3]
        assert 16_000 < await redis.pttl(window) <= 17_000
        await redis.delete(window)  # expired: the next publish sets it at once
        await redis.hset(lease, "e", set_at + 60_000)
        assert await _publish(channel, 1) == [4]
        assert 16_000 < await redis.pttl(window) <= 17_000
    finally:
        await redis.aclose()


async def test_a_restart_that_restores_a_snapshot_never_hands_a_seq_out_again(
    redis_port: int, tmp_path: Path
) -> None:
    """Redis restarted from a snapshot taken before the last publishes: the store
    reconnects by itself, and the leases the snapshot brings back were written by the
    process it knew. Their counters are behind what was handed out."""
    own_redis = redis_server(redis_port, tmp_path)
    own_redis.start()
    with override_settings(PUSH=RECENT, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0"):
        try:
            assert await _publish("tick:snapshot", 3) == [1, 2, 3]
            redis = redis_async()
            await redis.save()  # the snapshot: the counter at 3
            await redis.aclose()
            assert await _publish("tick:snapshot", 2) == [4, 5]
            own_redis.stop(signal.SIGKILL)
            own_redis.launch()
            await asyncio.to_thread(own_redis.wait_answering)
            # The window the snapshot holds misses 4 and 5: a resume is not recovered.
            client, subscribed = await _subscriber("tick:snapshot", since=2)
            assert subscribed["recovered"] is False, subscribed
            # 4 and 5 went out before the restart: whatever comes next is past them.
            (after,) = await _publish("tick:snapshot", 1)
            assert after > 5, after
            assert (await client.recv_type("message"))["seq"] == after
            await client.close()
        finally:
            own_redis.stop(signal.SIGKILL)


async def test_a_read_that_finds_a_new_redis_server_reads_its_window(
    redis_port: int, tmp_path: Path
) -> None:
    """The first command a store sends after a restart is a read, and another node has
    already started the channel's lease on the new server: the read is answered from
    it, not as a lost lease."""
    own_redis = redis_server(redis_port, tmp_path)
    own_redis.start()
    with override_settings(PUSH=RECENT, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0"):
        try:
            assert await _publish("tick:reread", 2) == [1, 2]
            own_redis.stop(signal.SIGKILL)
            own_redis.launch()
            await asyncio.to_thread(own_redis.wait_answering)
            other_node = redis_async()
            server = (await other_node.info("server"))["run_id"]
            lease = recent_store.lease_key(redis_prefix(), "tick:reread")
            await other_node.hset(lease, mapping={"n": 1001, "c": 2000, "r": server})
            (tail,) = recent_store.entry_tails(["an-id"], 1.0e9, ['"new"'])
            window = recent_store.window_key(redis_prefix(), "tick:reread")
            await other_node.rpush(window, '{"seq":1001,' + tail)
            await other_node.aclose()
            bounds = recent_store.Window(messages=5, secs=10**10, bytes=10**6, seq_block=1000)
            latest, messages = await recent_store.store().read("tick:reread", 1000, 10, bounds)  # type: ignore[misc]  # None would fail the test here
            assert (latest, [(m.seq, m.data) for m in messages]) == (1001, [(1001, "new")])
        finally:
            own_redis.stop(signal.SIGKILL)
