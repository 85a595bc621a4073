# ruff: noqa: F811  (node is a fixture imported from the client's tests)
"""``rewind``, ``latest`` and ``occupancy`` in the Python client: against a real node,
and the seam of a rewind the server holds fewer messages for, offline."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.servers import ServerNode, publish_rest
from tests.test_python_client import (
    PushClient,
    Subscription,
    channel_name,
    e2e,
    message,
    node,  # noqa: F401  # a fixture
    pushclient,
)
from tests.waiting import wait_until


async def test_a_rewind_the_server_holds_fewer_messages_for_starts_at_the_first() -> None:
    client = PushClient("ws://push.test/ws/")
    seen: list[int] = []
    gaps: list[Any] = []
    client.on("gap", gaps.append)
    ready = asyncio.get_running_loop().create_future()
    subscription = Subscription("news", lambda m: seen.append(m["seq"]), None, ready, rewind=20)
    client._subscriptions["news"] = subscription
    client._pending[1] = pushclient.client._Pending(future=None, subscription=subscription)
    client._on_subscribed({"type": "subscribed", "id": 1, "channel": "news", "seq": 10})
    for seq in (9, 10, 10, 11):
        await client._on_message(message(seq))
    assert (seen, gaps) == ([9, 10, 11], [])


@e2e
async def test_rewind_then_live_and_a_resubscribe_resumes_instead(
    node: ServerNode, publisher_token: str
) -> None:
    channel = channel_name("rewind")
    for i in range(8):
        await publish_rest(node, publisher_token, channel, {"n": i})
    received: list[int] = []
    async with PushClient(node.ws_url) as client:
        subscription = await client.subscribe(
            channel, lambda m: received.append(m["seq"]), rewind=3
        )
        assert subscription.seq == 8 and subscription.recovered is None
        await wait_until(lambda: received == [6, 7, 8], "the rewind")
        await publish_rest(node, publisher_token, channel, {"n": 8})
        await wait_until(lambda: received == [6, 7, 8, 9], "the live message")
        # What a reconnect sends for it: a resume from the last seq, not a rewind again.
        sent: list[dict[str, Any]] = []

        async def record(ws: Any, envelope: dict[str, Any]) -> None:
            sent.append(envelope)

        client._send = record  # type: ignore[method-assign]  # records instead of sending
        await client._send_subscribe(None, subscription)  # type: ignore[arg-type]  # no socket: _send records
        assert sent[0]["since"] == 9 and "rewind" not in sent[0]


@e2e
async def test_latest_hands_the_current_value_then_each_change(
    node: ServerNode, publisher_token: str
) -> None:
    channel = channel_name("latest")
    for price in (10, 11, 12):
        await publish_rest(node, publisher_token, channel, {"price": price})
    values: list[Any] = []
    async with PushClient(node.ws_url) as client:
        await client.latest(channel, lambda value, message: values.append(value))
        await wait_until(lambda: values == [{"price": 12}], "the latest value")
        await publish_rest(node, publisher_token, channel, {"price": 13})
        await wait_until(lambda: values == [{"price": 12}, {"price": 13}], "the change")
