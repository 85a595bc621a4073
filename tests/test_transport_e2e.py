"""Hostile clients against real servers: an id that cannot be echoed, a flood of
frames while the connection's request waits, and fan-out over TLS (daphne's ``ssl:``
endpoint) with direct writes on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
from websockets.asyncio.client import connect

from devtools.processes import OwnedProcess, free_port
from push.transport.consumers import PUBLISHES_IN_FLIGHT
from tests.servers import LOG_DIR, START_TIMEOUT_SECS, Database, ServerNode, publish_rest
from tests.waiting import QUERY_INTERVAL_SECS, lock_waiters, wait_until
from tests.wsclient import RECEIVE_TIMEOUT_SECS, open_ws, request, request_raw

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def node(request: pytest.FixtureRequest, e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    started = ServerNode(e2e_env, server=request.param, name=f"hostile-{request.param}").start()
    yield started
    started.stop()


async def test_a_lone_surrogate_id_is_refused_and_the_connection_stays_open(
    node: ServerNode, publisher_token: str
) -> None:
    """Before: the error reply echoed the id, its frame failed to encode and the
    connection was closed 1011 with a traceback in the log."""
    channel = f"sur-{uuid.uuid4().hex[:8]}"
    log_start = len(node.log())  # the log file outlives a run
    ws = await open_ws(node.ws_url, token=publisher_token)
    for kind in ("heartbeat", "subscribe", "publish"):
        frame = json.dumps({"type": kind, "channel": channel, "data": 1, "id": "\ud800"})
        reply = await request_raw(ws, frame)  # the \ud800 escape, in a text frame
        assert reply["type"] == "error" and reply["code"] == "INVALID_MESSAGE", reply
        assert "id" not in reply
    reply = await request(ws, {"type": "subscribe", "channel": channel, "id": "ok"})
    assert reply == {"type": "subscribed", "channel": channel, "seq": 0, "id": "ok"}
    await publish_rest(node, publisher_token, channel, {"s": "é"})
    message = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
    assert message["type"] == "message" and message["data"] == {"s": "é"}
    await ws.close()
    assert "Traceback" not in node.log()[log_start:]


# ----- a flood while the request waits -------------------------------------------------

FLOOD_FRAME_CHARS = 60_000
FLOOD_FRAMES = 1500  # ~90 MB, if nothing stops the client
FLOOD_SECS = 5.0
# What the node may grow by while the flood lasts: the bound (32 frames or 1 MiB) and
# the server's buffers, far from the ~90 MB an unbounded queue would hold.
MAX_RSS_GROWTH_BYTES = 24 * 1024 * 1024


@contextlib.contextmanager
def _channel_row_locked(database_url: str, channel: str) -> Iterator[None]:
    """Hold the channel's row lock, as a long transaction would: a publish to it waits."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT 1 FROM push_channel WHERE name = %s FOR UPDATE", (channel,))
        yield
        conn.rollback()


async def _flood(ws: object) -> int:
    """Send heartbeats with padding until FLOOD_FRAMES or FLOOD_SECS; frames sent."""
    frame = json.dumps({"type": "heartbeat", "pad": "x" * FLOOD_FRAME_CHARS})
    sent = 0

    async def send_all() -> None:
        nonlocal sent
        for _ in range(FLOOD_FRAMES):
            await ws.send(frame)  # type: ignore[attr-defined]  # ws: any websockets connection
            sent += 1

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(send_all(), FLOOD_SECS)
    return sent


async def test_a_flood_while_the_request_waits_does_not_grow_the_node(
    node: ServerNode, publisher_token: str, e2e_env: dict[str, str], e2e_database: Database
) -> None:
    channel = f"flood-in-{uuid.uuid4().hex[:8]}"
    await publish_rest(node, publisher_token, channel, "first")  # the row exists
    assert node.process is not None
    process = psutil.Process(node.process.pid)
    ws = await open_ws(node.ws_url, token=publisher_token)
    with _channel_row_locked(e2e_env["DATABASE_URL"], channel):
        # A connection keeps reading while its publishes commit, up to
        # PUBLISHES_IN_FLIGHT of them: one more, and its request waits on the lock.
        for number in range(2, PUBLISHES_IN_FLIGHT + 3):
            await ws.send(json.dumps({"type": "publish", "channel": channel, "data": number}))
        await wait_until(
            lambda: lock_waiters(e2e_database),
            "a publish waiting on the row lock",
            interval=QUERY_INTERVAL_SECS,
        )
        rss_before = process.memory_info().rss
        sent = await _flood(ws)
        # The point is a window: what the node took in of the flood shows in its memory.
        await asyncio.sleep(0.5)
        growth = process.memory_info().rss - rss_before
    assert sent < FLOOD_FRAMES, "the node read everything the client sent"
    assert growth < MAX_RSS_GROWTH_BYTES, f"grew {growth / 2**20:.0f} MiB for {sent} frames"
    # The lock is gone: the publish completes and the connection goes on.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        assert loop.time() < deadline
        reply = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_SECS))
        if reply["type"] == "published":
            assert reply["seq"] == 2  # the first publish, answered first, in order
            break
    ws.transport.abort()


# ----- TLS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_node(
    e2e_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """daphne on an ``ssl:`` endpoint with a self-signed certificate; its host:port."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    port = free_port()
    endpoint = f"ssl:port={port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    daphne = OwnedProcess(
        "tls-daphne",
        port,
        [sys.executable, "-m", "daphne", "-e", endpoint, "realtime_project.asgi:application"],
        LOG_DIR / "tls-daphne.log",
        lambda: _answers_healthy(f"https://127.0.0.1:{port}/health", cert),
        env={**e2e_env, "NODE_ID": "tls-daphne"},
        start_timeout_secs=START_TIMEOUT_SECS,
        dies_with_us=False,
        own_session=False,
    )
    daphne.start()
    try:
        yield f"127.0.0.1:{port}", cert
    finally:
        daphne.stop(signal.SIGTERM)


def _answers_healthy(url: str, cert: Path) -> bool:
    context = ssl.create_default_context(cafile=str(cert))
    try:
        return httpx.get(url, verify=context, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


async def test_fan_out_over_tls_arrives_intact(
    tls_node: tuple[str, Path], publisher_token: str
) -> None:
    """Direct writes are on by default: under TLS they must go through the TLS
    transport, never to the socket under it (a client would see garbage)."""
    address, cert = tls_node
    context = ssl.create_default_context(cafile=str(cert))
    url = f"wss://{address}/ws/"
    channel = f"tls-{uuid.uuid4().hex[:8]}"
    subscribers = [await connect(url, ssl=context, max_size=None) for _ in range(3)]
    for ws in subscribers:
        assert json.loads(await ws.recv())["type"] == "connection_established"
        assert (await request(ws, {"type": "subscribe", "channel": channel}))["seq"] == 0
    publisher = await connect(f"{url}?token={publisher_token}", ssl=context, max_size=None)
    await publisher.recv()
    sizes = [10, 200, 70_000, 5]  # both short and long frame headers
    for n, size in enumerate(sizes):
        data = {"n": n, "blob": "é" * size}
        reply = await request(publisher, {"type": "publish", "channel": channel, "data": data})
        assert reply["type"] == "published", reply
    for ws in subscribers:
        received = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in sizes]
        assert [m["seq"] for m in received] == [1, 2, 3, 4]
        assert [len(m["data"]["blob"]) for m in received] == sizes
        await ws.close()
    await publisher.close()
