"""Delta compression (``subscribe`` with ``delta: "fossil"``) on real nodes: publishers on
one node, subscribers on the other, in every wire format; plain and delta subscribers
on one channel; subscribers that join mid-stream or resume; and the Python client,
which applies deltas for its handler and recovers from a wrong base."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import uuid
from typing import Any

import fossil_delta
import pytest

from tests.servers import ROOT, ServerNode, publish_rest
from tests.test_python_client import FAST, PushClient
from tests.test_wire_formats_e2e import FORMATS, FormatClient
from tests.waiting import wait_until

from pushclient.delta import DeltaMismatch, apply_delta, data_text  # isort: skip

e2e = pytest.mark.e2e


def board(seq: int) -> dict[str, Any]:
    """A 5 KB state of which a few fields change per message."""
    rows = [{"id": i, "name": f"instrument {i}", "bid": 100 + i, "ask": 101 + i} for i in range(80)]
    rows[seq % 80]["bid"] = 1000 + seq
    # A float without a fraction: its JSON text is 101.0, which JavaScript's own
    # JSON.stringify would write as 101 (the clients must rebuild the server's text).
    return {"version": seq, "updated": f"t{seq}", "price": 100.0 + seq, "rows": rows}


class DeltaReader:
    """The client's side of delta by hand: the base is the last message's data text."""

    def __init__(self, client: FormatClient) -> None:
        self.client = client
        self.base: tuple[int, str] | None = None
        self.received: list[tuple[int, Any, bool]] = []

    async def subscribe(self, channel: str, **options: Any) -> dict[str, Any]:
        reply = await self.client.request(
            {"type": "subscribe", "channel": channel, "delta": "fossil", **options}
        )
        assert reply["type"] == "subscribed" and reply["delta"] == "fossil", reply
        return reply

    async def read(self, count: int) -> list[tuple[int, Any, bool]]:
        while len(self.received) < count:
            message = await self.client.recv()
            if message["type"] != "message":
                continue
            if message.get("delta"):
                assert "data" not in message
                assert self.base is not None and self.base[0] == message["seq"] - 1
                text = apply_delta(self.base[1], message["data_delta"])
            else:
                text = data_text(message["data"])
            self.base = (message["seq"], text)
            self.received.append((message["seq"], json.loads(text), bool(message.get("delta"))))
        return self.received


async def publish_boards(node: ServerNode, token: str, channel: str, seqs: range) -> None:
    for seq in seqs:
        assert await publish_rest(node, token, channel, board(seq)) == seq


@e2e
@pytest.mark.parametrize("subprotocol", FORMATS)
async def test_delta_and_plain_subscribers_in_every_format(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str, subprotocol: str
) -> None:
    node_a, node_b = two_nodes
    channel = f"delta-{uuid.uuid4().hex[:8]}"
    early = DeltaReader(await FormatClient.open(node_a.ws_url, subprotocol))
    plain = await FormatClient.open(node_a.ws_url, subprotocol)
    await early.subscribe(channel)
    reply = await plain.request({"type": "subscribe", "channel": channel, "delta": "vcdiff"})
    assert "delta" not in reply  # an algorithm the server does not know: not agreed
    await publish_boards(node_b, publisher_token, channel, range(1, 4))
    assert await early.read(3) == [(1, board(1), False), (2, board(2), True), (3, board(3), True)]
    # Mid-stream: the first message after subscribe is full, then deltas.
    late = DeltaReader(await FormatClient.open(node_a.ws_url, subprotocol))
    await late.subscribe(channel)
    # Resume from seq 1: seqs 2 and 3 replayed in full, then deltas from seq 3 on.
    resumed = DeltaReader(await FormatClient.open(node_a.ws_url, subprotocol))
    assert (await resumed.subscribe(channel, since=1))["recovered"] is True
    await publish_boards(node_b, publisher_token, channel, range(4, 6))
    assert await early.read(5) == [(seq, board(seq), seq > 1) for seq in range(1, 6)]
    assert await late.read(2) == [(4, board(4), False), (5, board(5), True)]
    assert await resumed.read(4) == [(seq, board(seq), seq > 3) for seq in range(2, 6)]
    messages = [await plain.recv() for _ in range(5)]
    assert all("data" in m and "delta" not in m for m in messages)
    assert [m["data"] for m in messages] == [board(seq) for seq in range(1, 6)]
    for client in (early.client, plain, late.client, resumed.client):
        await client.ws.close()


@e2e
async def test_a_gap_breaks_the_chain_and_the_next_message_is_full(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str
) -> None:
    """A subscriber that unsubscribes and comes back without ``since`` missed messages:
    the server starts its deltas again from a full message."""
    node_a, node_b = two_nodes
    channel = f"delta-gap-{uuid.uuid4().hex[:8]}"
    reader = DeltaReader(await FormatClient.open(node_a.ws_url, "v1.json"))
    # Stays subscribed on node_a: once it has seq 4, so has the node.
    watcher = DeltaReader(await FormatClient.open(node_a.ws_url, "v1.json"))
    await reader.subscribe(channel)
    await watcher.subscribe(channel)
    await publish_boards(node_b, publisher_token, channel, range(1, 3))
    await reader.read(2)
    assert (await reader.client.request({"type": "unsubscribe", "channel": channel}))[
        "type"
    ] == "unsubscribed"
    await publish_boards(node_b, publisher_token, channel, range(3, 5))
    await watcher.read(4)  # seqs 3 and 4 crossed to node_a before the resubscribe
    await reader.subscribe(channel)
    await publish_boards(node_b, publisher_token, channel, range(5, 7))
    assert [(seq, d) for seq, _, d in await reader.read(4)] == [
        (1, False),
        (2, True),
        (5, False),
        (6, True),
    ]
    await reader.client.ws.close()
    await watcher.client.ws.close()


@e2e
@pytest.mark.parametrize("format", ["json", "msgpack"])
async def test_the_python_client_applies_deltas_and_resubscribes_on_a_wrong_base(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str, format: str
) -> None:
    node_a, node_b = two_nodes
    channel = f"delta-py-{uuid.uuid4().hex[:8]}"
    received: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    frames: list[bool] = []
    client = PushClient(node_a.ws_url, format=format, **FAST)
    client.on("error", errors.append)
    async with client:
        subscription = await client.subscribe(channel, received.append, delta=True)
        assert subscription.delta_agreed
        original = client._undelta

        def spy(sub: Any, message: dict[str, Any]) -> dict[str, Any] | None:
            frames.append(bool(message.get("delta")))
            return original(sub, message)

        client._undelta = spy  # type: ignore[method-assign]  # a spy in place of the method
        await publish_boards(node_b, publisher_token, channel, range(1, 4))
        await wait_until(lambda: len(received) == 3, "three messages")
        assert frames == [False, True, True]
        # A base that is not the server's: the checksum catches it, nothing wrong is
        # delivered, and a resubscription from the last good seq brings it back in full.
        assert subscription.base is not None
        seq, text = subscription.base
        subscription.base = (seq, text.replace('"bid":', '"bad":', 1))
        await publish_boards(node_b, publisher_token, channel, range(4, 7))
        await wait_until(lambda: len(received) == 6, "every message")
        await publish_boards(node_b, publisher_token, channel, range(7, 8))
        await wait_until(lambda: len(received) == 7, "one more")
    assert [m["seq"] for m in received] == list(range(1, 8))
    assert [m["data"] for m in received] == [board(seq) for seq in range(1, 8)]
    assert all("data_delta" not in m and "delta" not in m for m in received)
    assert [e["code"] for e in errors] == ["DELTA_MISMATCH"]
    # After the resubscription, deltas again (seq 7 follows the replayed 6 or a live one).
    assert frames[-1] is True and subscription.delta


def test_a_wrong_base_is_refused_by_the_checksum() -> None:
    base, changed = data_text(board(1)), data_text(board(2))
    delta = base64.b64encode(fossil_delta.create_delta(base.encode(), changed.encode())).decode()
    assert apply_delta(base, delta) == changed
    # Same length, one byte different: fossil's own apply would return wrong data.
    wrong = base.replace("instrument 5", "instrument X", 1)
    assert wrong != base and len(wrong) == len(base)
    with pytest.raises(DeltaMismatch):
        apply_delta(wrong, delta)
    with pytest.raises(DeltaMismatch):
        apply_delta(base[:-1], delta)


# ----- the JavaScript client in Node, against a real node -------------------------------

NODE_SUBSCRIBER = ROOT / "clients" / "js" / "test" / "live" / "delta_subscriber.mjs"


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js 20+ (apt-get install -y nodejs)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    # Node 22 has a global WebSocket; 20 and 21 behind this flag.
    return [node] if major >= 22 else [node, "--experimental-websocket"]


@e2e
@pytest.mark.parametrize("format", ["json", "msgpack"])
async def test_the_javascript_client_in_node_applies_deltas_and_recovers_from_a_wrong_base(
    two_nodes: tuple[ServerNode, ServerNode], publisher_token: str, format: str
) -> None:
    node_a, node_b = two_nodes
    channel = f"delta-js-{uuid.uuid4().hex[:8]}"
    process = await asyncio.create_subprocess_exec(
        *node_command(),
        str(NODE_SUBSCRIBER),
        node_a.ws_url,
        channel,
        "8",
        format,
        "corrupt-after",
        "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    first = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
    assert first == {"subscribed": 0, "agreed": True}
    await publish_boards(node_b, publisher_token, channel, range(1, 9))
    out, err = await asyncio.wait_for(process.communicate(), 40)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert process.returncode == 0, (lines, err.decode()[-2000:])
    delivered = [line for line in lines if "seq" in line]
    assert [line["seq"] for line in delivered] == list(range(1, 9))
    assert [line["data"] for line in delivered] == [board(seq) for seq in range(1, 9)]
    assert [line["error"] for line in lines if "error" in line] == ["DELTA_MISMATCH"]
    frames = [(line["frame"], line["delta"]) for line in lines if "frame" in line]
    # Deltas from seq 2; the one after the corruption refused, then deltas again
    # after the full messages the resubscription brings back.
    assert frames[:3] == [(1, False), (2, True), (3, True)]
    assert frames[3] == (4, True) and (8, True) in frames
