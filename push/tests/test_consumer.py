"""The WebSocket contract, frame by frame, for every wire format."""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from typing import Any

import msgpack
import pytest
from django.test import override_settings

from common.errors import CloseCode
from push.cluster.node import Node
from push.tests.wsclient import (
    WIRE_FORMATS,
    WsClient,
    communicator_for,
    connected_client,
    open_client,
)
from push.wire.codecs import Codec, UnencodableEnvelope

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]


async def test_connection_established_comes_first(wire_format: str) -> None:
    accepted, client, subprotocol = await open_client(subprotocol=wire_format)
    assert accepted
    assert subprotocol == wire_format
    hello = await client.recv()
    assert hello["type"] == "connection_established"
    uuid.UUID(hello["connection_id"])
    assert hello["server_id"]
    assert hello["heartbeat_interval"] == 25
    assert isinstance(hello["timestamp"], float)
    await client.close()


async def test_no_subprotocol_means_json_and_none_echoed() -> None:
    accepted, client, subprotocol = await open_client()
    assert accepted and subprotocol is None
    assert (await client.recv())["type"] == "connection_established"
    await client.close()


@pytest.mark.parametrize(
    ("offer", "chosen"),
    [(["v2.xml", "v1.msgpack"], "v1.msgpack"), (["v1.protobuf", "v1.json"], "v1.protobuf")],
)
async def test_first_known_subprotocol_offered_is_chosen(offer: list[str], chosen: str) -> None:
    accepted, client, subprotocol = await open_client(offer=offer)
    assert accepted and subprotocol == chosen
    assert (await client.recv())["type"] == "connection_established"  # in the chosen format
    await _assert_still_usable(client)
    await client.close()


# Subprotocol names are tokens compared exactly (RFC 6455): "V1.JSON" is not "v1.json".
@pytest.mark.parametrize("offer", [["v2.xml"], ["V1.JSON"]])
async def test_only_unknown_subprotocols_are_refused(offer: list[str]) -> None:
    accepted, _, _ = await open_client(offer=offer)
    assert not accepted


async def test_subscribe_replies_with_seq_and_echoes_id(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": "news", "id": "a-1"})
    assert reply == {"type": "subscribed", "channel": "news", "seq": 0, "id": "a-1"}
    reply = await client.request({"type": "subscribe", "channel": "sport", "id": 7})
    assert reply == {"type": "subscribed", "channel": "sport", "seq": 0, "id": 7}
    await client.close()


async def test_publish_reaches_every_subscriber_with_seq(
    wire_format: str, publisher_token: str
) -> None:
    subscriber = await connected_client(subprotocol=wire_format)
    await subscriber.request({"type": "subscribe", "channel": "news"})
    publisher = await connected_client(subprotocol=wire_format, token=publisher_token)
    data = {"text": "hello", "n": 1}
    reply = await publisher.request({"type": "publish", "channel": "news", "data": data, "id": 99})
    assert reply["type"] == "published"
    assert reply["seq"] == 1 and reply["channel"] == "news" and reply["id"] == 99
    message = await subscriber.recv_type("message")
    assert message["channel"] == "news"
    assert message["seq"] == 1
    assert message["message_id"] == reply["message_id"]
    assert message["data"] == data
    assert isinstance(message["timestamp"], float)
    await subscriber.close()
    await publisher.close()


async def test_publisher_subscribed_to_its_channel_gets_both_frames(
    wire_format: str, publisher_token: str
) -> None:
    client = await connected_client(subprotocol=wire_format, token=publisher_token)
    await client.request({"type": "subscribe", "channel": "echo"})
    await client.send({"type": "publish", "channel": "echo", "data": "x"})
    frames = [await client.recv(), await client.recv()]
    assert sorted(f["type"] for f in frames) == ["message", "published"]
    await client.close()


async def test_messages_across_formats_are_identical(publisher_token: str) -> None:
    clients = [await connected_client(subprotocol=name) for name in WIRE_FORMATS]
    for client in clients:
        await client.request({"type": "subscribe", "channel": "mixed"})
    data = {"nested": [1, 2.5, None, True, "é\u0000"], "big": 2**64 - 1, "neg": -(2**63)}
    for publishing_format in WIRE_FORMATS:
        publisher = await connected_client(subprotocol=publishing_format, token=publisher_token)
        await publisher.request({"type": "publish", "channel": "mixed", "data": data})
        received = [await c.recv_type("message") for c in clients]
        assert all(envelope == received[0] for envelope in received)
        assert received[0]["data"] == data
        await publisher.close()
    for client in clients:
        await client.close()


async def test_data_round_trips_losslessly(wire_format: str, publisher_token: str) -> None:
    client = await connected_client(subprotocol=wire_format, token=publisher_token)
    await client.request({"type": "subscribe", "channel": "exact"})
    values = [
        "nul\u0000inside",
        2**64 - 1,
        -(2**63),
        0.1,
        1e308,
        5e-324,
        [],
        {},
        None,
        {"a": {"b": {"c": [1, "two", 3.0]}}},
    ]
    for value in values:
        await client.send({"type": "publish", "channel": "exact", "data": value})
        frames = [await client.recv(), await client.recv()]
        message = next(f for f in frames if f["type"] == "message")
        assert message["data"] == value
        assert type(message["data"]) is type(value)
    await client.close()


async def test_unsubscribe_stops_delivery(wire_format: str, publisher_token: str) -> None:
    subscriber = await connected_client(subprotocol=wire_format)
    await subscriber.request({"type": "subscribe", "channel": "news"})
    reply = await subscriber.request({"type": "unsubscribe", "channel": "news", "id": "u"})
    assert reply == {"type": "unsubscribed", "channel": "news", "id": "u"}
    publisher = await connected_client(token=publisher_token)
    await publisher.request({"type": "publish", "channel": "news", "data": 1})
    await subscriber.expect_nothing()
    await subscriber.close()
    await publisher.close()


async def test_heartbeat_is_acknowledged(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "heartbeat", "id": 5})
    assert reply["type"] == "heartbeat_ack" and reply["id"] == 5
    assert isinstance(reply["timestamp"], float)
    await client.close()


async def test_resubscribing_keeps_one_stream(wire_format: str, publisher_token: str) -> None:
    client = await connected_client(subprotocol=wire_format, token=publisher_token)
    await client.request({"type": "subscribe", "channel": "twice"})
    reply = await client.request({"type": "subscribe", "channel": "twice"})
    assert reply["type"] == "subscribed"
    await client.send({"type": "publish", "channel": "twice", "data": 1})
    frames = [await client.recv(), await client.recv()]
    assert sorted(f["type"] for f in frames) == ["message", "published"]
    await client.expect_nothing()
    await client.close()


# ----- errors ---------------------------------------------------------------------------


def _undecodable_payload(wire_format: str) -> str | bytes:
    return {"v1.json": "{not json", "v1.msgpack": b"\xc1", "v1.protobuf": b"\xff\xff\xff"}[
        wire_format
    ]


def _wrong_frame_type(wire_format: str) -> str | bytes:
    return b'{"type":"heartbeat"}' if wire_format == "v1.json" else '{"type":"heartbeat"}'


def _only_id(codec) -> bytes:  # type: ignore[no-untyped-def]  # codec untyped: protobuf's, whose encode gives bytes
    return codec.encode({"id": "q"})


# A typed schema cannot encode these envelopes; these are the frames a client with a
# wrong or newer schema would send instead. Field 99 is a kind from a newer schema.
_PROTOBUF_EQUIVALENTS: dict[str, Any] = {
    '{"channel": "news", "id": "q"}': _only_id,
    '{"channel": "news", "id": "q", "type": "shout"}': lambda c: _only_id(c) + b"\x9a\x06\x00",
    '{"id": "q", "type": 5}': lambda c: _only_id(c) + b"\x9a\x06\x00",
    # subscribe.channel sent as a varint; subscribe.since sent as a string
    '{"channel": 5, "type": "subscribe"}': lambda c: b"\x22\x02\x08\x05",
    '{"channel": "news", "since": "3", "type": "subscribe"}': (
        lambda c: b"\x22\x09\x0a\x04news\x12\x013"
    ),
    # bool and int64 share a wire type: since=True is since=1, a valid request
    '{"channel": "news", "since": true, "type": "subscribe"}': None,
    # the id as a double, and as a nested message, beside an empty heartbeat
    '{"id": 1.5, "type": "heartbeat"}': lambda c: b"\x11" + struct.pack("<d", 1.5) + b"\x52\x00",
    '{"id": [1], "type": "heartbeat"}': lambda c: b"\x12\x01\x01\x52\x00",
}


async def _send_envelope(client: WsClient, envelope: dict) -> None:
    """Send ``envelope``; for a format that cannot encode it, the equivalent raw frame."""
    try:
        payload = client.codec.encode(envelope)
    except UnencodableEnvelope:
        make_raw = _PROTOBUF_EQUIVALENTS[json.dumps(envelope, sort_keys=True)]
        if make_raw is None:
            pytest.skip(f"{envelope} has no distinct {client.codec.name} form")
        payload = make_raw(client.codec)
    await client.send_payload(payload)


async def _assert_still_usable(client: WsClient) -> None:
    reply = await client.request({"type": "heartbeat"})
    assert reply["type"] == "heartbeat_ack"


async def test_undecodable_frame_is_invalid_json(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    await client.send_payload(_undecodable_payload(wire_format))
    reply = await client.recv()
    assert reply["type"] == "error" and reply["code"] == "INVALID_JSON"
    assert reply["message"]
    await _assert_still_usable(client)
    await client.close()


async def test_wrong_frame_type_is_invalid_json(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    await client.send_payload(_wrong_frame_type(wire_format))
    reply = await client.recv()
    assert reply["code"] == "INVALID_JSON"
    await _assert_still_usable(client)
    await client.close()


async def test_json_rejects_nan() -> None:
    client = await connected_client()
    await client.send_payload('{"type":"publish","channel":"a","data":NaN}')
    assert (await client.recv())["code"] == "INVALID_JSON"
    await client.close()


@pytest.mark.parametrize(
    "envelope",
    [
        {"channel": "news"},
        {"type": "shout", "channel": "news"},
        {"type": 5},
    ],
)
async def test_unknown_message_type(wire_format: str, envelope: dict) -> None:
    client = await connected_client(subprotocol=wire_format)
    await _send_envelope(client, {**envelope, "id": "q"})
    reply = await client.recv()
    assert reply["type"] == "error"
    assert reply["code"] == "UNKNOWN_MESSAGE_TYPE"
    assert reply["id"] == "q"
    await _assert_still_usable(client)
    await client.close()


@pytest.mark.parametrize(
    "envelope",
    [
        {"type": "subscribe"},
        {"type": "subscribe", "channel": 5},
        {"type": "subscribe", "channel": ""},
        {"type": "subscribe", "channel": "x" * 101},
        {"type": "subscribe", "channel": "has space"},
        {"type": "subscribe", "channel": "news*"},
        {"type": "subscribe", "channel": "nëws"},
        {"type": "subscribe", "channel": "news/x"},
        {"type": "subscribe", "channel": "news", "since": -1},
        {"type": "subscribe", "channel": "news", "since": "3"},
        {"type": "subscribe", "channel": "news", "since": True},
        {"type": "unsubscribe"},
        {"type": "publish", "channel": "news"},
        {"type": "publish", "data": 1},
        {"type": "heartbeat", "id": "x" * 65},
        {"type": "heartbeat", "id": 1.5},
        {"type": "heartbeat", "id": [1]},
    ],
)
async def test_invalid_message(wire_format: str, envelope: dict) -> None:
    client = await connected_client(subprotocol=wire_format)
    await _send_envelope(client, envelope)
    reply = await client.recv()
    assert reply["type"] == "error"
    assert reply["code"] == "INVALID_MESSAGE", reply
    await _assert_still_usable(client)
    await client.close()


async def test_envelope_that_is_not_a_map(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    if wire_format == "v1.protobuf":
        pytest.skip("every protobuf frame decodes to an Envelope message")
    await client.send_payload(client.codec.encode([1, 2]))  # type: ignore[arg-type]  # the bad frame under test
    assert (await client.recv())["code"] == "INVALID_MESSAGE"
    await client.close()


async def test_error_echoes_valid_id(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": "bad name", "id": 12})
    assert reply["code"] == "INVALID_MESSAGE" and reply["id"] == 12
    await client.close()


async def test_bad_frame_never_reaches_other_clients(wire_format: str) -> None:
    subscriber = await connected_client(subprotocol=wire_format)
    await subscriber.request({"type": "subscribe", "channel": "news"})
    attacker = await connected_client(subprotocol=wire_format)
    await attacker.send_payload(_undecodable_payload(wire_format))
    await attacker.recv()
    await attacker.send({"type": "publish", "channel": "news", "data": "x"})
    await attacker.recv()
    await subscriber.expect_nothing()
    await subscriber.close()
    await attacker.close()


async def test_anonymous_publish_is_forbidden(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "publish", "channel": "news", "data": 1, "id": 3})
    assert reply["code"] == "FORBIDDEN" and reply["id"] == 3
    await _assert_still_usable(client)
    await client.close()


@pytest.mark.parametrize("channel", ["private-room", "presence-lobby", "user:1"])
async def test_reserved_channels_are_forbidden_to_anonymous(wire_format: str, channel: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "subscribe", "channel": channel})
    assert reply["code"] == "FORBIDDEN"
    await client.close()


async def test_unsubscribe_without_subscription(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    reply = await client.request({"type": "unsubscribe", "channel": "news", "id": "n"})
    assert reply["code"] == "NOT_SUBSCRIBED" and reply["id"] == "n"
    await _assert_still_usable(client)
    await client.close()


@pytest.mark.parametrize(
    "value",
    [float("nan"), b"\x00\xff", {1: "one"}, msgpack.ExtType(5, b"x")],
    ids=["nan", "bin", "int-key", "ext-type"],
)
async def test_msgpack_values_that_are_not_json_are_invalid_message(
    publisher_token: str, value: object
) -> None:
    client = await connected_client(subprotocol="v1.msgpack", token=publisher_token)
    reply = await client.request({"type": "publish", "channel": "news", "data": value, "id": 6})
    assert reply["type"] == "error"
    assert reply["code"] == "INVALID_MESSAGE" and reply["id"] == 6
    await _assert_still_usable(client)
    await client.close()


def _lone_surrogate_publish(codec: Codec) -> str | bytes:
    """A publish whose data holds a lone surrogate, as each format's client writes it."""
    envelope = {"type": "publish", "channel": "news", "data": {"s": "\ud800"}, "id": 8}
    if codec.name == "json":
        return json.dumps(envelope)  # the \ud800 escape
    if codec.name == "msgpack":
        # Not UTF-8, so a MessagePack library only writes it when told to.
        return msgpack.packb(envelope, unicode_errors="surrogatepass")
    return codec.encode(envelope)  # the escape inside data_json


async def test_lone_surrogate_in_data_is_refused(wire_format: str, publisher_token: str) -> None:
    subscriber = await connected_client()
    await subscriber.request({"type": "subscribe", "channel": "news"})
    client = await connected_client(subprotocol=wire_format, token=publisher_token)
    await client.send_payload(_lone_surrogate_publish(client.codec))
    reply = await client.recv()
    if wire_format == "v1.msgpack":  # a MessagePack str must be UTF-8: the frame is bad
        assert reply["code"] == "INVALID_JSON"
    else:
        assert reply["code"] == "INVALID_MESSAGE" and reply["id"] == 8, reply
    await _assert_still_usable(client)
    await subscriber.expect_nothing()
    await subscriber.close()
    await client.close()


def _lone_surrogate_id(codec: Codec, request: dict[str, Any]) -> str | bytes:
    """``request`` with the id ``"\\ud800"``, as each format's client would write it."""
    if codec.name == "json":
        return json.dumps({**request, "id": "\ud800"})  # the \ud800 escape, as text
    if codec.name == "msgpack":
        envelope = {**request, "id": "\ud800"}
        return msgpack.packb(envelope, unicode_errors="surrogatepass")
    # Protobuf: the surrogate's three bytes where a three-character id stood.
    frame = codec.encode({**request, "id": "XYZ"})
    return frame.replace(b"XYZ", "\ud800".encode("utf-8", "surrogatepass"))  # type: ignore[arg-type]  # protobuf encodes to bytes


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "heartbeat"},
        {"type": "subscribe", "channel": "news"},
        {"type": "publish", "channel": "news", "data": 1},
        {"type": "unsubscribe", "channel": "news"},
        {"type": "presence", "channel": "presence-x"},
        {"type": "nonsense"},
    ],
    ids=lambda r: r["type"],
)
async def test_an_id_that_cannot_be_echoed_is_refused_without_an_id(
    wire_format: str, request_: dict[str, Any]
) -> None:
    """A JSON id may hold a lone surrogate, which no UTF-8 frame can carry back: it is
    INVALID_MESSAGE with no id. MessagePack and Protobuf strings are UTF-8 on the wire,
    so there such a frame does not decode (INVALID_JSON). The connection stays open."""
    if wire_format == "v1.protobuf" and request_["type"] == "nonsense":
        pytest.skip("a protobuf frame cannot name an unknown type")
    client = await connected_client(subprotocol=wire_format)
    await client.send_payload(_lone_surrogate_id(client.codec, request_))
    reply = await client.recv()
    expected = "INVALID_MESSAGE" if wire_format == "v1.json" else "INVALID_JSON"
    assert reply["type"] == "error" and reply["code"] == expected, reply
    assert "id" not in reply
    await _assert_still_usable(client)
    await client.close()


@pytest.mark.parametrize(
    "value",
    [2**64, -(2**63) - 1],
)
async def test_unrepresentable_data_is_refused(
    wire_format: str, publisher_token: str, value: int
) -> None:
    if wire_format == "v1.msgpack":
        pytest.skip("MessagePack cannot carry integers past 64 bits on the wire")
    client = await connected_client(subprotocol=wire_format, token=publisher_token)
    reply = await client.request({"type": "publish", "channel": "news", "data": value})
    assert reply["code"] == "INVALID_MESSAGE"
    await client.close()


FRAME_LIMIT = 2000


@override_settings(PUSH={"MAX_FRAME_BYTES": FRAME_LIMIT})
async def test_frame_of_exactly_the_limit_is_accepted(
    wire_format: str, publisher_token: str
) -> None:
    client = await connected_client(subprotocol=wire_format, token=publisher_token)
    envelope = {"type": "publish", "channel": "big", "data": ""}
    overhead = len(client.codec.encode(envelope))
    envelope["data"] = "x" * (FRAME_LIMIT - overhead)
    payload = client.codec.encode(envelope)
    if len(payload) != FRAME_LIMIT:  # length prefixes may grow with the string
        envelope["data"] = "x" * (FRAME_LIMIT - overhead - (len(payload) - FRAME_LIMIT))
        payload = client.codec.encode(envelope)
    assert len(payload) == FRAME_LIMIT
    await client.send_payload(payload)
    assert (await client.recv())["type"] == "published"
    await client.close()


@override_settings(PUSH={"MAX_FRAME_BYTES": FRAME_LIMIT})
async def test_frame_over_the_limit_closes_1009(wire_format: str, publisher_token: str) -> None:
    subscriber = await connected_client()
    await subscriber.request({"type": "subscribe", "channel": "big"})
    client = await connected_client(subprotocol=wire_format, token=publisher_token)
    envelope = {"type": "publish", "channel": "big", "data": "x" * FRAME_LIMIT, "id": 1}
    await client.send(envelope)
    reply = await client.recv()
    assert reply["code"] == "MESSAGE_TOO_LARGE"
    assert await client.expect_close() == CloseCode.TOO_LARGE
    await subscriber.expect_nothing()
    await subscriber.close()


@override_settings(PUSH={"MAX_FRAME_BYTES": FRAME_LIMIT, "RATE_BURST": 2, "RATE_PER_SEC": 0.001})
async def test_a_frame_over_the_limit_closes_1009_though_over_the_frame_rate_too(
    wire_format: str, publisher_token: str
) -> None:
    """The size is checked first: over the rate, the frame used to be answered
    ``RATE_LIMITED`` and the connection read on."""
    client = await connected_client(subprotocol=wire_format, token=publisher_token)
    for n in range(2):
        assert (await client.request({"type": "heartbeat", "id": n}))["type"] == "heartbeat_ack"
    over = await client.request({"type": "heartbeat", "id": "over"})
    assert over["code"] == "RATE_LIMITED", over
    await client.send({"type": "publish", "channel": "big", "data": "x" * FRAME_LIMIT, "id": 1})
    reply = await client.recv()
    assert reply["code"] == "MESSAGE_TOO_LARGE", reply
    assert await client.expect_close() == CloseCode.TOO_LARGE


@override_settings(PUSH={"MAX_FRAME_BYTES": FRAME_LIMIT})
async def test_a_frame_over_the_limit_closes_1009_though_of_the_other_frame_type(
    wire_format: str,
) -> None:
    client = await connected_client(subprotocol=wire_format)
    text = "x" * (FRAME_LIMIT + 1)
    await client.send_payload(text if client.codec.binary else text.encode())
    reply = await client.recv()
    assert reply["code"] == "MESSAGE_TOO_LARGE", reply
    assert await client.expect_close() == CloseCode.TOO_LARGE


@override_settings(PUSH={"MAX_FRAME_BYTES": FRAME_LIMIT})
@pytest.mark.parametrize("past_the_limit", [0, 1])
async def test_a_text_frame_is_measured_in_utf8_bytes_not_characters(
    past_the_limit: int, publisher_token: str
) -> None:
    client = await connected_client(token=publisher_token)
    head, tail = '{"type":"publish","channel":"big","data":"', '"}'
    room = FRAME_LIMIT - len(head) - len(tail)
    text = head + "é" * (room // 2) + "x" * (room % 2 + past_the_limit) + tail
    assert len(text.encode()) == FRAME_LIMIT + past_the_limit and len(text) < FRAME_LIMIT
    await client.send_payload(text)
    reply = await client.recv()
    if past_the_limit:
        assert reply["code"] == "MESSAGE_TOO_LARGE", reply
        assert await client.expect_close() == CloseCode.TOO_LARGE
    else:
        assert reply["type"] == "published", reply
        await client.close()


async def test_invalid_token_is_refused_at_handshake(
    transactional_db: None, wire_format: str
) -> None:
    accepted, _, _ = await open_client(token="not-a-token", subprotocol=wire_format)
    assert not accepted


async def test_foreign_browser_origin_is_refused(wire_format: str) -> None:
    accepted, _, _ = await open_client(
        headers=[(b"origin", b"https://evil.example")], subprotocol=wire_format
    )
    assert not accepted


async def test_allowed_browser_origin_and_no_origin_are_accepted(wire_format: str) -> None:
    accepted, client, _ = await open_client(
        headers=[(b"origin", b"http://localhost:8000")], subprotocol=wire_format
    )
    assert accepted
    await client.close()
    accepted, client, _ = await open_client(subprotocol=wire_format)
    assert accepted
    await client.close()


async def test_path_without_trailing_slash(wire_format: str) -> None:
    accepted, client, _ = await open_client(path="/ws", subprotocol=wire_format)
    assert accepted
    await client.close()


async def test_user_channel_belongs_to_its_user(  # type: ignore[no-untyped-def]  # other_user: a fixture
    other_user, publisher_token: str, wire_format: str
) -> None:
    from rest_framework.authtoken.models import Token

    from common.db import db_call

    token = await db_call(lambda: Token.objects.create(user=other_user).key)()
    client = await connected_client(token=token, subprotocol=wire_format)
    own = await client.request({"type": "subscribe", "channel": f"user:{other_user.pk}"})
    assert own["type"] == "subscribed"
    padded = await client.request({"type": "subscribe", "channel": f"user:0{other_user.pk}"})
    assert padded["code"] == "FORBIDDEN"
    other = await client.request({"type": "subscribe", "channel": f"user:{other_user.pk + 1}"})
    assert other["code"] == "FORBIDDEN"
    await client.close()


@override_settings(PUSH={"RATE_BURST": 5, "RATE_PER_SEC": 0.001, "RATE_LIMIT_CLOSE_AFTER": 3})
async def test_rate_limit_answers_then_closes_1008(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    for n in range(5):
        assert (await client.request({"type": "heartbeat", "id": n}))["type"] == "heartbeat_ack"
    for n in range(3):
        reply = await client.request({"type": "heartbeat", "id": f"over-{n}"})
        assert reply["code"] == "RATE_LIMITED" and reply["id"] == f"over-{n}"
    await client.send({"type": "heartbeat"})
    assert await client.expect_close() == CloseCode.POLICY


@override_settings(PUSH={"MAX_SUBSCRIPTIONS_PER_CONNECTION": 2})
async def test_subscription_limit(wire_format: str) -> None:
    client = await connected_client(subprotocol=wire_format)
    for channel in ("a", "b"):
        assert (await client.request({"type": "subscribe", "channel": channel}))["seq"] == 0
    reply = await client.request({"type": "subscribe", "channel": "c"})
    assert reply["code"] == "FORBIDDEN" and "limit" in reply["message"]
    await client.close()


async def test_a_connection_whose_writes_broke_is_closed_1011_and_others_go_on(
    publisher_token: str,
) -> None:
    """A write that failed on the server's side (not the peer leaving) would leave the
    connection open, subscribed and silent: it is closed 1011 so the client resumes."""
    from push.services.runtime import get_node

    broken = await connected_client()
    await broken.request({"type": "subscribe", "channel": "news"})
    healthy = await connected_client()
    await healthy.request({"type": "subscribe", "channel": "news"})
    node = await get_node()
    first, _ = list(node.connections.values())
    first.outbox.fail(RuntimeError("the server's frame writer broke"))
    assert await broken.expect_close() == CloseCode.SERVER_ERROR
    publisher = await connected_client(token=publisher_token)
    await publisher.request({"type": "publish", "channel": "news", "data": 1})
    assert (await healthy.recv_type("message"))["seq"] == 1
    for client in (healthy, publisher, broken):
        await client.close()


async def test_a_peer_that_left_mid_send_is_not_closed_again() -> None:
    from push.services.runtime import get_node

    client = await connected_client()
    node = await get_node()
    (connection,) = node.connections.values()
    connection._on_send_failed(ConnectionResetError("peer reset"))  # the server's send
    await client.expect_nothing()
    assert connection.is_open  # its disconnect, on the way, ends it
    await client.close()


@pytest.fixture
def node_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first connection's start of the node fails (as a bug or a dependency would)."""

    async def fails(self: Node) -> None:
        raise OSError("the node could not start")

    monkeypatch.setattr(Node, "start", fails)


@pytest.mark.usefixtures("node_cannot_start")
async def test_a_node_that_cannot_start_tells_the_client_to_try_again_later() -> None:
    # The handshake is accepted so the client sees 1013 (try again later): closed before
    # the accept, servers answer HTTP 403, which clients take for a refused token.
    accepted, client, _ = await open_client()
    assert accepted
    assert await client.expect_close() == CloseCode.TRY_AGAIN_LATER


@pytest.mark.usefixtures("node_cannot_start")
async def test_a_node_that_cannot_start_tells_a_pusher_client_to_back_off() -> None:
    communicator = communicator_for(path="/app/any-key")
    accepted, _ = await communicator.connect()
    assert accepted
    frame = json.loads((await communicator.receive_output())["text"])
    assert frame["event"] == "pusher:error" and frame["data"]["code"] == 4100
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4100}


def _store_messages(channel: str, count: int, data_chars: int) -> None:
    from datetime import UTC, datetime

    from push.models import Channel, Message

    stored = Channel.objects.create(name=channel, last_seq=count)
    data = json.dumps("x" * (data_chars - 2))
    now = datetime.now(tz=UTC)
    Message.objects.bulk_create(
        Message(channel=stored, seq=seq, message_id=uuid.uuid4(), data=data, created_at=now)
        for seq in range(1, count + 1)
    )


@override_settings(
    PUSH={
        "OVERLOAD_LAG_MS": 0,
        # Nothing in memory: the resume reads history, a page of two messages at a time,
        # at the address's history budget: about a page a second, four seconds in all.
        "RECENT_PER_CHANNEL": 1,
        "REPLAY_BATCH_MAX_BYTES": 2000,
        "ADDRESS_HISTORY_BURST_BYTES": 2000,
        "ADDRESS_HISTORY_BYTES_PER_SEC": 2000,
        "HEARTBEAT_TIMEOUT_SECS": 1.0,
    }
)
async def test_a_client_that_heartbeats_through_a_long_resume_is_not_closed_as_silent() -> None:
    """A resume paced by its client's reading or its address's history budget takes as
    long as it takes, and the connection's later frames wait for it. The client that
    heartbeats meanwhile, as told, was closed 4001 (heartbeat timeout) mid-replay: the
    server had not read its heartbeats, so it looked silent."""
    from asgiref.sync import sync_to_async

    await sync_to_async(_store_messages)("long-resume", 10, 1000)
    client = await connected_client(client_address=("192.0.2.31", 40000))
    await client.send({"type": "subscribe", "channel": "long-resume", "since": 0, "id": "s"})
    assert (await client.recv_type("subscribed"))["recovered"] is True
    seqs: list[int] = []
    acks = 0
    while len(seqs) < 10:
        await client.send({"type": "heartbeat"})
        while not await client.communicator.receive_nothing(0.3):
            envelope = await client.recv()  # ConnectionClosed (4001) before the fix
            if envelope["type"] == "message":
                seqs.append(envelope["seq"])
            else:
                assert envelope["type"] == "heartbeat_ack", envelope
                acks += 1
    assert seqs == list(range(1, 11))
    await client.send({"type": "heartbeat", "id": "after"})
    while acks >= 0:
        envelope = await client.recv_type("heartbeat_ack")
        if envelope.get("id") == "after":
            break
        acks -= 1
    await client.close()


async def test_a_handshake_whose_credentials_take_too_long_to_check_is_told_to_try_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not kept waiting (uvicorn), nor dropped unanswered (daphne's autobahn, after 5 s).
    from push.transport import entry

    async def slow(scope: Any) -> None:
        await asyncio.sleep(30)

    monkeypatch.setattr(entry, "resolve_principal", slow)
    monkeypatch.setattr(entry, "ADMISSION_DEADLINE_SECS", 0.2)
    accepted, client, _ = await open_client(token="any")
    assert accepted
    assert await client.expect_close() == CloseCode.TRY_AGAIN_LATER
