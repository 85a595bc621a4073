"""No request line and headers past a bound are read, under either server: a request's
head is read before the application sees the request, so no limit of ours could refuse
it. uvicorn's httptools protocol has no bound of its own
(``push.transport.server_adapters.bounded_head_httptools_protocol`` adds one); daphne's
Twisted refuses long lines and many headers itself. Neither server bounds how long a
head may take or how many one address leaves unfinished
(``push.transport.server_adapters.bound_daphne_request_heads`` does for daphne). Sent
over a raw socket, as a client that never finishes its head would."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from push.transport.server_adapters import (
    MAX_CONTENT_TYPE_BYTES,
    MAX_INCOMPLETE_HEADS_PER_PEER,
    MAX_REQUEST_HEAD_BYTES,
    MAX_REQUEST_HEADERS,
)
from tests.servers import ServerNode

pytestmark = pytest.mark.e2e

# What the attacker sends at most; without the bound it was all read (60 MB of short
# header lines grew the node by ~800 MB).
SENT_BYTES = 16 * 1_048_576
CHUNK = 64 * 1024
ANSWER_SECS = 10.0
# A connection refused is closed at once; one taken stays open this long and more.
REFUSAL_SECS = 3.0
# The node's RSS may grow by this much while it refuses one such head.
GROWTH_BOUND_MB = 20
REFUSED_UNFINISHED_HEADS = 'push_connections_refused_total{limit="unfinished_heads"}'


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def node(e2e_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[ServerNode]:
    started = ServerNode(e2e_env, server=request.param, name=f"heads-{request.param}").start()
    yield started
    started.stop()


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def _send_head(port: int, start: bytes, filler: bytes) -> tuple[int, bytes]:
    """Send ``start`` then ``filler`` until SENT_BYTES or the node stops taking them;
    (bytes sent, what the node answered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_SECS) as sock:
        sent = 0
        try:
            sock.sendall(start)
            while sent < SENT_BYTES:
                sock.sendall(filler)
                sent += len(filler)
        except OSError:
            pass  # the node closed: what it answered is read below
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    return sent, answer


HEADS = {
    # Many short header lines: the costliest per byte (a Python tuple for each).
    "many headers": (b"GET /api/v1/channels/ HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-A: b\r\n"),
    "one long header": (b"GET /api/v1/channels/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ", b"a"),
    "a long URL": (b"GET /api/v1/channels/?x=", b"a"),
}


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_a_head_past_the_bound_is_refused_unread(node: ServerNode, kind: str) -> None:
    start, unit = HEADS[kind]
    filler = unit * (CHUNK // len(unit))
    assert node.process is not None
    before = _rss_mb(node.process.pid)
    started = time.monotonic()
    sent, answer = _send_head(node.port, start, filler)
    grown = _rss_mb(node.process.pid) - before
    assert sent < SENT_BYTES, f"the node read all {sent:,} bytes of one request's head"
    assert time.monotonic() - started < ANSWER_SECS
    assert grown < GROWTH_BOUND_MB, f"the node grew by {grown} MB"
    if node.server == "uvicorn":
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_a_head_within_the_bound_is_served(node: ServerNode) -> None:
    """Near the bound, in fields and in bytes (a long SSE cursor, a big cookie)."""
    headers = {f"X-Field-{n}": "v" for n in range(MAX_REQUEST_HEADERS - 10)}
    headers["X-Long"] = "a" * (MAX_REQUEST_HEAD_BYTES // 2)
    # Within Twisted's own line bound (16 KiB) for daphne.
    if node.server == "daphne":
        headers["X-Long"] = "a" * 8000
    answer = httpx.get(f"{node.http_url}/health", headers=headers, timeout=ANSWER_SECS)
    assert answer.status_code == 200


WEBSOCKET_HANDSHAKE = (
    "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.mark.parametrize(
    "kind, request_line, header, status",
    [
        ("a long URL", "GET /ws/?x=" + "a" * 12_000 + " HTTP/1.1", "", b"414"),
        ("a long header", "GET /ws/ HTTP/1.1", "X-Big: " + "a" * 12_000 + "\r\n", b"431"),
    ],
)
def test_a_websocket_handshake_past_what_the_server_parses_is_answered(
    node: ServerNode, kind: str, request_line: str, header: str, status: bytes
) -> None:
    """Within the node's bound on heads, past what the WebSocket handshake's own parser
    takes (websockets under uvicorn: 8 KiB a line): uvicorn held such a connection open
    unanswered for good. daphne's Twisted takes lines of up to 16 KiB, and autobahn
    parses the handshake after it: there it goes on to the application."""
    head = f"{request_line}\r\n{WEBSOCKET_HANDSHAKE}{header}\r\n".encode()
    with socket.create_connection(("127.0.0.1", node.port), timeout=ANSWER_SECS) as sock:
        sock.sendall(head)
        answer = sock.recv(4096)
        if node.server == "uvicorn":
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
            assert sock.recv(4096) == b"", "the connection was left open"
        else:
            assert answer.startswith(b"HTTP/1.1 101 "), answer[:200]


@pytest.mark.parametrize(
    "header",
    [
        "Sec-WebSocket-Protocol: " + "," * 1100 + "v1.json\r\n",
        "Sec-WebSocket-Extensions: " + ";" * 1100 + "\r\n",
        # Sent twice, 1,200 bytes together.
        "Sec-WebSocket-Protocol: v1.json"
        + "," * 600
        + "\r\nSec-WebSocket-Protocol: "
        + "," * 600
        + "v1.json\r\n",
    ],
)
def test_a_handshake_with_long_negotiation_headers_is_refused_before_they_are_parsed(
    node: ServerNode, header: str
) -> None:
    """The WebSocket libraries parse a handshake's subprotocols and extensions as lists,
    before the application can refuse it: past 1 KiB each, the server refuses it."""
    head = f"GET /ws/ HTTP/1.1\r\n{WEBSOCKET_HANDSHAKE}{header}\r\n".encode()
    with socket.create_connection(("127.0.0.1", node.port), timeout=ANSWER_SECS) as sock:
        sock.sendall(head)
        answer = sock.recv(4096)
    expected = b"431" if node.server == "uvicorn" else b"400"  # daphne: Twisted's own
    assert answer.startswith(b"HTTP/1.1 " + expected + b" "), answer[:200]


def test_a_handshake_with_negotiation_headers_within_their_bound_is_let_in(
    node: ServerNode,
) -> None:
    header = (
        "Sec-WebSocket-Protocol: " + "".join(f"x{i}, " for i in range(180)) + "v1.json\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
        + "".join(f", x{i}" for i in range(150))
        + "\r\n"
    )
    head = f"GET /ws/ HTTP/1.1\r\n{WEBSOCKET_HANDSHAKE}{header}\r\n".encode()
    with socket.create_connection(("127.0.0.1", node.port), timeout=ANSWER_SECS) as sock:
        sock.sendall(head)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101 "), answer[:200]
    assert b"v1.json" in answer.split(b"\r\n\r\n", 1)[0], "its subprotocol chosen"


def test_requests_that_do_not_parse_fill_no_log(node: ServerNode) -> None:
    """uvicorn logs a warning for every request it cannot parse, as fast as a client
    sends them: the node lets one through per interval, saying how many it left out."""
    before = node.log().count("Invalid HTTP request received.")
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", node.port), timeout=ANSWER_SECS) as sock:
            sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    time.sleep(0.5)  # the node's log written
    assert node.log().count("Invalid HTTP request received.") - before <= 1


def test_a_content_type_past_its_bound_is_refused_before_django_parses_it(
    node: ServerNode,
) -> None:
    """Django parses a request's content type and its parameters as it makes the
    request, and DRF again (60 KB of parameters: 52 ms of CPU per anonymous request)."""
    content_type = "application/json" + "; a=b" * 300
    assert len(content_type) > MAX_CONTENT_TYPE_BYTES
    answer = httpx.post(
        f"{node.http_url}/api/v1/channels/heads/messages",
        content=b'{"data": 1}',
        headers={"Content-Type": content_type},
        timeout=ANSWER_SECS,
    )
    assert answer.status_code == 415
    assert answer.json()["code"] == "INVALID_MESSAGE"
    assert str(MAX_CONTENT_TYPE_BYTES) in answer.json()["message"]


def _publish_head(token: str, channel: str, body: bytes) -> bytes:
    """The head of a REST publish of ``body`` to ``channel``."""
    return (
        f"POST /api/v1/channels/{channel}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()


def test_a_big_body_in_the_same_read_as_its_head_is_no_part_of_the_head(
    node: ServerNode, publisher_token: str
) -> None:
    """A publish of ~1 MiB sent in one write: the reads that end its head carry its
    body, which the bound on heads must not count."""
    body = b'{"data": "' + b"a" * 1_000_000 + b'"}'
    head = _publish_head(publisher_token, "heads", body)
    with socket.create_connection(("127.0.0.1", node.port), timeout=ANSWER_SECS) as sock:
        sock.sendall(head + body)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]


def test_one_address_may_hold_only_so_many_unfinished_heads(node: ServerNode) -> None:
    """Each head is bounded, but an address holding many unfinished at once held ~93 MB
    with 1,500 of 60 KiB under uvicorn, ~90 MB with 1,000 of 500 headers under daphne;
    past the bound a new connection of that address is closed at once, and another
    address is served as usual."""
    refused_before = node.metric(REFUSED_UNFINISHED_HEADS)
    held = []
    try:
        for _ in range(MAX_INCOMPLETE_HEADS_PER_PEER):
            sock = socket.create_connection(("127.0.0.1", node.port), timeout=ANSWER_SECS)
            sock.sendall(b"GET /health?x=" + b"a" * 1000)
            held.append(sock)
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", node.port), timeout=ANSWER_SECS) as sock:
            sock.settimeout(REFUSAL_SECS)
            answer_bytes: bytes | None
            try:
                sock.sendall(b"GET /health?x=")
                answer_bytes = sock.recv(100)
            except ConnectionResetError:  # closed with what it sent unread
                answer_bytes = b""
            except TimeoutError:  # still open, waiting for the rest of its head
                answer_bytes = None
            assert answer_bytes == b"", "one more unfinished head was taken"
        elsewhere = httpx.HTTPTransport(local_address="127.0.2.1")
        with httpx.Client(transport=elsewhere, timeout=ANSWER_SECS) as client:
            assert client.get(f"{node.http_url}/health").status_code == 200
            metrics = client.get(f"{node.http_url}/metrics").text
        assert f"{REFUSED_UNFINISHED_HEADS} {refused_before + 1}" in metrics
    finally:
        for sock in held:
            sock.close()


# A small deadline for a head, so these tests are short; the default is tens of seconds.
DEADLINE_SECS = 2.0
# A trickled byte every this long: the node sees the client active all the while.
TRICKLE_SECS = 0.2
DROPPED_SLOW_HEADS = 'push_connections_refused_total{limit="head_deadline"}'
GET = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def quick_node(e2e_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[ServerNode]:
    env = {**e2e_env, "PUSH_REQUEST_HEAD_DEADLINE_SECS": str(DEADLINE_SECS)}
    started = ServerNode(env, server=request.param, name=f"head-deadline-{request.param}")
    yield started.start()
    started.stop()


def _served(sock: socket.socket) -> bool:
    """Whether a GET /health on ``sock`` is answered 200, its body read whole (so the
    connection can be kept alive for another)."""
    sock.settimeout(ANSWER_SECS)
    sock.sendall(GET)
    answer = b""
    while b"\r\n\r\n" not in answer:
        more = sock.recv(4096)
        if not more:
            return False
        answer += more
    head, body = answer.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        more = sock.recv(4096)
        if not more:
            return False
        body += more
    return head.startswith(b"HTTP/1.1 200 ")


def _trickle_until_closed(sock: socket.socket, head: bytes, within_secs: float) -> float | None:
    """Send ``head`` a byte at a time, every TRICKLE_SECS, never finishing it; the
    seconds until the node closed the connection (None: still open ``within_secs``
    later). A normal request on another connection of the same address is served
    meanwhile."""
    started = time.monotonic()
    other_served: bool | None = None
    sock.settimeout(TRICKLE_SECS)
    for byte in head:
        elapsed = time.monotonic() - started
        if elapsed > within_secs:
            return None
        if other_served is None and elapsed > DEADLINE_SECS / 2:
            with socket.create_connection(sock.getpeername(), timeout=ANSWER_SECS) as other:
                other_served = _served(other)
            assert other_served, "a normal request was not served while a head trickled"
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(100) == b"":
                return time.monotonic() - started
            raise AssertionError("the node answered an unfinished head")
        except TimeoutError:
            continue  # nothing from the node: the head is still open
        except ConnectionError:
            return time.monotonic() - started
    raise AssertionError("the trickled head ran out before any deadline")


# A head that would never finish: its header value goes on and on.
ENDLESS_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000


@pytest.mark.parametrize("after_a_request", [False, True], ids=["first-head", "later-head"])
def test_a_head_trickled_byte_by_byte_is_dropped_at_its_deadline(
    quick_node: ServerNode, after_a_request: bool
) -> None:
    """Each byte keeps the connection active, which reset daphne's only timeout (its
    idle one, 60 s): a head trickled a byte every 5 s was still open after 100 s. Now
    it is closed, unanswered, once the deadline has passed since it began (the
    accept for a connection's first request, its first byte for a later one)."""
    dropped_before = quick_node.metric(DROPPED_SLOW_HEADS)
    with socket.create_connection(("127.0.0.1", quick_node.port), timeout=ANSWER_SECS) as sock:
        if after_a_request:
            assert _served(sock)
        closed_after = _trickle_until_closed(sock, ENDLESS_HEAD, within_secs=DEADLINE_SECS * 4)
    assert closed_after is not None, "the trickled head was never closed"
    # (TRICKLE_SECS late at most: the client looks between its bytes.)
    assert DEADLINE_SECS - TRICKLE_SECS < closed_after < DEADLINE_SECS + 1.0, closed_after
    assert quick_node.metric(DROPPED_SLOW_HEADS) == dropped_before + 1


def test_an_idle_kept_alive_connection_and_a_slow_body_are_not_heads(
    quick_node: ServerNode, publisher_token: str
) -> None:
    """A connection idle between requests for longer than the head deadline (within
    the server's keep-alive timeout) is served again, and a publish whose body comes a
    byte at a time over longer than the deadline is published."""
    with socket.create_connection(("127.0.0.1", quick_node.port), timeout=ANSWER_SECS) as sock:
        assert _served(sock)
        time.sleep(DEADLINE_SECS + 1.0)
        assert _served(sock), "an idle kept-alive connection was closed"
    body = b'{"data": "' + b"a" * 10 + b'"}'
    head = _publish_head(publisher_token, "slow-body", body)
    with socket.create_connection(("127.0.0.1", quick_node.port), timeout=ANSWER_SECS) as sock:
        sock.sendall(head)
        pause = (DEADLINE_SECS * 1.5) / len(body)
        for byte in body:
            time.sleep(pause)
            sock.sendall(bytes([byte]))
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]
