"""A back-end's plain REST publish is answered without Django's middleware and DRF
(``push.api.fast_publish``): the answers must be the ones Django's path gives.

Every request goes to two real nodes sharing PostgreSQL and Redis, one with the fast
path (the default) and one with ``PUSH_REST_FAST_PUBLISH=0``, and their answers are
compared whole: status, headers, body (but for what differs by nature, the message's
seq, id and timestamp). Each node's ``push_rest_fast_publishes_total`` says which path
answered.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.servers import ServerNode, manage, start_together

pytestmark = pytest.mark.asyncio

FAST_COUNTER = "push_rest_fast_publishes_total"
# Headers that differ between any two answers, whoever sends them.
VARYING_HEADERS = {"date", "content-length"}
MAX_FRAME_BYTES = 1_048_576  # the default PUSH_MAX_FRAME_BYTES


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def nodes(
    e2e_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[tuple[ServerNode, ServerNode]]:
    server = request.param
    fast = ServerNode(e2e_env, server=server, name=f"fast-publish-{server}")
    django = ServerNode(
        {**e2e_env, "PUSH_REST_FAST_PUBLISH": "0"}, server=server, name=f"django-publish-{server}"
    )
    start_together([fast, django])
    yield fast, django
    fast.stop()
    django.stop()


@pytest.fixture(scope="module")
def service_key(e2e_env: dict[str, str]) -> str:
    name = f"fast-{uuid.uuid4().hex[:6]}"
    return _service_token(e2e_env, name, "publish,subscribe:*")


def _service_token(env: dict[str, str], name: str, *scopes: str) -> str:
    args = [arg for scope in scopes for arg in ("--scope", scope)]
    return manage(env, "service_token", "create", name, *args).strip().splitlines()[-1]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


class Pair:
    """Sends a request to both nodes and compares what they answer."""

    def __init__(self, nodes: tuple[ServerNode, ServerNode], http: httpx.AsyncClient) -> None:
        self.fast, self.django = nodes
        self.http = http

    async def warm(self, key: str) -> None:
        """The fast path serves a token its node verified a moment ago: verify it."""
        for node in (self.fast, self.django):
            answer = await self._send(node, "warm-up", json={"data": 0}, headers=_auth(key))
            assert answer.status_code == 201, answer.text

    async def send(
        self, channel: str | None, *, fast: bool, **request: Any
    ) -> tuple[httpx.Response, httpx.Response]:
        """The fast node's answer and Django's, asserting which path answered the first.
        ``channel`` None is the batch endpoint (see ``_send``)."""
        before = self.fast.metric(FAST_COUNTER)
        fast_answer = await self._send(self.fast, channel, **request)
        taken = self.fast.metric(FAST_COUNTER) - before
        assert taken == (1 if fast else 0), (channel, fast_answer.text)
        django_answer = await self._send(self.django, channel, **request)
        assert self.django.metric(FAST_COUNTER) == 0
        return fast_answer, django_answer

    async def same(self, channel: str | None, *, fast: bool, **request: Any) -> httpx.Response:
        """Both answers, alike but for a published message's channel (each node has
        its own: one node's publish would be the other's idempotent retry), seq, id and
        timestamp."""
        fast_answer, django_answer = await self.send(channel, fast=fast, **request)
        assert _comparable(fast_answer, self.fast) == _comparable(django_answer, self.django)
        return fast_answer

    async def _send(
        self,
        node: ServerNode,
        channel: str | None,
        *,
        batch: list[tuple[str, Any]] | None = None,
        key: str | None = None,
        **request: Any,
    ) -> httpx.Response:
        """A single publish on the node's own ``channel``, or with ``channel`` None a
        batch: ``batch`` gives its (channel, data) items, each on the node's own channel.
        ``key`` is an Idempotency-Key of the node's own."""
        if batch is not None:
            request["json"] = {
                "messages": [{"channel": _own(c, node), "data": data} for c, data in batch]
            }
        if key is not None:
            request["headers"] = {**request["headers"], "Idempotency-Key": _own(key, node)}
        path = (
            "/api/v1/messages"
            if channel is None
            else f"/api/v1/channels/{_own(channel, node)}/messages"
        )
        return await self.http.post(f"{node.http_url}{path}", **request)


def _own(channel: str, node: ServerNode) -> str:
    """The node's own channel of that name."""
    return f"{channel}-{node.name}"


@pytest.fixture
async def pair(
    nodes: tuple[ServerNode, ServerNode], http: httpx.AsyncClient, service_key: str
) -> Pair:
    checked = Pair(nodes, http)
    await checked.warm(service_key)
    return checked


def _auth(key: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Token {key}", **more}


def _comparable(answer: httpx.Response, node: ServerNode) -> tuple[int, list[tuple[str, str]], Any]:
    assert answer.headers.get("content-length", str(len(answer.content))) == str(
        len(answer.content)
    )
    # In the order sent: the fast path writes Django's answer byte for byte.
    headers = [
        (name, value) for name, value in answer.headers.multi_items() if name not in VARYING_HEADERS
    ]
    body: Any = answer.content.replace(node.name.encode(), b"NODE")
    if answer.headers.get("content-type") == "application/json":
        body = json.loads(body)
        if answer.status_code in (200, 201):
            for published in body.get("results", [body]):
                assert published.pop("channel").endswith("-NODE")
                assert isinstance(published.pop("seq"), int)
                assert isinstance(published.pop("message_id"), str)
                assert isinstance(published.pop("timestamp"), float)
    return answer.status_code, headers, body


async def test_a_plain_publish_is_answered_as_django_answers_it(
    pair: Pair, service_key: str
) -> None:
    data = {"text": "h\u00e9llo \u2028 \U0001f600", "n": [1, 2.5, None, True]}
    answer = await pair.same(
        "fast-plain", fast=True, json={"data": data}, headers=_auth(service_key)
    )
    assert answer.status_code == 201
    history = await pair.http.get(
        f"{pair.fast.http_url}/api/v1/channels/{_own('fast-plain', pair.fast)}/messages",
        params={"since": answer.json()["seq"] - 1, "limit": 1},
        headers=_auth(service_key),
    )
    assert [m["data"] for m in history.json()["results"]] == [data]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json; charset=UTF-8"},
        {"Content-Type": "application/json;charset=utf-8"},
        {"Accept": "application/json"},
        {"Accept": "application/json, text/plain, */*"},
    ],
    ids=["charset", "charset-tight", "accept-json", "accept-axios"],
)
async def test_json_however_it_is_named_takes_the_fast_path(
    pair: Pair, service_key: str, headers: dict[str, str]
) -> None:
    headers = {"Content-Type": "application/json", **headers}
    await pair.same(
        "fast-named", fast=True, content=b'{"data": 1}', headers=_auth(service_key, **headers)
    )


async def test_a_chunked_body_is_published_by_django(pair: Pair, service_key: str) -> None:
    # Without Content-Length the fast path leaves the body to Django, whose handler
    # gives it the length it read (push.api.handler): DRF then reads it.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"data": '
        yield b'"in two parts"}'

    headers = _auth(service_key, **{"Content-Type": "application/json"})
    before = pair.fast.metric(FAST_COUNTER)
    for node in (pair.fast, pair.django):
        answer = await pair._send(node, "fast-chunked", content=chunks(), headers=headers)
        assert answer.status_code == 201, answer.text
    assert pair.fast.metric(FAST_COUNTER) == before


async def test_an_idempotent_retry_is_answered_with_the_first_result(
    pair: Pair, service_key: str
) -> None:
    headers = _auth(service_key, **{"Idempotency-Key": f"key-{uuid.uuid4()}"})
    first = await pair.same("fast-idem", fast=True, json={"data": 1}, headers=headers)
    again = await pair.same("fast-idem", fast=True, json={"data": 1}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"not json", 400),
        (b'{"dat": 1}', 400),
        (b"[1]", 400),
        (b'{"data": NaN}', 400),
        (b'{"data": "\xff"}', 400),
        (b"\xef\xbb\xbf" + b'{"data": 1}', 400),
        (b'{"data": "' + b"x" * MAX_FRAME_BYTES + b'"}', 413),
        # Python's json reads 1e400 as infinity, which DRF's JSONField refuses in its
        # own words before the service could.
        (b'{"data": [1, -1e400]}', 400),
        # Deeper than the contract's 64: Django's parser, deeper in the stack, gives up
        # on it ("nested too deeply") before the service could refuse it.
        (b'{"data": ' + b"[" * 990 + b"]" * 990 + b"}", 400),
    ],
    ids=[
        "not-json",
        "no-data",
        "not-object",
        "nan",
        "not-utf8",
        "bom",
        "too-large",
        "overflow",
        "deep",
    ],
)
async def test_a_body_django_refuses_is_refused_by_django(
    pair: Pair, service_key: str, content: bytes, status: int
) -> None:
    headers = _auth(service_key, **{"Content-Type": "application/json"})
    answer = await pair.same("fast-refused", fast=False, content=content, headers=headers)
    assert answer.status_code == status


@pytest.mark.parametrize(
    ("channel", "extra", "status"),
    [
        ("bad name!", {}, 400),
        ("fast-key", {"headers": {"Idempotency-Key": "k" * 256}}, 400),
        ("fast-indent", {"headers": {"Accept": "application/json; indent=4"}}, 201),
        ("fast-unknown", {"headers": {"Authorization": "Token svc_unknown"}}, 401),
        ("fast-bearer", {"headers": {"Authorization": "Bearer x"}}, 401),
        ("fast-host", {"headers": {"Host": "evil.example"}}, 400),
        ("fast-format", {"params": {"format": "json"}}, 201),
        ("fast-no-type", {"headers": {"Content-Type": "text/plain"}}, 415),
    ],
    ids=["channel", "key", "indent", "unknown", "bearer", "host", "query", "not-json"],
)
async def test_requests_the_fast_path_does_not_mirror_go_to_django(
    pair: Pair, service_key: str, channel: str, extra: dict[str, Any], status: int
) -> None:
    more = {name: value for name, value in extra.items() if name != "headers"}
    headers = {**_auth(service_key), "Content-Type": "application/json", **extra.get("headers", {})}
    answer = await pair.same(channel, fast=False, content=b'{"data": 1}', headers=headers, **more)
    assert answer.status_code == status


async def test_the_browsable_api_is_django_s(pair: Pair, service_key: str) -> None:
    # Its page holds a CSRF token of its own: the status and the type match.
    fast_answer, django_answer = await pair.send(
        "fast-html", fast=False, json={"data": 1}, headers=_auth(service_key, Accept="text/html")
    )
    assert fast_answer.status_code == django_answer.status_code == 201
    assert fast_answer.headers["content-type"] == django_answer.headers["content-type"]


async def test_a_header_sent_twice_goes_to_django(pair: Pair, service_key: str) -> None:
    headers = [
        ("Authorization", f"Token {service_key}"),
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "one"),
        ("Idempotency-Key", "two"),
    ]
    answer = await pair.same("fast-twice", fast=False, content=b'{"data": 1}', headers=headers)
    assert answer.status_code == 201


async def test_a_refused_channel_is_refused_by_django(pair: Pair, e2e_env: dict[str, str]) -> None:
    key = _service_token(e2e_env, f"narrow-{uuid.uuid4().hex[:6]}", "publish:narrow-*")
    await pair.same("narrow-ok", fast=False, json={"data": 1}, headers=_auth(key))  # kept now
    await pair.same("narrow-ok", fast=True, json={"data": 1}, headers=_auth(key))
    answer = await pair.same("elsewhere", fast=False, json={"data": 1}, headers=_auth(key))
    assert answer.status_code == 403


async def test_a_client_that_left_before_its_answer_publishes_nothing(
    pair: Pair, service_key: str
) -> None:
    # Django's handler cancels the view of a client that left (it listens for the
    # disconnect while the view runs), before anything is published: a back-end that
    # sends a publish and closes at once has published nothing, on the fast path too.
    body = b'{"data": "unanswered"}'
    for node in (pair.fast, pair.django):
        request = (
            f"POST /api/v1/channels/{_own('fast-left', node)}/messages HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Token {service_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", node.port)) as sock:
                # Corked, the request and the close leave in one segment: the node
                # reads that the client left as it reads the request, not later.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                sock.sendall(request)
    await asyncio.sleep(1)  # what the nodes would have published is committed by now
    answer = await pair.same("fast-left", fast=True, json={"data": 1}, headers=_auth(service_key))
    assert answer.json()["seq"] == 1, "a publish nobody was answered for was stored"
    history = await pair.http.get(
        f"{pair.django.http_url}/api/v1/channels/{_own('fast-left', pair.django)}/messages",
        headers=_auth(service_key),
    )
    assert [m["data"] for m in history.json()["results"]] == [1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_made_up_keys_of_any_length_are_not_kept(pair: Pair) -> None:
    # Every key a request names is looked up by its digest (the fast path's check, then
    # DRF's authentication); the last few thousand are kept with their digests. Made-up
    # keys of 15 KB each (under daphne's line limit) were kept whole: ~25 MB for these.
    node = pair.fast
    assert node.process is not None
    body = b'{"data": 1}'
    requests = [
        (
            f"POST /api/v1/channels/fast-made-up/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token svc_{n:06d}{'A' * 15_000}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for n in range(2_000)
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        # The first few hundred make what any refusal makes once (measured: ~9 MB under
        # daphne); the node is measured from there.
        for n, request in enumerate(requests):
            if n == 300:
                before = _rss_mb(node.process.pid)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 401 "), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.close()
    assert _rss_mb(node.process.pid) - before < 10, "made-up keys were kept"


async def test_a_revoked_token_is_refused_at_once(pair: Pair, e2e_env: dict[str, str]) -> None:
    name = f"revoked-{uuid.uuid4().hex[:6]}"
    key = _service_token(e2e_env, name, "publish:*")
    await pair.same("fast-revoke", fast=False, json={"data": 1}, headers=_auth(key))
    await pair.same("fast-revoke", fast=True, json={"data": 1}, headers=_auth(key))
    manage(e2e_env, "service_token", "revoke", name)
    answer = await pair.same("fast-revoke", fast=False, json={"data": 1}, headers=_auth(key))
    assert answer.status_code == 401


async def test_a_service_token_with_a_rate_of_its_own_is_throttled_by_drf(
    e2e_env: dict[str, str], service_key: str, http: httpx.AsyncClient
) -> None:
    node = ServerNode(
        {**e2e_env, "PUSH_REST_SERVICE_RATE": "3/min"}, server="uvicorn", name="fast-throttled"
    ).start()
    try:
        url = f"{node.http_url}/api/v1/channels/fast-throttled/messages"
        answers = [
            await http.post(url, json={"data": n}, headers=_auth(service_key)) for n in range(4)
        ]
        assert [a.status_code for a in answers] == [201, 201, 201, 429]
        assert node.metric(FAST_COUNTER) == 0
    finally:
        node.stop()


async def test_concurrent_fast_publishes_are_each_stored_once_in_order(
    pair: Pair, service_key: str
) -> None:
    channel = f"fast-many-{uuid.uuid4().hex[:6]}"
    url = f"{pair.fast.http_url}/api/v1/channels/{channel}/messages"
    answers = await asyncio.gather(
        *(pair.http.post(url, json={"data": n}, headers=_auth(service_key)) for n in range(200))
    )
    assert {a.status_code for a in answers} == {201}
    seqs = sorted(a.json()["seq"] for a in answers)
    assert seqs == list(range(1, 201))
    history = await pair.http.get(
        url, params={"since": 0, "limit": 500}, headers=_auth(service_key)
    )
    stored = history.json()["results"]
    assert [m["seq"] for m in stored] == seqs
    by_seq = {a.json()["seq"]: a.json()["message_id"] for a in answers}
    assert all(by_seq[m["seq"]] == m["message_id"] for m in stored)


async def test_a_plain_batch_is_answered_as_django_answers_it(pair: Pair, service_key: str) -> None:
    items = [("fast-batch-a", {"n": 1}), ("fast-batch-b", None), ("fast-batch-a", [2, "\u00e9"])]
    answer = await pair.same(None, fast=True, batch=items, headers=_auth(service_key))
    assert answer.status_code == 201
    results = answer.json()["results"]
    assert [r["channel"] for r in results] == [_own(c, pair.fast) for c, _ in items]
    assert results[2]["seq"] == results[0]["seq"] + 1


async def test_an_idempotent_batch_retry_is_answered_with_the_first_result(
    pair: Pair, service_key: str
) -> None:
    items = [("fast-batch-idem", 1), ("fast-batch-idem", 2)]
    key = f"batch-{uuid.uuid4()}"
    request = {"batch": items, "key": key, "headers": _auth(service_key)}
    first = await pair.same(None, fast=True, **request)
    again = await pair.same(None, fast=True, **request)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"messages": []}', 400),
        (
            b'{"messages": [{"channel": "fast-b", "data": 1}, '
            b'{"channel": "bad name!", "data": 1}]}',
            400,
        ),
        (b'{"messages": [{"channel": "fast-b"}]}', 400),
        (b'{"messages": [1]}', 400),
        (
            b'{"messages": '
            + b"["
            + b",".join([b'{"channel": "fast-b", "data": 1}'] * 1001)
            + b"]}",
            413,
        ),
        (b'{"messages": [{"channel": "fast-b", "data": NaN}]}', 400),
    ],
    ids=["empty", "bad-channel", "no-data", "not-object", "too-many", "nan"],
)
async def test_a_batch_django_refuses_is_refused_by_django(
    pair: Pair, service_key: str, content: bytes, status: int
) -> None:
    headers = _auth(service_key, **{"Content-Type": "application/json"})
    answer = await pair.same(None, fast=False, content=content, headers=headers)
    assert answer.status_code == status


async def test_a_batch_with_a_refused_channel_is_refused_by_django(
    pair: Pair, e2e_env: dict[str, str]
) -> None:
    key = _service_token(e2e_env, f"narrow-batch-{uuid.uuid4().hex[:6]}", "publish:narrow-*")
    await pair.same(None, fast=False, batch=[("narrow-b", 1)], headers=_auth(key))  # kept now
    await pair.same(None, fast=True, batch=[("narrow-b", 1)], headers=_auth(key))
    answer = await pair.same(
        None, fast=False, batch=[("narrow-b", 1), ("elsewhere", 2)], headers=_auth(key)
    )
    assert (answer.status_code, answer.json()["index"]) == (403, 1)
