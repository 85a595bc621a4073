"""The Protobuf codec, the schema's drift guard, and properties every codec shares.

Pure tests: no event loop, no database. The frame-by-frame protocol tests for
``v1.protobuf`` live in test_consumer.py, which runs every case for every codec.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from common.errors import ErrorCode, PushError
from push.fanout.message import ChannelMessage, dump_data
from push.tests.strategies import (
    INT64_MAX,
    client_frame,
    json_values,
    protobuf_envelopes,
    request_ids,
    wild_envelopes,
)
from push.wire import protocol
from push.wire.codecs import CODECS, Codec
from push.wire.codecs.json_codec import JsonCodec
from push.wire.codecs.msgpack_codec import MsgpackCodec
from push.wire.codecs.protobuf_codec import (
    _SCHEMA,
    ENVELOPE_TYPES,
    ProtobufCodec,
    UnencodableEnvelope,
    _field_of,
    _Kind,
)
from push.wire.proto import push_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
REGENERATE = (
    "push/wire/proto/push_pb2.py(i) differ from push/wire/proto/push.proto: regenerate from the "
    "repository root with the pinned grpcio-tools: python -m grpc_tools.protoc -I . "
    "--python_out=. --pyi_out=. push/wire/proto/push.proto"
)

codec = ProtobufCodec()
ALL_CODECS: list[Codec] = [JsonCodec(), MsgpackCodec(), ProtobufCodec()]
# Hypothesis runs are bounded: these are unit tests, not a fuzzing campaign.
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(left: Any, right: Any) -> bool:
    """Equal and of the same types all the way down (1 is not 1.0, True is not 1)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, float):
        return repr(left) == repr(right)  # the same double, sign of zero included
    return bool(left == right)


def roundtrip(envelope: dict[str, Any], via: Codec = codec) -> Any:
    return via.decode(via.encode(envelope))


# ----- registration and schema -------------------------------------------------------------


def test_registered_as_binary_v1_protobuf() -> None:
    registered = CODECS["v1.protobuf"]
    assert isinstance(registered, ProtobufCodec)
    assert (registered.name, registered.binary) == ("protobuf", True)


def test_codec_knows_every_member_of_the_schema() -> None:
    # The table is read from the descriptors; this checks the reading: a kind or field
    # the codec missed would decode silently to less than was sent.
    kinds = push_pb2.Envelope.DESCRIPTOR.oneofs_by_name["kind"].fields
    assert {field.name for field in kinds} == ENVELOPE_TYPES
    for field in kinds:
        proto_fields = {f.name for f in field.message_type.fields}
        assert proto_fields == {f.proto_name for f in _SCHEMA[field.name].values()}, field.name
        for spec in _SCHEMA[field.name].values():
            has_presence = field.message_type.fields_by_name[spec.proto_name].has_presence
            if spec.kind not in (_Kind.MEMBER, _Kind.MEMBERS):
                assert has_presence == spec.optional, spec.key


@pytest.mark.parametrize(
    ("message", "name"),
    [(struct_pb2.Value, "null_value"), (struct_pb2.ListValue, "values")],
    ids=["an enum", "a repeated message other than Member"],
)
def test_a_field_the_codec_cannot_map_fails_at_import(message: Any, name: str) -> None:
    with pytest.raises(TypeError, match=name):
        _field_of(message.DESCRIPTOR.fields_by_name[name])


def test_generated_code_matches_schema(tmp_path: Path) -> None:
    pytest.importorskip(
        "grpc_tools", reason="grpcio-tools is not installed (pip install -r requirements.txt)"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "push/wire/proto/push.proto",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in ("push_pb2.py", "push_pb2.pyi"):
        generated = (tmp_path / "push" / "wire" / "proto" / name).read_bytes()
        checked_in = (REPO_ROOT / "push" / "wire" / "proto" / name).read_bytes()
        assert generated == checked_in, REGENERATE


# ----- every envelope type round-trips -------------------------------------------------------

MEMBER = {"user_id": 42, "info": {"name": "Ada", "tags": ["x"]}}
CONTRACT_ENVELOPES: list[dict[str, Any]] = [
    protocol.connection_established(
        connection_id="8c1f0e52-6f1a-4d1e-9d59-2f9b3e0c8a11",
        server_id="node-1",
        heartbeat_interval=25,
        timestamp=1764150000.123,
    ),
    {"type": "subscribe", "channel": "news"},
    {"type": "subscribe", "channel": "news", "since": 17, "token": "t.k", "id": "a-1"},
    {"type": "subscribe", "channel": "news", "rewind": 20, "occupancy": True, "delta": "fossil"},
    protocol.subscribed(channel="news", seq=42, recovered=True, request_id="a-1"),
    protocol.subscribed(channel="news", seq=0, recovered=None, request_id=None),
    protocol.subscribed(channel="news", seq=7, recovered=None, request_id=None, delta="fossil"),
    protocol.occupancy(channel="news", subscribers=3),
    {"type": "unsubscribe", "channel": "news", "id": 3},
    protocol.unsubscribed(channel="news", request_id=3),
    {"type": "publish", "channel": "news", "data": {"text": "hi", "n": 1}, "id": 99},
    protocol.published(channel="news", seq=43, message_id="m-1", request_id=99),
    {"type": "heartbeat"},
    {"type": "heartbeat", "id": "hb"},
    protocol.heartbeat_ack(timestamp=1764150000.5, request_id=None),
    ChannelMessage(
        channel="news", seq=43, message_id="m-1", data_json='{"a":[1,2.5]}', timestamp=1.5
    ).envelope(),
    protocol.error(code=ErrorCode.FORBIDDEN, message="not allowed", request_id=3),
    protocol.error(code=ErrorCode.INVALID_JSON, message="frame does not decode"),
    {"type": "presence", "channel": "presence-lobby", "members": [MEMBER, {"user_id": "u-7"}]},
    {"type": "presence", "channel": "presence-lobby", "members": []},
    {"type": "join", "channel": "presence-lobby", "member": MEMBER},
    {"type": "leave", "channel": "presence-lobby", "member": {"user_id": "u-7", "info": {}}},
]


@pytest.mark.parametrize("envelope", CONTRACT_ENVELOPES, ids=lambda e: e["type"])
def test_every_envelope_type_round_trips(envelope: dict[str, Any]) -> None:
    assert same(roundtrip(envelope), envelope)


def test_every_envelope_type_is_covered() -> None:
    assert {e["type"] for e in CONTRACT_ENVELOPES} == ENVELOPE_TYPES


def test_presence_request_decodes_with_an_empty_member_list() -> None:
    # A repeated field has no presence: an empty answer and a request look the same.
    decoded = roundtrip({"type": "presence", "channel": "presence-lobby", "id": 1})
    assert decoded == {"type": "presence", "channel": "presence-lobby", "members": [], "id": 1}


def test_absent_optional_fields_differ_from_zero_and_false() -> None:
    assert roundtrip({"type": "subscribe", "channel": "c", "since": 0})["since"] == 0
    assert "since" not in roundtrip({"type": "subscribe", "channel": "c"})
    assert roundtrip({"type": "subscribe", "channel": "c", "token": ""})["token"] == ""
    assert "token" not in roundtrip({"type": "subscribe", "channel": "c"})
    not_recovered = {"type": "subscribed", "channel": "c", "seq": 0, "recovered": False}
    assert roundtrip(not_recovered)["recovered"] is False
    assert "recovered" not in roundtrip({"type": "subscribed", "channel": "c", "seq": 0})


def test_fields_a_valid_envelope_always_has_decode_even_when_zero() -> None:
    # proto3 does not send zero values; the contract still shows "seq": 0.
    decoded = roundtrip({"type": "subscribed", "channel": "news", "seq": 0, "id": "a-1"})
    assert decoded == {"type": "subscribed", "channel": "news", "seq": 0, "id": "a-1"}


# ----- request ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", [7, "7", 0, "", -(2**63), INT64_MAX, "x" * 64, "é\u0000"])
def test_request_id_keeps_its_type_and_value(request_id: int | str) -> None:
    decoded = roundtrip({"type": "heartbeat", "id": request_id})
    assert same(decoded["id"], request_id)
    reply = protocol.heartbeat_ack(timestamp=1.0, request_id=protocol.read_request_id(decoded))
    assert same(roundtrip(reply)["id"], request_id)


@pytest.mark.parametrize(
    "request_id", [None, 7, "7", 0, "", -(2**63), INT64_MAX, "x" * 64, 'é"\\\u0000', "1e-5"]
)
@pytest.mark.parametrize("via", ALL_CODECS, ids=lambda c: c.name)
def test_a_publish_acknowledgement_is_the_published_envelope(
    via: Codec, request_id: int | str | None
) -> None:
    # The JSON codec writes it by hand: the same text its encode makes of the envelope.
    message = ChannelMessage(
        channel="a-b.c:d@e_f", seq=12, message_id="0190e-0e-5", data_json="1", timestamp=1.5
    )
    envelope = protocol.published(
        channel=message.channel, seq=12, message_id=message.message_id, request_id=request_id
    )
    assert via.encode_published(message, request_id) == via.encode(envelope)
    assert via.decode(via.encode_published(message, request_id)) == envelope


@pytest.mark.parametrize("request_id", [2**63, -(2**63) - 1, 1.5, True, [1], {"a": 1}])
def test_request_id_outside_the_schema_is_unencodable(request_id: object) -> None:
    with pytest.raises(UnencodableEnvelope, match="'id'"):
        codec.encode({"type": "heartbeat", "id": request_id})


# ----- data ---------------------------------------------------------------------------------

LOSSLESS_VALUES: list[Any] = [
    2**64 - 1,
    -(2**63),
    0,
    0.1,
    -0.0,
    1e308,
    5e-324,
    3.0,
    "nul\u0000inside",
    "é😀",
    "",
    True,
    False,
    None,
    [],
    {},
    {"a": {"b": {"c": [1, "two", 3.0, None, {"d": []}]}}},
]


@pytest.mark.parametrize("value", LOSSLESS_VALUES, ids=repr)
@pytest.mark.parametrize("via", ALL_CODECS, ids=lambda c: c.name)
def test_data_travels_losslessly(via: Codec, value: Any) -> None:
    published = roundtrip({"type": "publish", "channel": "c", "data": value}, via)
    assert same(published["data"], value)
    message = ChannelMessage(
        channel="c", seq=1, message_id="m", data_json=dump_data(value), timestamp=1.0
    )
    assert same(via.decode(via.encode_message(message))["data"], value)


def test_data_travels_as_its_canonical_json_text() -> None:
    frame = push_pb2.Envelope.FromString(
        codec.encode({"type": "publish", "channel": "c", "data": {"k": [2**64 - 1, 0.1, "é"]}})
    )
    assert frame.publish.data_json == '{"k":[18446744073709551615,0.1,"é"]}'


def test_integers_past_64_bits_reach_the_protocol_which_refuses_them() -> None:
    # JSON text carries any integer, so the refusal is the same INVALID_MESSAGE as JSON's.
    for value in (2**64, -(2**63) - 1):
        decoded = roundtrip({"type": "publish", "channel": "c", "data": value})
        with pytest.raises(PushError) as caught:
            protocol.parse_request(decoded)
        assert caught.value.code is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize(
    "data",
    [float("nan"), float("inf"), b"bytes", {1: "int key"}, [{"a": {(1, 2): 3}}], object()],
    # An object's repr holds its address: ids must be the same in every test process.
    ids=lambda data: "object()" if type(data) is object else repr(data),
)
def test_data_that_is_no_json_value_is_unencodable(data: Any) -> None:
    with pytest.raises(UnencodableEnvelope, match="'data'"):
        codec.encode({"type": "publish", "channel": "c", "data": data})


def test_lone_surrogate_travels_escaped() -> None:
    value = {"s": "\ud800"}
    assert roundtrip({"type": "publish", "channel": "c", "data": value})["data"] == value
    message = ChannelMessage(
        channel="c", seq=1, message_id="m", data_json=dump_data(value), timestamp=1.0
    )
    assert codec.decode(codec.encode_message(message))["data"] == value


def test_publish_without_data_is_invalid_message() -> None:
    decoded = roundtrip({"type": "publish", "channel": "news"})
    assert "data" not in decoded
    with pytest.raises(PushError) as caught:
        protocol.parse_request(decoded)
    assert caught.value.code is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize("data_json", ["{bad", "NaN", "Infinity", "[1,", '"\\x"', "1 2", " "])
def test_data_json_that_does_not_parse_is_invalid_json(data_json: str) -> None:
    frame = push_pb2.Envelope(publish=push_pb2.Publish(channel="c", data_json=data_json))
    with pytest.raises(PushError) as caught:
        codec.decode(frame.SerializeToString())
    assert caught.value.code is ErrorCode.INVALID_JSON


class UnparsedMessage(ChannelMessage):
    __slots__ = ()

    @property
    def data(self) -> Any:
        raise AssertionError("the fan-out path must not parse data_json")


def test_encode_message_copies_data_json_without_parsing_it() -> None:
    message = UnparsedMessage(
        channel="news",
        seq=43,
        message_id="m-1",
        data_json='{"big":18446744073709551615}',
        timestamp=1764150000.456,
    )
    payload = codec.encode_message(message)
    expected = {
        "type": "message", "channel": "news", "seq": 43, "message_id": "m-1",
        "data": {"big": 2**64 - 1}, "timestamp": 1764150000.456,
    }  # fmt: skip
    assert same(codec.decode(payload), expected)
    assert payload == codec.encode(expected)


# ----- what cannot be encoded, and hostile frames -----------------------------------------------


@pytest.mark.parametrize(
    "envelope",
    [
        [1, 2],
        {"channel": "news"},
        {"type": "shout", "channel": "news"},
        {"type": 5},
        {"type": "subscribe", "channel": 5},
        {"type": "subscribe", "channel": "news", "since": "3"},
        {"type": "subscribe", "channel": "news", "since": True},
        {"type": "subscribe", "channel": "news", "since": 1.0},
        {"type": "subscribe", "channel": "news", "extra": 1},
        {"type": "subscribed", "channel": "news", "seq": 1, "recovered": 1},
        {"type": "heartbeat_ack", "timestamp": "now"},
        {"type": "heartbeat_ack", "timestamp": 2**53 + 1},
        {"type": "join", "channel": "p", "member": {"user_id": 1.5}},
        {"type": "join", "channel": "p", "member": {"user_id": 1, "email": "x"}},
        {"type": "presence", "channel": "p", "members": {"user_id": 1}},
    ],
    ids=repr,
)
def test_maps_the_schema_cannot_hold_are_unencodable(envelope: Any) -> None:
    with pytest.raises(UnencodableEnvelope):
        codec.encode(envelope)


def test_unencodable_is_a_value_error() -> None:
    assert issubclass(UnencodableEnvelope, ValueError)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff",
        b"\x22\x02\x0a\x80",  # subscribe.channel holds a byte that is not UTF-8
        b"\x0a\x05ab",  # id_str longer than the frame
        b"\x0b" * 200,  # start-group tags nested past the parser's limit
        "text frame",
    ],
    ids=repr,
)
def test_undecodable_frames_are_invalid_json(payload: bytes | str) -> None:
    with pytest.raises(PushError) as caught:
        codec.decode(payload)
    assert caught.value.code is ErrorCode.INVALID_JSON


WITH_ID_Q = b"\x0a\x01q"  # Envelope.id_str = "q"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"\x22\x02\x08\x05" + WITH_ID_Q, "channel"),  # subscribe.channel as varint 5
        (b"\x22\x06\x0a\x01a\x12\x013" + WITH_ID_Q, "since"),  # since as the string "3"
        (b"\x22\x05\x0a\x01a\x18\x07" + WITH_ID_Q, "token"),  # token as varint 7
        (b"\x42\x05\x0a\x01a\x10\x01" + WITH_ID_Q, "data"),  # publish.data_json as varint
        (b"\x11" + b"\x00" * 6 + b"\xf8\x3f\x52\x00", "id"),  # id_int as the double 1.5
        (b"\x12\x01\x01\x52\x00", "id"),  # id_int as a length-delimited list
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_known_field_with_a_wrong_wire_type_is_invalid_message(payload: bytes, field: str) -> None:
    # The protobuf form of "a field of the wrong type": not dropped as unknown, refused.
    decoded = codec.decode(payload)
    assert isinstance(decoded[field], bytes)
    with pytest.raises(PushError) as caught:
        protocol.parse_request(decoded)
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    assert caught.value.field == field
    if field != "id":
        assert protocol.read_request_id(decoded) == "q"


def test_empty_and_unknown_kinds_are_unknown_message_type_with_the_id() -> None:
    # Field 99 stands for an envelope type added to the schema after this server.
    future_kind = b"\x9a\x06\x00"
    for payload in (b"", codec.encode({"id": "q"}) + future_kind):
        decoded = codec.decode(payload)
        assert "type" not in decoded
        with pytest.raises(PushError) as caught:
            protocol.parse_request(decoded)
        assert caught.value.code is ErrorCode.UNKNOWN_MESSAGE_TYPE
    assert codec.decode(codec.encode({"id": "q"}) + future_kind) == {"id": "q"}


def test_server_only_types_from_a_client_are_unknown_message_type() -> None:
    decoded = roundtrip(protocol.published(channel="c", seq=1, message_id="m", request_id=2))
    with pytest.raises(PushError) as caught:
        protocol.parse_request(decoded)
    assert caught.value.code is ErrorCode.UNKNOWN_MESSAGE_TYPE


# ----- properties over every codec ------------------------------------------------------------

codecs = st.sampled_from(ALL_CODECS)


def _server_answer(via: Codec, payload: bytes | str) -> dict[str, Any] | None:
    """What the consumer does with one frame up to its reply: decode, validate, and on
    a PushError encode the error envelope in the connection's own format."""
    envelope: Any = None
    try:
        envelope = via.decode(payload)
        protocol.parse_request(envelope)
    except PushError as exc:
        request_id = protocol.read_request_id(envelope) if isinstance(envelope, dict) else None
        reply = via.decode(
            via.encode(protocol.error(code=exc.code, message=exc.message, request_id=request_id))
        )
        assert reply["type"] == "error" and reply["code"] == exc.code.value
        assert reply.get("id") == request_id
        return reply
    return None


@FUZZ
@given(via=codecs, payload=st.binary(max_size=256))
def test_arbitrary_bytes_raise_nothing_but_push_error(via: Codec, payload: bytes) -> None:
    _server_answer(via, payload)


@FUZZ
@given(payload=st.binary(max_size=64).map(lambda tail: b"\x42" + bytes([len(tail)]) + tail))
def test_arbitrary_publish_bodies_raise_nothing_but_push_error(payload: bytes) -> None:
    # Random bytes rarely select a kind; these always open a publish body.
    _server_answer(codec, payload)


@FUZZ
@given(via=st.sampled_from(ALL_CODECS[:2]), structure=wild_envelopes)
def test_arbitrary_structures_raise_nothing_but_push_error(
    via: Codec, structure: dict[str, Any]
) -> None:
    # Protobuf frames can only hold what the schema types allow: its arbitrary
    # structures are protobuf_envelopes below, plus the arbitrary bytes above.
    payload = client_frame(via, structure)
    assume(payload is not None)
    _server_answer(via, payload)  # type: ignore[arg-type]  # assume() above rules out None


@FUZZ
@given(envelope=protobuf_envelopes)
def test_any_schema_envelope_decodes_and_validates_to_push_error_at_worst(
    envelope: dict[str, Any],
) -> None:
    decoded = roundtrip(envelope)
    assert decoded["type"] == envelope["type"]
    for key, value in envelope.items():
        if value is not None:
            assert same(decoded[key], value), key
    _server_answer(codec, codec.encode(envelope))


@FUZZ
@given(via=codecs, value=json_values, request_id=request_ids)
def test_json_values_survive_every_codec(via: Codec, value: Any, request_id: int | str) -> None:
    envelope = {"type": "publish", "channel": "c", "data": value, "id": request_id}
    assert same(roundtrip(envelope, via), envelope)


@FUZZ
@given(publisher=codecs, subscriber=codecs, value=json_values)
def test_published_in_one_format_reaches_another_losslessly(
    publisher: Codec, subscriber: Codec, value: Any
) -> None:
    # The path a value takes: decoded and validated from the publisher's frame, stored
    # and broadcast as canonical JSON text, encoded once per subscriber format.
    frame = publisher.encode({"type": "publish", "channel": "c", "data": value})
    request = protocol.parse_request(publisher.decode(frame))
    assert isinstance(request, protocol.Publish)
    message = ChannelMessage(
        channel="c", seq=1, message_id="m", data_json=dump_data(request.data), timestamp=2.5
    )
    received = subscriber.decode(subscriber.encode_message(message))
    assert same(received["data"], value)
    assert same(received["timestamp"], 2.5)
