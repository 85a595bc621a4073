"""REST on a real node: requests that wait on the database do not hold up the others,
and service tokens (back-ends) publish past the client rate limits that still bind users.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest

from tests.servers import Database, ServerNode, create_token, manage
from tests.waiting import QUERY_INTERVAL_SECS, lock_waiters, wait_until
from tests.wsclient import open_ws

pytestmark = pytest.mark.asyncio

WAIT_SECS = 20.0
# A user's REST budget on this node: small enough to exhaust in a test.
USER_REST_RATE_PER_MIN = 60


@pytest.fixture(scope="module")
def rest_node(e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    env = {
        **e2e_env,
        # The contract's client frame rate (e2e_env raises it for its bulk publishers).
        "PUSH_RATE_BURST": "100",
        "PUSH_RATE_PER_SEC": "50",
        "PUSH_REST_RATE": f"{USER_REST_RATE_PER_MIN}/min",
    }
    node = ServerNode(env, server="uvicorn", name="rest-async").start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def service_key(e2e_env: dict[str, str]) -> str:
    output = manage(e2e_env, "service_token", "create", "rest-backend", "--scope", "publish:*")
    return output.strip().splitlines()[-1]


@pytest.fixture
async def http(rest_node: ServerNode) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=rest_node.http_url, timeout=30, limits=limits) as client:
        yield client


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Token {key}"}


async def test_publishes_waiting_on_a_lock_do_not_hold_up_other_requests(
    http: httpx.AsyncClient, e2e_database: Database, e2e_env: dict[str, str]
) -> None:
    token = create_token(e2e_env, "rest-async-publisher")
    headers = _auth(token)
    created = await http.post("/api/v1/channels/held/messages", json={"data": 0}, headers=headers)
    assert created.status_code == 201, created.text
    for n in range(10):
        await http.post(f"/api/v1/channels/free-{n}/messages", json={"data": 0}, headers=headers)

    # Another transaction holds the channel's row lock, as a long publish would: the
    # seq upsert of every publish to it waits until that transaction ends.
    locker = psycopg.connect(e2e_database.url)
    try:
        locker.execute("SELECT 1 FROM push_channel WHERE name = 'held' FOR UPDATE")
        held = [
            asyncio.create_task(
                http.post("/api/v1/channels/held/messages", json={"data": n}, headers=headers)
            )
            for n in (1, 2, 3)
        ]
        await wait_until(
            lambda: lock_waiters(e2e_database),
            "a publish waiting on the channel's lock",
            timeout=WAIT_SECS,
            interval=QUERY_INTERVAL_SECS,
        )

        others = await asyncio.wait_for(
            asyncio.gather(
                *(
                    http.post(
                        f"/api/v1/channels/free-{n}/messages", json={"data": 1}, headers=headers
                    )
                    for n in range(10)
                ),
                *(http.get(f"/api/v1/channels/free-{n}/messages") for n in range(10)),
                http.post(
                    "/api/v1/messages",
                    json={"messages": [{"channel": "free-0", "data": 2}]},
                    headers=headers,
                ),
            ),
            WAIT_SECS,
        )
        assert [r.status_code for r in others] == [201] * 10 + [200] * 10 + [201]
        assert not any(task.done() for task in held), "the held publishes waited for the lock"
    finally:
        locker.rollback()
        locker.close()

    replies = await asyncio.wait_for(asyncio.gather(*held), WAIT_SECS)
    assert sorted(r.json()["seq"] for r in replies) == [2, 3, 4]
    assert all(r.status_code == 201 for r in replies)


async def _burst_ws(url: str, key: str) -> list[dict[str, object]]:
    """150 heartbeats and 20 publishes sent at once on one WebSocket, far above the
    client rate of 50 frames a second past its burst of 100; every reply, in order."""
    frames = [{"type": "heartbeat", "id": n} for n in range(150)]
    frames += [{"type": "publish", "channel": "burst", "data": n, "id": 150 + n} for n in range(20)]
    ws = await open_ws(url, token=key)
    try:
        for frame in frames:
            await ws.send(json.dumps(frame))
        replies = []
        while len(replies) < len(frames):
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), WAIT_SECS)))
        return replies
    finally:
        await ws.close()


async def test_a_service_token_is_not_held_to_the_client_frame_rate(
    rest_node: ServerNode, service_key: str, e2e_env: dict[str, str]
) -> None:
    replies = await _burst_ws(rest_node.ws_url, service_key)
    assert [r["type"] for r in replies] == ["heartbeat_ack"] * 150 + ["published"] * 20

    user = create_token(e2e_env, "rest-async-ws-user")
    replies = await _burst_ws(rest_node.ws_url, user)
    codes = [r.get("code") for r in replies if r["type"] == "error"]
    assert codes and set(codes) == {"RATE_LIMITED"}


async def test_a_service_token_is_not_held_to_the_rest_throttle(
    http: httpx.AsyncClient, service_key: str, e2e_env: dict[str, str]
) -> None:
    count = USER_REST_RATE_PER_MIN + 20

    async def publish_many(key: str) -> list[int]:
        statuses = []
        for n in range(count):
            response = await http.post(
                "/api/v1/channels/throttled/messages", json={"data": n}, headers=_auth(key)
            )
            statuses.append(response.status_code)
        return statuses

    assert await publish_many(service_key) == [201] * count
    user = create_token(e2e_env, "rest-async-rest-user")
    statuses = await publish_many(user)
    assert statuses[:USER_REST_RATE_PER_MIN] == [201] * USER_REST_RATE_PER_MIN
    assert set(statuses[USER_REST_RATE_PER_MIN:]) == {429}


async def test_a_batch_reaches_subscribers_in_seq_order(
    rest_node: ServerNode, http: httpx.AsyncClient, service_key: str
) -> None:
    ws = await open_ws(rest_node.ws_url)
    try:
        for channel in ("batch-a", "batch-b"):
            await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
        items = [{"channel": c, "data": n} for n, c in enumerate(["batch-a", "batch-b"] * 3)]
        response = await http.post(
            "/api/v1/messages", json={"messages": items}, headers=_auth(service_key)
        )
        assert response.status_code == 201, response.text
        received = [json.loads(await asyncio.wait_for(ws.recv(), WAIT_SECS)) for _ in items]
    finally:
        await ws.close()
    by_channel = {
        c: [(m["seq"], m["data"]) for m in received if m["channel"] == c]
        for c in ("batch-a", "batch-b")
    }
    assert by_channel == {"batch-a": [(1, 0), (2, 2), (3, 4)], "batch-b": [(1, 1), (2, 3), (3, 5)]}


async def test_a_kept_service_token_revoked_elsewhere_is_refused_on_its_next_request(
    http: httpx.AsyncClient, e2e_env: dict[str, str]
) -> None:
    """A back-end's token is kept by the node and checked on the event loop (no thread,
    no look-up): revoked from another process, its very next request is refused."""
    created = manage(e2e_env, "service_token", "create", "rest-revoked", "--scope", "publish:*")
    key = created.strip().splitlines()[-1]
    for n in range(3):  # the first is looked up, the others served from what was kept
        response = await http.post(
            "/api/v1/channels/kept/messages", json={"data": n}, headers=_auth(key)
        )
        assert response.status_code == 201, response.text
    manage(e2e_env, "service_token", "revoke", "rest-revoked")
    response = await http.post(
        "/api/v1/channels/kept/messages", json={"data": 3}, headers=_auth(key)
    )
    assert response.status_code == 401, response.text
