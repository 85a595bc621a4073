"""What the frames an application never sees cost a node: fragments of a message that
never ends and pings are parsed (and pings answered) by the server's WebSocket library,
below the consumer's rate limit and the address's frame budget, which count messages."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Iterator

import pytest

from tests.servers import ServerNode
from tests.test_frame_reader import _frame

pytestmark = pytest.mark.e2e

# The attacker sends for this long at most, in batches of this many frames.
SEND_SECS = 3.0
BATCH = 2000
# What one anonymous connection may cost the node's CPU in that time: a frame flood of
# whole messages is closed 1008 after PUSH_RATE_LIMIT_CLOSE_AFTER refused ones, within
# milliseconds.
CPU_BOUND_SECS = 0.5


@pytest.fixture(scope="module")
def node(e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    # The default settings (rate and budgets on), as an attacker meets them.
    env = {
        key: value
        for key, value in e2e_env.items()
        if not key.startswith("PUSH_ADDRESS_")
        and key not in ("PUSH_RATE_BURST", "PUSH_RATE_PER_SEC")
    }
    started = ServerNode(env, server="uvicorn", name="control-frames").start()
    yield started
    started.stop()


def _cpu_secs(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _flood(port: int, first: bytes, unit: bytes) -> tuple[int, bool]:
    """Open an anonymous WebSocket, send ``first`` then ``unit`` over and over for
    SEND_SECS; (frames sent, whether the node closed the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")

    async def read_until_closed() -> None:
        while await reader.read(65536):
            pass

    closed = asyncio.ensure_future(read_until_closed())
    writer.write(first)
    sent = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < SEND_SECS and not closed.done():
            writer.write(unit * BATCH)
            sent += BATCH
            await writer.drain()
    except ConnectionError:
        pass
    await asyncio.sleep(0.2)
    was_closed = closed.done()
    closed.cancel()
    writer.close()
    return sent, was_closed


FLOODS = {
    # A text message begun and never finished: every fragment empty, so no size limit
    # is ever reached, and the consumer never sees a message to count.
    "empty fragments": (_frame(b"{", fin=False), _frame(b"", opcode=0x0, fin=False)),
    # Answered with a pong each, by the server.
    "pings": (b"", _frame(b"p" * 125, opcode=0x9)),
}


@pytest.mark.xfail(
    strict=True,
    reason="fragments and pings are parsed by the server's WebSocket library below every "
    "rate limit and budget, which count messages: one anonymous connection kept a node's "
    "loop busy (4.4-4.8 s of CPU in 4 s, uvicorn and daphne alike) and was never closed; "
    "see the audit report for the fix",
)
@pytest.mark.parametrize("kind", sorted(FLOODS))
async def test_frames_the_consumer_never_sees_are_bounded_too(node: ServerNode, kind: str) -> None:
    assert node.process is not None
    before = _cpu_secs(node.process.pid)
    sent, closed = await _flood(node.port, *FLOODS[kind])
    spent = _cpu_secs(node.process.pid) - before
    assert closed or spent < CPU_BOUND_SECS, (
        f"{sent:,} {kind} cost {spent:.1f} s of CPU and the connection stayed open"
    )
