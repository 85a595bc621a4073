"""Graceful drain: SIGTERM makes a node tell its clients to go (1001) and exit; clients
that resume on another node lose nothing; a client that never reads does not keep the
node up past PUSH_DRAIN_DEADLINE_SECS. Runs under daphne and uvicorn."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.servers import Database, ServerNode, create_token
from tests.waiting import wait_until
from tests.wsclient import flood, open_ws, stalled_subscriber, subscribe

pytestmark = pytest.mark.e2e

CLIENTS = 20
MESSAGES = 200


async def _follow(
    first_url: str, fallback_url: str, channel: str, seen: list[int], subscribed: list[bool]
) -> int | None:
    """Read until the node sends us away, then resume on the other node until all arrive."""
    ws, _ = await subscribe(first_url, channel, since=0)
    subscribed.append(True)
    close_code = None
    try:
        while True:
            envelope = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if envelope["type"] == "message":
                seen.append(envelope["seq"])
    except ConnectionClosed:
        close_code = ws.close_code
    ws, _ = await subscribe(fallback_url, channel, since=seen[-1] if seen else 0)
    while len(seen) < MESSAGES:
        envelope = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if envelope["type"] == "message":
            seen.append(envelope["seq"])
    await ws.close()
    return close_code


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
async def test_sigterm_drains_and_clients_resume_elsewhere(
    e2e_env: dict[str, str], e2e_database: Database, publisher_token: str, server: str
) -> None:
    draining = ServerNode(e2e_env, server=server, name=f"drain-{server}").start()
    staying = ServerNode(e2e_env, name=f"stay-{server}").start()
    try:
        channel = f"drain-{uuid.uuid4().hex[:8]}"
        seen: list[list[int]] = [[] for _ in range(CLIENTS)]
        subscribed: list[bool] = []
        followers = [
            asyncio.create_task(_follow(draining.ws_url, staying.ws_url, channel, s, subscribed))
            for s in seen
        ]
        await wait_until(
            lambda: len(subscribed) == CLIENTS, "every follower subscribed on the draining node"
        )
        publisher = await open_ws(staying.ws_url, token=publisher_token)
        for i in range(MESSAGES):
            await publisher.send(json.dumps({"type": "publish", "channel": channel, "data": i}))
            if i == MESSAGES // 3:
                started = time.monotonic()
                await asyncio.to_thread(draining.stop)
                drain_secs = time.monotonic() - started
            await asyncio.sleep(0.005)  # pacing: the drain falls mid-stream
        close_codes = await asyncio.gather(*followers)
        assert set(close_codes) == {1001}, close_codes
        for received in seen:
            assert received == list(range(1, MESSAGES + 1))
        assert drain_secs < 15
        # uvicorn re-raises the SIGTERM it handled once it has shut down (-15).
        assert draining.process is not None and draining.process.returncode in (0, -15)
        still_open = e2e_database.query(
            "SELECT count(*) FROM push_connection WHERE server_id = %s AND disconnected_at IS NULL",
            draining.name,
        )
        assert still_open == [(0,)], "the drained node marked its connections closed"
        # It never read its 200 replies: a closing handshake would wait behind them
        # (websockets' close timeout, 10 s). Closed before the stops below, which hold
        # this loop: a socket still open would hold the node's drain as long.
        publisher.transport.abort()
        await publisher.wait_closed()
    finally:
        draining.stop()
        staying.stop()


DRAIN_DEADLINE_SECS = 3.0
# Past the deadline: recording the closes, leaving the cluster, the server's own stop.
EXIT_MARGIN_SECS = 2.0


async def _read_until_closed(ws: ClientConnection) -> int | None:
    try:
        while True:
            await ws.recv()
    except ConnectionClosed:
        return ws.close_code


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
async def test_a_client_that_never_reads_does_not_hold_the_drain_past_its_deadline(
    e2e_env: dict[str, str], publisher_token: str, server: str
) -> None:
    env = {**e2e_env, "PUSH_DRAIN_DEADLINE_SECS": str(DRAIN_DEADLINE_SECS)}
    node = ServerNode(env, server=server, name=f"drain-stalled-{server}").start()
    stalled = None
    try:
        channel = f"drain-stalled-{uuid.uuid4().hex[:8]}"
        stalled = await stalled_subscriber(node.ws_url, channel)
        healthy = [(await subscribe(node.ws_url, channel))[0] for _ in range(3)]
        readers = [asyncio.create_task(_read_until_closed(ws)) for ws in healthy]
        # ~6 MB: more than the stalled client's socket buffers take, less than its send
        # queue, so it is still connected, with frames waiting, when the drain starts.
        await flood(node.ws_url, publisher_token, channel, 96, 64 * 1024)
        assert node.process is not None
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(node.process.wait, DRAIN_DEADLINE_SECS + 30)
        exited_after = time.monotonic() - started
        assert exited_after < DRAIN_DEADLINE_SECS + EXIT_MARGIN_SECS, exited_after
        assert node.process.returncode in (0, -15)
        assert await asyncio.gather(*readers) == [1001, 1001, 1001]
    finally:
        node.stop()
        if stalled is not None:
            stalled.transport.abort()


PRESENCE_CHANNELS = 40


async def _reply(ws: ClientConnection, envelope: dict[str, Any], kind: str) -> dict[str, Any]:
    """The reply of type ``kind`` to ``envelope`` (presence joins and leaves may come
    first)."""
    await ws.send(json.dumps(envelope))
    while (reply := json.loads(await asyncio.wait_for(ws.recv(), 15)))["type"] != kind:
        assert reply["type"] in ("join", "leave"), reply
    return reply


async def test_a_drained_nodes_presence_members_leave(
    e2e_env: dict[str, str], two_nodes: tuple[ServerNode, ServerNode]
) -> None:
    # The drain closes every connection, and each close makes its members leave in the
    # background: a node that stopped before those leaves were made, having left the
    # cluster's directory, would never be reaped, and its members would stay listed.
    names = [f"drain-{role}-{uuid.uuid4().hex[:6]}" for role in ("watcher", "member")]
    watcher_token, member_token = [
        await asyncio.to_thread(create_token, e2e_env, name, staff=True) for name in names
    ]
    rooms = [f"presence-drain-{uuid.uuid4().hex[:6]}-{i}" for i in range(PRESENCE_CHANNELS)]
    staying = two_nodes[0]
    draining = ServerNode(
        e2e_env, server="uvicorn", name=f"drain-presence-{uuid.uuid4().hex[:6]}"
    ).start()
    try:
        watcher = await open_ws(staying.ws_url, token=watcher_token)
        member = await open_ws(draining.ws_url, token=member_token)
        for ws in (watcher, member):
            for room in rooms:
                await _reply(ws, {"type": "subscribe", "channel": room}, "subscribed")
        for room in rooms:
            listing = await _reply(watcher, {"type": "presence", "channel": room}, "presence")
            assert len(listing["members"]) == 2
        await asyncio.to_thread(draining.stop)
        for room in rooms:
            listing = await _reply(watcher, {"type": "presence", "channel": room}, "presence")
            assert len(listing["members"]) == 1, (room, listing)  # the watcher alone
        await watcher.close()
        member.transport.abort()
    finally:
        draining.stop()
