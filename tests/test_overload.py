"""Overload as clients see it (push/cluster/overload.py): while the node's event loop
lags, new anonymous streams and REST requests are refused cheaply, and signed-in
clients go on (that anonymous connections already open do too is tested against the
loop itself in push/tests/test_overload.py).

The node here counts a lag of 1 ms as overload, holds it for ten minutes and admits
nobody meanwhile, so any request's own work puts it there and it stays for the test."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.servers import ServerNode, create_token
from tests.sseclient import sse_url

pytestmark = pytest.mark.e2e

TIMEOUT_SECS = 10.0
HANDSHAKE_BURST = 10
BUDGET_REFUSALS = re.compile(
    r'^push_address_budget_refusals_total\{budget="handshakes"\} (\S+)$', re.M
)


@pytest.fixture(scope="module")
def overload_env(e2e_env: dict[str, str]) -> dict[str, str]:
    return {
        **e2e_env,
        "PUSH_OVERLOAD_LAG_MS": "1",
        "PUSH_OVERLOAD_HOLD_SECS": "600",
        "PUSH_OVERLOAD_ADMIT_PER_SEC": "0",
        "PUSH_ADDRESS_HANDSHAKE_BURST": str(HANDSHAKE_BURST),
        "PUSH_ADDRESS_HANDSHAKE_PER_SEC": "1",
    }


@pytest.fixture(scope="module")
def overloaded_node(overload_env: dict[str, str]) -> Iterator[ServerNode]:
    node = ServerNode(overload_env, name="overloaded").start()
    yield node
    node.stop()


async def wait_until_shedding(http: httpx.AsyncClient) -> httpx.Response:
    """Anonymous reads until one is refused for overload; that refusal."""
    async with asyncio.timeout(TIMEOUT_SECS):
        while True:
            response = await http.get("/api/v1/channels/overload/messages")
            if response.status_code == 503:
                return response
            assert response.status_code == 200
            await asyncio.sleep(0.05)


async def test_an_overloaded_node_refuses_new_anonymous_work_and_serves_the_rest(
    overloaded_node: ServerNode, overload_env: dict[str, str]
) -> None:
    key = create_token(overload_env, "overload-user")
    async with httpx.AsyncClient(base_url=overloaded_node.http_url, timeout=TIMEOUT_SECS) as http:
        refused = await wait_until_shedding(http)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["code"] == "UNAVAILABLE"

        # New anonymous streams: WebSocket closed 1013, SSE 503, before any work.
        ws = await connect(overloaded_node.ws_url, open_timeout=TIMEOUT_SECS)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), TIMEOUT_SECS)
        assert ws.close_code == 1013
        async with http.stream("GET", sse_url("", ["overload"])) as sse:
            assert sse.status_code == 503
            assert sse.headers["retry-after"] == "1"
            assert json.loads(await sse.aread())["code"] == "UNAVAILABLE"

        # A signed-in client connects and subscribes, and gets what is published.
        user = await connect(f"{overloaded_node.ws_url}?token={key}", open_timeout=TIMEOUT_SECS)
        assert json.loads(await user.recv())["type"] == "connection_established"
        await user.send(json.dumps({"type": "subscribe", "channel": "overload"}))
        assert json.loads(await user.recv())["type"] == "subscribed"
        published = await http.post(
            "/api/v1/channels/overload/messages",
            json={"data": {"n": 1}},
            headers={"Authorization": f"Token {key}"},
        )
        assert published.status_code == 201
        message = json.loads(await asyncio.wait_for(user.recv(), TIMEOUT_SECS))
        assert message["type"] == "message" and message["data"] == {"n": 1}

        metrics = (await http.get("/metrics")).text
        for kind in ("rest", "websocket", "sse"):
            assert f'push_overload_refusals_total{{kind="{kind}"}}' in metrics
        await user.close()


async def test_the_address_budget_is_taken_before_the_node_sheds(
    overloaded_node: ServerNode,
) -> None:
    """So an address past its handshake budget is counted there while the node is
    overloaded too, and a shed handshake still spends its address's budget."""
    async with httpx.AsyncClient(base_url=overloaded_node.http_url, timeout=TIMEOUT_SECS) as http:
        await wait_until_shedding(http)
        for _ in range(HANDSHAKE_BURST + 5):
            ws = await connect(
                overloaded_node.ws_url, local_addr=("127.0.3.1", 0), open_timeout=TIMEOUT_SECS
            )
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT_SECS)
            assert ws.close_code == 1013
        (refused,) = BUDGET_REFUSALS.findall((await http.get("/metrics")).text)
        assert float(refused) >= 1
