"""Signed subscription tokens with the JavaScript client in Node against a real node
(``clients/js/test/live/token_subscriber.mjs``): a private channel subscribed with a
token provider that mints tokens as an app's back-end does; after a dropped connection
the provider is asked again and the resume loses and repeats nothing, while a slow
back-end holds the resubscribe; tokens refreshed before their ``exp`` keep the
subscription past it without the server ever ending it; a provider that fails is asked
again after a backoff, and fails a first subscribe; a frame lost on the way is read
back from the REST history with a fresh token; a token string's ``exp`` ends the
subscription for good, which the client tells once as ``ended``. On the SSE fallback
alone the same: the stream carries the token, and at each ``exp`` a new stream with a
fresh token resumes the channel with every seq once; a string's ``exp`` ends it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from tests.servers import ROOT, SUBSCRIPTION_TOKEN_SECRET, ServerNode, publish_rest
from tests.test_context_js_e2e import NodeSubscriber
from tests.test_delta_e2e import node_command

pytestmark = pytest.mark.e2e

TOKEN_SUBSCRIBER = ROOT / "clients" / "js" / "test" / "live" / "token_subscriber.mjs"
# Short-lived tokens, refreshed half-way: every 2 s.
TTL_SECS = 4


class TokenSubscriber(NodeSubscriber):
    @classmethod
    async def start(cls, url: str, channel: str, *args: str) -> TokenSubscriber:
        process = await asyncio.create_subprocess_exec(
            *node_command(),
            str(TOKEN_SUBSCRIBER),
            url,
            channel,
            SUBSCRIPTION_TOKEN_SECRET,
            str(TTL_SECS),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()

    def count(self, key: str) -> int:
        """How many lines so far have ``key``."""
        return sum(1 for line in self.lines if key in line)


def private_channel() -> str:
    return f"private-tokens-js-{uuid.uuid4().hex[:8]}"


async def test_the_javascript_client_resumes_refreshes_and_retries_with_a_token_provider(
    token_node: ServerNode, publisher_token: str
) -> None:
    channel = private_channel()
    script = await TokenSubscriber.start(token_node.ws_url, channel)

    async def publish(data: Any) -> int:
        return await publish_rest(token_node, publisher_token, channel, data)

    async def delivered(seq: int) -> None:
        await script.until(f"seq {seq}", lambda line: line.get("seq") == seq)

    assert await script.until("the subscribe", lambda line: "subscribed" in line) == {
        "subscribed": 0
    }
    for i in range(3):
        last = await publish(i)
    await delivered(last)

    # A dropped connection while the back-end is slow: what is published meanwhile
    # reaches the client only through the resume, from its last seq.
    await script.tell("hold")
    await script.tell("drop")
    await script.until("the provider asked again", lambda line: line.get("provider") == 2)
    for i in range(3):
        last = await publish(f"missed {i}")
    await script.tell("release")
    await delivered(last)

    # Past the current token's exp (and the node's check after it): refreshed in time,
    # the subscription is never ended.
    until = time.time() + TTL_SECS + 1.5
    while time.time() < until:
        last = await publish("live")
        await asyncio.sleep(0.1)
    await delivered(last)
    refreshes = script.count("provider") - 2

    # The back-end fails twice after a reconnect: asked again after backoff delays.
    await script.tell("fail 2")
    await script.tell("drop")
    await script.until("the failures", lambda line: script.count("event") == 2)
    last = await publish("after the failures")
    await delivered(last)

    lines = await script.finish()
    assert [line["seq"] for line in lines if "seq" in line] == list(range(1, last + 1))
    assert refreshes >= 2, lines
    assert [line for line in lines if "ended" in line or "told_ended" in line] == []
    assert [line["code"] for line in lines if "event" in line] == ["TOKEN_PROVIDER_FAILED"] * 2


async def test_the_javascript_client_fails_a_first_subscribe_whose_provider_fails(
    token_node: ServerNode,
) -> None:
    script = await TokenSubscriber.start(token_node.ws_url, private_channel(), "fail-first")
    await script.until("the refusal", lambda line: "rejected" in line)
    lines = await script.finish()
    assert {"rejected": "TOKEN_PROVIDER_FAILED"} in lines
    assert [line for line in lines if "seq" in line or "event" in line] == []


async def test_the_javascript_client_reads_a_gap_back_with_its_token_provider(
    token_node: ServerNode, publisher_token: str
) -> None:
    """A channel the client holds only by token (it has no credential of its own): a
    lost frame is read back from the REST history with a fresh token, nothing lost."""
    channel = private_channel()
    script = await TokenSubscriber.start(token_node.ws_url, channel)
    await script.until("the subscribe", lambda line: "subscribed" in line)
    await script.tell("lose 2")
    await script.until("the loss planned", lambda line: line.get("losing") == 2)
    for i in range(3):
        last = await publish_rest(token_node, publisher_token, channel, i)
    await script.until(f"seq {last}", lambda line: line.get("seq") == last)
    lines = await script.finish()
    assert {"lost": 2} in lines
    assert [line["gap"] for line in lines if "gap" in line] == [[2, 2]]
    assert [line["seq"] for line in lines if "seq" in line] == [1, 2, 3]
    assert [line for line in lines if "event" in line or "unrecovered" in line] == []
    # The subscribe's token, then a fresh one for the history read.
    assert script.count("provider") == 2


async def _ended_at_a_token_strings_exp(
    token_node: ServerNode, publisher_token: str, channel: str, *flags: str
) -> tuple[TokenSubscriber, int, dict[str, Any]]:
    """The script subscribed with a token string, a message delivered before its
    ``exp``, and the ``ended`` it tells at the ``exp``: the script, the message's seq and
    that line."""
    script = await TokenSubscriber.start(token_node.ws_url, channel, "string", *flags)
    await script.until("the subscribe", lambda line: "subscribed" in line)
    before = await publish_rest(token_node, publisher_token, channel, "before the exp")
    await script.until(f"seq {before}", lambda line: line.get("seq") == before)
    ended = await script.until("the end", lambda line: "told_ended" in line)
    assert ended["told_ended"]["channel"] == channel
    assert ended["told_ended"]["code"] == "FORBIDDEN"
    assert "expired" in ended["told_ended"]["message"]
    return script, before, ended


async def test_the_javascript_client_tells_ended_once_when_a_token_strings_exp_ends_it(
    token_node: ServerNode, publisher_token: str
) -> None:
    """A token string cannot be refreshed: at its ``exp`` the node ends the subscription,
    and the client emits ``error`` then ``ended`` naming the channel, once, and asks for
    the channel no more, not even after a reconnect."""
    channel = private_channel()
    script, before, ended = await _ended_at_a_token_strings_exp(
        token_node, publisher_token, channel
    )

    # Reconnected, the client does not subscribe the channel again: what is published
    # now does not reach it, and nothing more is told.
    await script.tell("drop")
    await script.until("the reconnect", lambda line: line.get("opened") == 2)
    await publish_rest(token_node, publisher_token, channel, "after the end")
    await asyncio.sleep(TTL_SECS / 2)
    lines = await script.finish()
    assert [line["seq"] for line in lines if "seq" in line] == [before]
    assert [line for line in lines if "told_ended" in line] == [ended]
    assert [line["code"] for line in lines if "event" in line] == ["FORBIDDEN"]


async def test_the_javascript_clients_sse_fallback_carries_tokens_and_outlives_their_exp(
    token_node: ServerNode, publisher_token: str
) -> None:
    """On the SSE fallback alone (Node, an EventSource over fetch): the stream carries a
    fresh token from the provider; the node ends the channel at each token's ``exp`` and
    the client opens a new stream with a fresh token and its cursor, while messages are
    published all along: every seq once, in order, and nothing told the application."""
    channel = private_channel()
    script = await TokenSubscriber.start(token_node.ws_url, channel, "sse")
    assert await script.until("the subscribe", lambda line: "subscribed" in line) == {
        "subscribed": None
    }
    published = []
    deadline = time.monotonic() + 2.5 * TTL_SECS  # past two ends
    while time.monotonic() < deadline:
        published.append(await publish_rest(token_node, publisher_token, channel, len(published)))
        await asyncio.sleep(0.1)
    await script.until(f"seq {published[-1]}", lambda line: line.get("seq") == published[-1])
    lines = await script.finish()
    assert [line["seq"] for line in lines if "seq" in line] == published
    assert published == list(range(1, len(published) + 1))
    assert script.count("ended") >= 2  # the node ended it at each exp (told only there)
    assert script.count("provider") == script.count("stream") >= 3
    assert [line for line in lines if "event" in line or "told_ended" in line] == []
    # No stream was lost on the way: each was replaced by the client.
    states = [line["state"] for line in lines if "state" in line]
    assert states == ["connecting", "sse", "disconnected"]


async def test_the_javascript_clients_sse_fallback_ends_a_token_strings_channel_at_exp(
    token_node: ServerNode, publisher_token: str
) -> None:
    channel = private_channel()
    script, before, _ended = await _ended_at_a_token_strings_exp(
        token_node, publisher_token, channel, "sse"
    )
    await publish_rest(token_node, publisher_token, channel, "after the end")
    await asyncio.sleep(1)
    lines = await script.finish()
    assert [line["seq"] for line in lines if "seq" in line] == [before]
    assert [line["code"] for line in lines if "event" in line] == ["FORBIDDEN"]
    assert script.count("stream") == 1
