"""What a request costs the node when its client means harm: frames built to be cheap to
send and dear to decode (many tiny values: a MessagePack empty map is one byte and a
Python dict of 64), sent past the rate limit, or as a publish whose data grows when written as the
canonical JSON text that is stored and broadcast."""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from django.test import override_settings

from common.conf import push_settings
from common.errors import CloseCode, ErrorCode, PushError
from push.tests.wsclient import connected_client
from push.wire.codecs.msgpack_codec import MsgpackCodec

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fresh_node")]

MSGPACK = "v1.msgpack"


def empty_maps_frame(nbytes: int, *, request_id: str | None = None) -> bytes:
    """A MessagePack heartbeat of about ``nbytes`` whose extra field is a list of empty
    maps, one byte each on the wire: ~90 ms of decoding and freeing per MiB here."""
    head: dict[str, Any] = {"type": "heartbeat"}
    if request_id is not None:
        head["id"] = request_id
    prefix = msgpack.packb(head)
    # One more key in the top map (fixmap count + 1), then "x": array32 of n empty maps.
    count = len(head) + 1
    n = nbytes - len(prefix) - 8
    return (
        bytes([0x80 | count])
        + prefix[1:]
        + msgpack.packb("x")
        + b"\xdd"
        + struct.pack(">I", n)
        + b"\x80" * n
    )


@pytest.fixture
def decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The size of every frame the MessagePack codec decodes during the test (the test
    client's decoding of its replies included)."""
    sizes: list[int] = []
    decode = MsgpackCodec.decode

    def spying(self: MsgpackCodec, payload: str | bytes) -> Any:
        sizes.append(len(payload))
        return decode(self, payload)

    monkeypatch.setattr(MsgpackCodec, "decode", spying)
    yield sizes


@override_settings(PUSH={"RATE_BURST": 1, "RATE_PER_SEC": 0.001, "RATE_LIMIT_CLOSE_AFTER": 50})
async def test_a_refused_frame_is_not_decoded_to_find_its_id(decoded_sizes: list[int]) -> None:
    """The rate limit and the address's frame budget refuse frames so they cost the
    node little; decoding a refused frame for its id cost as much as serving it, and
    more: a frame up to the server's own limit (4 MiB + 64 KiB, past the node's 1 MiB,
    which was checked only for frames let through) was decoded whole, ~300 MB of
    objects for one frame of empty maps. A small refused frame is still answered under
    its id. A frame past the node's limit is refused for its size first, over the rate
    or not: closed 1009, undecoded as well."""
    client = await connected_client(subprotocol=MSGPACK)
    assert (await client.request({"type": "heartbeat", "id": 1}))["type"] == "heartbeat_ack"

    reply = await client.request({"type": "heartbeat", "id": "small"})
    assert reply["code"] == "RATE_LIMITED" and reply["id"] == "small"

    await client.send_payload(empty_maps_frame(push_settings.MAX_FRAME_BYTES, request_id="big"))
    reply = await client.recv()
    assert reply["code"] == "RATE_LIMITED" and "id" not in reply
    over_the_limit = push_settings.MAX_FRAME_BYTES * 4
    await client.send_payload(empty_maps_frame(over_the_limit, request_id="big"))
    reply = await client.recv()
    assert reply["code"] == "MESSAGE_TOO_LARGE" and "id" not in reply
    assert await client.expect_close() == CloseCode.TOO_LARGE
    # (The client's replies decode here too: only the big frames are the node's.)
    assert max(decoded_sizes) < 1000, "refused frames were decoded"
    await client.close()


@override_settings(
    # Three frames of the largest size go in (the third puts the address in debt).
    PUSH={"ADDRESS_FRAME_BURST_BYTES": 5 * 1_048_576 // 2, "ADDRESS_FRAME_BYTES_PER_SEC": 1}
)
async def test_large_frames_are_charged_by_size_before_they_are_decoded(
    decoded_sizes: list[int],
) -> None:
    """Frames within the frame rate may still cost the node much to decode (a 1 MiB
    frame of one-byte empty maps, ~90 ms): those over 8 KiB take their size from the
    address's byte budget first, and once it is spent are refused unread, as frames
    over the rate are. Small frames still pass."""
    client = await connected_client(subprotocol=MSGPACK, client_address=("192.0.2.7", 40000))
    big = empty_maps_frame(push_settings.MAX_FRAME_BYTES, request_id="big")
    for _ in range(3):  # the burst: decoded (an unknown field of a heartbeat)
        await client.send_payload(big)
        assert (await client.recv())["type"] == "heartbeat_ack"
    decoded = len(decoded_sizes)
    for _ in range(3):
        await client.send_payload(big)
        reply = await client.recv()
        assert reply["code"] == "RATE_LIMITED" and "id" not in reply
    assert max(decoded_sizes[decoded:]) < 1000, "refused frames were decoded"
    reply = await client.request({"type": "heartbeat", "id": "small"})
    assert reply["type"] == "heartbeat_ack"
    await client.close()


@override_settings(PUSH={"MAX_FRAME_BYTES": 20_000})
async def test_published_data_is_bounded_as_the_json_text_it_is_stored_as(
    publisher_token: str,
) -> None:
    """docs/security.md: "Message data counts as its JSON text's length", and a history
    page holds at least one message, "which PUSH_MAX_FRAME_BYTES bounds". A signed-in
    user's MessagePack frame under the limit must not store a message six times over
    it."""
    client = await connected_client(subprotocol=MSGPACK, token=publisher_token)
    values = push_settings.MAX_FRAME_BYTES - 100
    frame = msgpack.packb(
        {"type": "publish", "channel": "hostile-growth", "data": [False] * values, "id": 1}
    )
    assert len(frame) <= push_settings.MAX_FRAME_BYTES
    await client.send_payload(frame)
    reply = await client.recv()
    await client.close()
    assert reply["type"] == "error", f"stored as {6 * values:,} characters of JSON text"
    assert reply["code"] == "INVALID_MESSAGE" and "JSON text" in reply["message"]


def _unknown_varints_frame(nbytes: int, field_number: int) -> bytes:
    """A Protocol Buffers heartbeat followed by two-byte (or three-byte) fields the schema
    does not know, or knows with another wire type, up to about ``nbytes``."""
    from push.wire.codecs.protobuf_codec import ProtobufCodec

    base = ProtobufCodec().encode({"type": "heartbeat"})
    tag = (field_number << 3).to_bytes(1, "big") if field_number < 16 else b"\xc0\x3e"
    field = tag + b"\x01"
    return base + field * ((nbytes - len(base)) // len(field))


@pytest.mark.parametrize("field_number", [1, 1000], ids=["known-wrong-type", "unknown"])
def test_a_protobuf_frame_of_many_unknown_fields_is_refused_unread(field_number: int) -> None:
    """Each unknown field was read into an object of its own to look for a known one of
    the wrong wire type: a 1 MiB frame of them took 210-400 ms to decode."""
    from common.errors import PushError
    from push.wire.codecs.protobuf_codec import ProtobufCodec

    frame = _unknown_varints_frame(push_settings.MAX_FRAME_BYTES, field_number)
    started = time.perf_counter()
    with pytest.raises(PushError) as refused:
        ProtobufCodec().decode(frame)
    spent = time.perf_counter() - started
    assert refused.value.code.value == "INVALID_JSON"
    assert spent < 0.05, f"{spent * 1000:.0f} ms to refuse it"


def test_a_few_unknown_protobuf_fields_are_still_ignored_and_a_big_publish_decodes() -> None:
    from push.wire.codecs.protobuf_codec import MAX_UNKNOWN_FIELD_BYTES, ProtobufCodec

    codec = ProtobufCodec()
    newer = _unknown_varints_frame(MAX_UNKNOWN_FIELD_BYTES, 1000)
    assert codec.decode(newer) == {"type": "heartbeat"}
    data = "x" * (push_settings.MAX_FRAME_BYTES - 100)
    big = codec.encode({"type": "publish", "channel": "big", "data": data, "id": 1})
    assert codec.decode(big)["data"] == data


def _nested_array_headers_frame(nbytes: int) -> bytes:
    """A MessagePack frame of ``nbytes``: array headers nested as deep as they fit, each
    declaring ``nbytes`` items, and none of the items (a value cut short)."""
    header = b"\xdc" + struct.pack(">H", nbytes)
    depth = nbytes // len(header)
    return header * depth + b"\xc0" * (nbytes - len(header) * depth)


@pytest.mark.parametrize("nbytes", [1024, 8192])
def test_a_msgpack_frame_of_empty_nested_arrays_is_refused_before_they_are_made(
    nbytes: int,
) -> None:
    """The decoder made each list at the length its header declared before it found the
    items missing: an 8 KiB frame (too small to be charged by size) held 64 MB of lists
    and took ~150 ms to refuse, and one anonymous client may send 200 a second."""
    frame = _nested_array_headers_frame(nbytes)
    tracemalloc.start()
    try:
        with pytest.raises(PushError) as refused:
            MsgpackCodec().decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code is ErrorCode.INVALID_JSON
    # (What any refusal holds besides: the decoder's buffer, the exception.)
    assert peak < 256 * 1024 + 16 * nbytes, f"{peak:,} bytes held to refuse {nbytes:,}"


def test_a_whole_msgpack_frame_of_nested_arrays_still_decodes() -> None:
    value: Any = list(range(100))
    for _ in range(60):
        value = [value, "x" * 20]
    frame = msgpack.packb({"type": "publish", "channel": "deep", "data": value, "id": 1})
    assert MsgpackCodec().decode(frame)["data"] == value


def _presence_request_of_members(nbytes: int, request_id: str) -> bytes:
    """A Protocol Buffers ``presence`` request of about ``nbytes`` that carries empty
    members (two bytes each), which only the server's answer has."""
    from push.wire.proto import push_pb2

    frame = push_pb2.Envelope(id_str=request_id)
    frame.presence.channel = "presence-room"
    members = frame.presence.members
    for _ in range(nbytes // 2 - 16):
        members.add()
    return frame.SerializeToString()


async def test_a_protobuf_request_is_not_made_of_fields_only_answers_carry() -> None:
    """A ``presence`` request has a channel; its answer has members. Every member a
    client put in its request was made into a map: a 1 MiB frame of empty ones held
    ~36 MB of them and took ~480 ms, five times the costliest frame of the other
    formats (docs/security.md, known gaps)."""
    client = await connected_client(subprotocol="v1.protobuf")
    frame = _presence_request_of_members(push_settings.MAX_FRAME_BYTES, "who")
    assert len(frame) <= push_settings.MAX_FRAME_BYTES
    tracemalloc.start()
    try:
        await client.send_payload(frame)
        reply = await client.recv()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await client.close()
    assert reply["code"] == "FORBIDDEN" and reply["id"] == "who"
    # (The frame itself, and the copies the test client and the codec make of it.)
    assert peak < 8 * len(frame), f"{peak:,} bytes held for a frame of {len(frame):,}"


@pytest.mark.parametrize("kind", ["\x00" * 8000, [0] * 8000], ids=["nuls", "list"])
async def test_an_unknown_type_is_named_in_a_few_characters(kind: Any) -> None:
    """The error repeated the unknown ``type`` whole, as Python writes it: a MessagePack
    frame of 8 KiB was answered with up to 32 KiB, four times what it cost to send."""
    client = await connected_client(subprotocol=MSGPACK)
    frame = msgpack.packb({"type": kind, "id": 1})
    await client.send_payload(frame)
    reply = await client.recv()
    await client.close()
    assert (reply["code"], reply["id"]) == ("UNKNOWN_MESSAGE_TYPE", 1)
    assert len(msgpack.packb(reply)) < 200 < len(frame)
