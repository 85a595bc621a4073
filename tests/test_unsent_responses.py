"""One client address may have only so many bytes of HTTP responses unsent on a node,
under either server (``MAX_UNSENT_RESPONSE_BYTES_PER_PEER``, 32 MiB): a client that asks
for big history pages on many connections and reads none of them made the node hold
every page (daphne in Twisted's buffer, uvicorn in the application waiting to write
the rest), the sockets open. Clients bind addresses of their own in 127/8 (Linux routes
all of it to the loopback interface) and keep their receive buffers small, as a far
client's window fills: over loopback with the default buffers the kernel takes most of
a page."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import Database, ServerNode
from tests.waiting import QUERY_INTERVAL_SECS, wait_until

pytestmark = pytest.mark.e2e

CHANNEL = "unsent-pages"
# Four messages of 4 MB: one page of 16 MB (pages stop at PUSH_HISTORY_PAGE_MAX_BYTES,
# raised here so that a few connections pass the address's 32 MiB).
MESSAGE_BYTES = 4_000_000
MESSAGES = 4
PAGE_MAX_BYTES = 16 * 1_048_576
PATH = f"/api/v1/channels/{CHANNEL}/messages?limit=1000"
REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
# The kernel takes a few MB of each page at most: each connection left holds 12 MB or
# more on the node, so no more than this many fit in the 32 MiB.
CONNECTIONS = 10
MOST_KEPT = 3
ANSWER_SECS = 30.0


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def node(
    e2e_env: dict[str, str], e2e_database: Database, request: pytest.FixtureRequest
) -> Iterator[ServerNode]:
    _seed(e2e_database)
    env = {
        **e2e_env,
        "PUSH_HISTORY_PAGE_MAX_BYTES": str(PAGE_MAX_BYTES),
        # The bytes of history an address may read per second would let in only a few
        # pages: that budget is not what is tested here.
        "PUSH_ADDRESS_HISTORY_BYTES_PER_SEC": "0",
    }
    started = ServerNode(env, server=request.param, name=f"unsent-{request.param}").start()
    yield started
    started.stop()


def _seed(database: Database) -> None:
    """The channel's messages, written straight to the tables (once for the module's
    nodes): publishing them would take a body bigger than the REST limit."""
    database.query(
        "WITH c AS (INSERT INTO push_channel (name, last_seq, created_at)"
        " VALUES (%s, %s, now()) ON CONFLICT (name) DO UPDATE SET last_seq = %s RETURNING id)"
        " INSERT INTO push_message (channel_id, seq, message_id, data, created_at)"
        " SELECT c.id, n, gen_random_uuid(), '\"' || repeat('x', %s) || '\"', now()"
        " FROM c, generate_series(1, %s) AS n ON CONFLICT DO NOTHING RETURNING 1",
        CHANNEL,
        MESSAGES,
        MESSAGES,
        MESSAGE_BYTES,
        MESSAGES,
    )


def _dropped_count(node: ServerNode) -> float:
    body = httpx.get(f"{node.http_url}/metrics", timeout=ANSWER_SECS).text
    line = 'push_connections_refused_total{limit="response_bytes"} '
    return next((float(row[len(line) :]) for row in body.splitlines() if row.startswith(line)), 0)


def _asking(node: ServerNode, address: str) -> socket.socket:
    """A connection from ``address`` that asked for the page and reads nothing yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", node.port))
    sock.sendall(REQUEST)
    return sock


def _read_whole(sock: socket.socket) -> bool:
    """Read ``sock``'s answer: whether the whole page came (else the node dropped it)."""
    sock.settimeout(ANSWER_SECS)
    received = bytearray()
    try:
        while b"\r\n\r\n" not in received or len(received) < _answer_length(received):
            chunk = sock.recv(1 << 20)
            if not chunk:
                return False
            received += chunk
    except ConnectionResetError:
        return False
    finally:
        sock.close()
    return received.startswith(b"HTTP/1.1 200 ")


def _answer_length(received: bytes) -> int:
    head, _, _ = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return len(head) + 4 + length


async def _page(node: ServerNode, address: str) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(transport=transport, timeout=ANSWER_SECS) as http:
        return await http.get(f"{node.http_url}{PATH}")


async def test_one_address_holds_only_so_many_unsent_response_bytes(node: ServerNode) -> None:
    dropped_before = _dropped_count(node)
    readers = [_asking(node, "127.0.7.1") for _ in range(CONNECTIONS)]
    try:
        # Dropped as their pages are written, not after an idle timeout.
        await wait_until(
            lambda: _dropped_count(node) >= dropped_before + CONNECTIONS - MOST_KEPT,
            "the connections past the address's bytes dropped",
            timeout=ANSWER_SECS,
            interval=QUERY_INTERVAL_SECS,
        )
        # Another address reads the same page meanwhile, whole.
        other = await _page(node, "127.0.7.2")
        assert other.status_code == 200
        assert len(other.json()["results"]) == MESSAGES
    finally:
        whole = await asyncio.gather(*(asyncio.to_thread(_read_whole, s) for s in readers))
    # What the client sees: the others were cut off, the ones kept came whole.
    assert 1 <= sum(whole) <= MOST_KEPT
    assert _dropped_count(node) == dropped_before + CONNECTIONS - sum(whole)


async def test_a_client_reading_its_pages_is_never_dropped(node: ServerNode) -> None:
    dropped_before = _dropped_count(node)
    for _ in range(4):
        page = await _page(node, "127.0.7.3")
        assert page.status_code == 200
        assert len(page.json()["results"]) == MESSAGES
    # Two at once, each whole: 32 MB of the address's 32 MiB.
    pages = await asyncio.gather(*(_page(node, "127.0.7.3") for _ in range(2)))
    assert [len(p.json()["results"]) for p in pages] == [MESSAGES, MESSAGES]
    assert _dropped_count(node) == dropped_before
