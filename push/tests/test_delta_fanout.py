"""Delta compression in the hub (``delta: "fossil"``): one delta per message, one frame
per wire format, only to subscribers that were sent the message before; everyone else
gets full data. Driven with the in-memory history of test_hub."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import fossil_delta
import pytest

from push.fanout import delta as delta_module
from push.fanout import hub as hub_module
from push.fanout.message import ChannelMessage
from push.tests.test_hub import FakeClient, MemoryHistory, make_hub, until_seqs
from push.wire import protocol
from push.wire.codecs import CODECS

JSON, MSGPACK, PROTOBUF = CODECS["v1.json"], CODECS["v1.msgpack"], CODECS["v1.protobuf"]


def state(seq: int, size: int = 2000) -> dict[str, Any]:
    """A big state of which one field changes per message."""
    return {"seq": seq, "price": 100 + seq, "rows": ["x" * 50 + str(i) for i in range(size // 50)]}


def state_message(channel: str, seq: int, data: Any = None) -> ChannelMessage:
    return ChannelMessage(
        channel=channel,
        seq=seq,
        message_id=f"00000000-0000-0000-0000-{seq:012d}",
        data_json=json.dumps(state(seq) if data is None else data, separators=(",", ":")),
        timestamp=time.time(),
    )


def applied(messages: list[dict[str, Any]]) -> list[tuple[int, Any, bool]]:
    """The client's view: (seq, data, came as a delta), deltas applied in turn."""
    base: str | None = None
    out = []
    for message in messages:
        if message.get("type") != "message":
            continue
        if message.get("delta"):
            assert base is not None
            raw = fossil_delta.apply_delta(
                base.encode(), base64.b64decode(message["data_delta"])
            ).decode()
            assert "data" not in message
        else:
            raw = json.dumps(message["data"], separators=(",", ":"))
        base = raw
        out.append((message["seq"], json.loads(raw), bool(message.get("delta"))))
    return out


@pytest.fixture
def delta_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = delta_module.fossil_delta_text

    def counting(base: str, data: str) -> str | None:
        calls.append(1)
        return real(base, data)

    monkeypatch.setattr(hub_module, "fossil_delta_text", counting)
    return calls


async def test_delta_once_per_message_for_every_format_and_plain_subscribers_unaffected(
    delta_calls: list[int],
) -> None:
    hub, _ = await make_hub(MemoryHistory())
    clients = [FakeClient(codec) for codec in (JSON, JSON, MSGPACK, PROTOBUF)]
    plain = FakeClient(JSON)
    for client in clients:
        await hub.subscribe(client, "board", since=None, reply=client.reply, delta=True)
    await hub.subscribe(plain, "board", since=None, reply=plain.reply)
    for seq in (1, 2, 3, 4):
        hub.deliver(state_message("board", seq))
    for client in [*clients, plain]:
        await until_seqs(client, [1, 2, 3, 4])
    # The first message after subscribe is full, the others deltas; one delta each.
    assert len(delta_calls) == 3
    for client in clients:
        view = applied(client.sent)
        assert view == [(seq, state(seq), seq > 1) for seq in (1, 2, 3, 4)]
    assert all("data" in m and "delta" not in m for m in plain.sent)
    # Shared frames: the JSON delta frame of seq 2 is the same bytes for both JSON clients.
    assert clients[0].payloads[1] == clients[1].payloads[1]
    assert len(clients[0].payloads[1]) * 5 < len(plain.payloads[1])


async def test_no_delta_is_computed_without_a_delta_subscriber(delta_calls: list[int]) -> None:
    hub, _ = await make_hub(MemoryHistory())
    client = FakeClient()
    subscription = await hub.subscribe(client, "board", since=None, reply=client.reply, delta=True)
    hub.deliver(state_message("board", 1))
    hub.unsubscribe(subscription)
    assert hub.channels["board"].deltas is None
    other = FakeClient()
    await hub.subscribe(other, "board", since=None, reply=other.reply)
    for seq in (2, 3):
        hub.deliver(state_message("board", seq))
    await until_seqs(other, [2, 3])
    assert delta_calls == [] and other.seqs() == [2, 3]


async def test_a_subscriber_that_joins_mid_stream_gets_full_data_first() -> None:
    hub, _ = await make_hub(MemoryHistory())
    early, late = FakeClient(), FakeClient()
    await hub.subscribe(early, "board", since=None, reply=early.reply, delta=True)
    hub.deliver(state_message("board", 1))
    hub.deliver(state_message("board", 2))
    await hub.subscribe(late, "board", since=None, reply=late.reply, delta=True)
    hub.deliver(state_message("board", 3))
    hub.deliver(state_message("board", 4))
    await until_seqs(early, [1, 2, 3, 4])
    await until_seqs(late, [3, 4])
    assert [d for _, _, d in applied(early.sent)] == [False, True, True, True]
    assert applied(late.sent) == [(3, state(3), False), (4, state(4), True)]


async def test_a_resume_replays_full_data_then_deltas_from_the_last_replayed() -> None:
    history = MemoryHistory()
    hub, _ = await make_hub(history)
    watcher = FakeClient()
    await hub.subscribe(watcher, "board", since=None, reply=watcher.reply)
    for seq in (1, 2, 3):
        hub.deliver(state_message("board", seq))
    resumed = FakeClient(MSGPACK)
    await hub.subscribe(resumed, "board", since=1, reply=resumed.reply, delta=True)
    hub.deliver(state_message("board", 4))
    await until_seqs(resumed, [2, 3, 4])
    assert applied(resumed.sent) == [
        (2, state(2), False),
        (3, state(3), False),
        (4, state(4), True),
    ]


async def test_after_a_gap_the_next_message_is_full() -> None:
    hub, _ = await make_hub(MemoryHistory())
    client = FakeClient(PROTOBUF)
    await hub.subscribe(client, "board", since=None, reply=client.reply, delta=True)
    hub.deliver(state_message("board", 1))
    hub.deliver(state_message("board", 2))
    hub_channel = hub.channels["board"]
    # Retention took 3 and 4 away: the hub moves on past them (as _skip_trimmed_gap does).
    hub_channel.delivered_seq = 4
    hub_channel.recent.clear()
    hub.deliver(state_message("board", 5))
    hub.deliver(state_message("board", 6))
    await until_seqs(client, [1, 2, 5, 6])
    assert [(seq, d) for seq, _, d in applied(client.sent)] == [
        (1, False),
        (2, True),
        (5, False),
        (6, True),
    ]


async def test_a_delta_not_smaller_than_the_data_is_sent_as_full_data() -> None:
    hub, _ = await make_hub(MemoryHistory())
    client = FakeClient()
    await hub.subscribe(client, "board", since=None, reply=client.reply, delta=True)
    for seq, data in ((1, {"a": "x"}), (2, {"b": "y"}), (3, {"b": "y", "c": "z" * 400})):
        hub.deliver(state_message("board", seq, data))
    hub.deliver(state_message("board", 4, {"b": "y", "c": "z" * 400, "d": 1}))
    await until_seqs(client, [1, 2, 3, 4])
    assert [(seq, d) for seq, _, d in applied(client.sent)] == [
        (1, False),
        (2, False),
        (3, False),
        (4, True),
    ]


async def test_data_past_the_delta_bound_goes_in_full_without_a_delta_computed(
    delta_calls: list[int],
) -> None:
    """A fossil delta of data that repeats little (random digits, base64) costs the loop
    up to 250 tries per byte: seconds for 1 MiB, one message stalling every connection
    of the node. Past ``DELTA_MAX_BYTES`` (its base's data or its own) a message goes
    in full; below it, deltas go on."""
    hub, _ = await make_hub(MemoryHistory())
    client = FakeClient()
    await hub.subscribe(client, "board", since=None, reply=client.reply, delta=True)
    small, large = delta_module.DELTA_MAX_BYTES - 100, delta_module.DELTA_MAX_BYTES + 1
    sizes = {1: small, 2: small, 3: large, 4: large, 5: small, 6: small}
    for seq, size in sizes.items():
        data = {"seq": seq, "pad": "x" * (size - len('{"seq":1,"pad":""}'))}
        message = state_message("board", seq, data)
        assert message.data_bytes == size
        hub.deliver(message)
    await until_seqs(client, list(sizes))
    assert [(seq, d) for seq, _, d in applied(client.sent)] == [
        (1, False),
        (2, True),
        (3, False),  # its own data is past the bound
        (4, False),
        (5, False),  # its base's is
        (6, True),
    ]
    assert len(delta_calls) == 2


@pytest.mark.parametrize("codec", [JSON, MSGPACK, PROTOBUF], ids=lambda c: c.name)
def test_a_delta_message_round_trips_in_every_format(codec: Any) -> None:
    message = state_message("board", 7)
    envelope = delta_module.delta_envelope(message, "AbC=")
    decoded = codec.decode(codec.encode(envelope))
    assert decoded == envelope
    assert "data" not in decoded
    full = codec.decode(codec.encode_message(message))
    assert "delta" not in full and "data_delta" not in full and full["data"] == state(7)


@pytest.mark.parametrize("codec", [JSON, MSGPACK, PROTOBUF], ids=lambda c: c.name)
def test_subscribed_repeats_the_agreed_delta(codec: Any) -> None:
    reply = protocol.subscribed(channel="b", seq=3, recovered=None, request_id=1, delta="fossil")
    assert codec.decode(codec.encode(reply))["delta"] == "fossil"
    plain = protocol.subscribed(channel="b", seq=3, recovered=None, request_id=1)
    assert "delta" not in codec.decode(codec.encode(plain))


async def test_delta_is_agreed_for_fossil_only_and_never_on_drop_oldest_channels() -> None:
    from types import SimpleNamespace

    from push.services.subscriptions import subscription_delta

    hub, _ = await make_hub(MemoryHistory(), drop_oldest_patterns=["ticker:*"])
    node: Any = SimpleNamespace(hub=hub)
    connection: Any = SimpleNamespace(subscriptions={})
    assert subscription_delta(node, connection, "board", "fossil") == "fossil"
    assert subscription_delta(node, connection, "board", "vcdiff") is None
    assert subscription_delta(node, connection, "board", None) is None
    assert subscription_delta(node, connection, "ticker:eur", "fossil") is None
    # Subscribing again keeps what the subscription has.
    client = FakeClient()
    connection.subscriptions["board"] = await hub.subscribe(
        client, "board", since=None, reply=client.reply
    )
    assert subscription_delta(node, connection, "board", "fossil") is None
