"""Redis killed and started again, empty, on the same port while ticks are published to a
recent-only channel (seq and window in Redis alone): every publish is answered in
bounded time, no seq is handed out twice, the seq jumps forward past the restart, live
subscribers see one increasing stream of real messages, and a resume from before the
restart is told ``recovered: false`` (docs/semantics.md, "History modes")."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import statistics
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest
import redis

from devtools.cluster import Cluster
from devtools.processes import OwnedProcess
from tests.faults import clients
from tests.faults.report import measure
from tests.servers import Database
from tests.wsclient import subscribe

pytestmark = pytest.mark.faults

SUBSCRIBERS = 30
TICKS_PER_SEC = 15.0  # per ticker; two tickers
STREAM_BEFORE_SECS = 2.0
REDIS_DOWN_SECS = 2.0
STREAM_AFTER_SECS = 5.0
# docs/semantics.md: a publish to a recent channel is answered within about 2 s while
# Redis is away, 5 s at most for a call Redis took and never answered.
ANSWER_BOUND_SECS = 6.0
# The nodes reconnect to Redis by themselves; publishing must work again within this.
RECOVERY_BOUND_SECS = 5.0
CATCH_UP_TIMEOUT_SECS = 20.0
RESUME_TIMEOUT_SECS = 10.0
REFUSALS_ALLOWED = {"503 UNAVAILABLE", "UNAVAILABLE"}


def redis_keeps_nothing_on_disk(port: int) -> bool:
    """No snapshot and no append-only file: a restart comes back empty, so the test
    covers Redis losing every lease and window (not an old copy coming back)."""
    config = redis.Redis(port=port, decode_responses=True).config_get("save", "appendonly")
    return config == {"save": "", "appendonly": "no"}


def stored_ceiling(database: Database, channel: str) -> int:
    """``push_channel.last_seq``: for a recent channel, the top of the seqs reserved."""
    rows = database.query("SELECT last_seq FROM push_channel WHERE name = %s", channel)
    return int(rows[0][0]) if rows else 0


def data_key(data: Any) -> str:
    return json.dumps(data, sort_keys=True)


def strictly_increasing(values: list[int]) -> bool:
    return all(later > earlier for earlier, later in itertools.pairwise(values))


def repeated(values: Iterable[int]) -> list[int]:
    return sorted(value for value, count in Counter(values).items() if count > 1)


def sent_data(tickers: list[clients.Ticker]) -> set[str]:
    return {data_key(attempt.data) for ticker in tickers for attempt in ticker.attempts}


def acked_data(tickers: list[clients.Ticker]) -> dict[int, str]:
    """seq -> the data acknowledged with it."""
    return {a.seq: data_key(a.data) for t in tickers for a in t.acked if a.seq is not None}


def stream_faults(
    seqs: list[int], data: list[Any], sent: set[str], acked: dict[int, str]
) -> list[str]:
    """What is wrong with one subscriber's stream: a seq not above the one before it,
    data no ticker sent, data other than what its seq was acknowledged with, or one
    ticker's messages out of the order it sent them."""
    faults = []
    if not strictly_increasing(seqs):
        faults.append(f"seqs not strictly increasing: {seqs}")
    for seq, item in zip(seqs, data, strict=True):
        if data_key(item) not in sent:
            faults.append(f"seq {seq} carries data nobody sent: {item}")
        elif seq in acked and acked[seq] != data_key(item):
            faults.append(f"seq {seq} carries {item}, acknowledged with {acked[seq]}")
    by_ticker: dict[str, list[int]] = {}
    for item in data:
        by_ticker.setdefault(item["by"], []).append(item["i"])
    faults.extend(
        f"{name}'s messages out of order: {indexes}"
        for name, indexes in by_ticker.items()
        if not strictly_increasing(indexes)
    )
    return faults


def one_data_per_seq(streams: Iterable[tuple[list[int], list[Any]]]) -> list[str]:
    """Seqs that reached two clients with different data: a seq handed out twice even
    where no publisher was told of it (a publish whose answer was lost)."""
    seen: dict[int, str] = {}
    faults = []
    for seqs, data in streams:
        for seq, item in zip(seqs, data, strict=True):
            if seen.setdefault(seq, data_key(item)) != data_key(item):
                faults.append(f"seq {seq}: {seen[seq]} and {data_key(item)}")
    return faults


def missing(subscriber: clients.ResumingSubscriber, seqs: set[int]) -> set[int]:
    return seqs - set(subscriber.seqs)


async def wait_until_all_received(
    subscribers: list[clients.ResumingSubscriber], seqs: set[int]
) -> float:
    """Wait until every subscriber has every seq in ``seqs``; the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while any(missing(s, seqs) for s in subscribers):
        if loop.time() - started > CATCH_UP_TIMEOUT_SECS:
            break
        await asyncio.sleep(0.05)
    return loop.time() - started


async def resume(ws_url: str, channel: str, since: int) -> tuple[dict[str, Any], list[Any]]:
    """Subscribe with ``since`` on one node: its ``subscribed`` reply and the messages
    it sent up to the seq that reply named."""
    ws, reply = await subscribe(ws_url, channel, since=since)
    messages: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(RESUME_TIMEOUT_SECS):
            while not messages or messages[-1]["seq"] < reply["seq"]:
                envelope = json.loads(await ws.recv())
                if envelope["type"] == "message":
                    messages.append(envelope)
    except TimeoutError:
        pass  # a short replay shows in the assertions on what came
    finally:
        await ws.close()
    return reply, messages


def node_ws_urls(cluster: Cluster) -> list[str]:
    return [
        cluster.node_url(record.name).replace("http://", "ws://", 1) + "/ws/"
        for record in cluster.node_records()
    ]


def longest_ack_pause(tickers: list[clients.Ticker]) -> float:
    """The longest time without any acknowledgement, across the tickers together."""
    times = sorted(a.answered_at for t in tickers for a in t.acked)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.mark.timeout(120)
async def test_a_redis_restart_jumps_a_recent_channel_forward(
    cluster: Cluster,
    recent_channel: str,
    backend_key: str,
    own_redis: OwnedProcess,
    faults_database: Database,
) -> None:
    assert redis_keeps_nothing_on_disk(own_redis.port)
    loop = asyncio.get_running_loop()
    channel = recent_channel
    async with (
        clients.audience(cluster.proxy_ws_url, channel, SUBSCRIBERS) as audience,
        clients.RestTicker(cluster.proxy_url, backend_key, channel) as rest,
        clients.WsTicker(cluster.proxy_ws_url, backend_key, channel) as ws,
    ):
        tickers: list[clients.Ticker] = [rest, ws]
        assert len({s.server_id for s in audience}) == len(cluster.node_records()), (
            "subscribers on every node"
        )
        async with rest.steadily(TICKS_PER_SEC), ws.steadily(TICKS_PER_SEC):
            await asyncio.sleep(STREAM_BEFORE_SECS)
            # Read before the kill: the ceiling only grows, so every seq after the
            # restart must be above this one too.
            ceiling = await asyncio.to_thread(stored_ceiling, faults_database, channel)
            killed_at = loop.time()
            await asyncio.to_thread(own_redis.stop, signal.SIGKILL)
            await asyncio.sleep(REDIS_DOWN_SECS)
            launched_at = loop.time()
            own_redis.launch()
            await asyncio.to_thread(own_redis.wait_answering)
            await asyncio.sleep(STREAM_AFTER_SECS)

        attempts = [a for t in tickers for a in t.attempts]
        # Redis was away from killed_at until launched_at: an acknowledgement that came
        # before the launch was numbered before the kill. (The nodes may publish again
        # before wait_answering notices Redis is back: the launch is the line.)
        before = sorted(
            a.seq for a in attempts if a.seq is not None and a.answered_at < launched_at
        )
        after = sorted(
            a.seq for a in attempts if a.seq is not None and a.answered_at >= launched_at
        )
        stayed = [s for s in audience if not s.resumes]
        catch_up_secs = await wait_until_all_received(stayed, set(after))

    # The channel really is recent-only: nothing of it was written to PostgreSQL but
    # its ceiling.
    assert await asyncio.to_thread(faults_database.stored_messages, channel) == 0

    # 1. Every publish answered in bounded time, acknowledged or refused UNAVAILABLE;
    # no seq acknowledged twice.
    slowest = max(attempts, key=lambda a: a.wait_secs)
    assert slowest.wait_secs <= ANSWER_BOUND_SECS, slowest
    refusals = Counter(a.refusal for a in attempts if a.refusal is not None)
    assert set(refusals) <= REFUSALS_ALLOWED, refusals
    assert repeated(before + after) == [], "no seq acknowledged twice"

    # 2. Publishing came back by itself, past every seq of before the kill and past
    # the ceiling PostgreSQL held: a jump forward, never a repeat.
    assert before and after, (len(before), len(after))
    first_after = min(
        (a for a in attempts if a.seq is not None and a.answered_at >= launched_at),
        key=lambda a: a.answered_at,
    )
    assert first_after.answered_at - launched_at <= RECOVERY_BOUND_SECS, first_after
    assert after[0] > before[-1]
    assert after[0] > ceiling >= before[-1], (ceiling, before[-1], after[0])

    # 3. The subscribers that stayed connected (on every node) saw one increasing stream
    # of real messages, each publisher's in its order, and got every message
    # acknowledged after the restart. (Across the kill they may have missed some: the
    # window was lost, and they see it as a jump in seq.)
    assert {s.server_id for s in stayed} == {s.server_id for s in audience}, (
        "a subscriber on every node stayed connected"
    )
    sent, acked = sent_data(tickers), acked_data(tickers)
    wrong = {
        index: faults
        for index, s in enumerate(audience)
        if (faults := stream_faults(s.seqs, s.data, sent, acked))
    }
    assert wrong == {}
    late = {index: sorted(missing(s, set(after)))[:10] for index, s in enumerate(stayed)}
    assert all(not seqs for seqs in late.values()), late

    # 4. A resume from before the kill, on each node: recovered false, and what it
    # replays is the new window, real data under the seqs it was acknowledged with.
    since = before[len(before) // 2]
    resumes = [await resume(url, channel, since) for url in node_ws_urls(cluster)]
    for reply, messages in resumes:
        assert reply["recovered"] is False, reply
        seqs = [m["seq"] for m in messages]
        assert seqs and seqs[-1] == reply["seq"], (reply, seqs)
        assert seqs[0] > before[-1], seqs
        assert stream_faults(seqs, [m["data"] for m in messages], sent, acked) == []
    streams = [(s.seqs, s.data) for s in audience]
    streams += [([m["seq"] for m in ms], [m["data"] for m in ms]) for _, ms in resumes]
    assert one_data_per_seq(streams) == []

    name = f"Redis killed and restarted, recent channel (down {REDIS_DOWN_SECS:.0f} s)"
    pauses = [clients.max_gap(s.received_at, killed_at, launched_at) for s in audience]
    measure(
        name,
        "acknowledged before the kill / after the restart",
        f"{len(before)} / {len(after)}",
    )
    measure(name, "publishes refused (by reason)", str(dict(refusals)))
    measure(
        name,
        "seq jump (last before kill -> first after; PostgreSQL ceiling before)",
        f"{before[-1]} -> {after[0]} (+{after[0] - before[-1]}; ceiling {ceiling})",
    )
    measure(
        name,
        "first acknowledgement after Redis was started again",
        f"{first_after.answered_at - launched_at:.2f} s",
    )
    measure(name, "longest wait for a publish's answer", f"{slowest.wait_secs:.2f} s")
    measure(name, "longest time without an acknowledgement", f"{longest_ack_pause(tickers):.2f} s")
    measure(
        name,
        "pause subscribers saw (longest gap between receipts; median / max)",
        f"{statistics.median(pauses):.2f} s / {max(pauses):.2f} s",
    )
    measure(name, "subscribers disconnected", f"{SUBSCRIBERS - len(stayed)} of {SUBSCRIBERS}")
    measure(name, "last subscriber caught up after publishing stopped", f"{catch_up_secs:.2f} s")
