"""Protocol Buffers wire format (``v1.protobuf``, binary frames), schema push/wire/proto/push.proto.

One frame is one ``push.v1.Envelope``; the contract's ``type`` is whichever member of its
``kind`` oneof is set. ``decode`` returns the same plain map as the JSON and MessagePack
codecs (``data`` as a Python value), so ``protocol.parse_request`` validates every format
alike. ``data`` travels as its canonical JSON text (``data_json``): docs/wire-formats.md
says why and what that means for other formats.

The field table is read from the generated descriptors, so push.proto is the one place
a field is written: a string, integer, double, bool or ``Member`` field added there is
carried with no change here (a string named ``<key>_json`` carries the JSON text of
``<key>``), and a field of any other type stops the import, naming the field.

The generated module ``push/wire/proto/push_pb2.py`` (and ``.pyi``) is checked in. After
editing the schema, regenerate it from the repository root with the pinned grpcio-tools;
push/tests/test_protobuf_codec.py fails while the two differ:

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. push/wire/proto/push.proto
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.unknown_fields import UnknownFieldSet

from push.wire import json_text
from push.wire.codecs.base import Codec, Payload, UnencodableEnvelope, WireMessage, undecodable
from push.wire.proto import push_pb2

# The same JSON dialect as the JSON codec and ``message.dump_data``: no NaN/Infinity,
# compact, and UTF-8 rather than \u escapes, so data_json is the stored text itself.
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# For the rare value holding a lone surrogate, which UTF-8 (and so a protobuf string)
# cannot carry raw: \ud800 escapes parse back to the very same value.
_ascii_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


class _Kind(enum.Enum):
    TEXT = "a string"
    INT = "an integer"
    FLOAT = "a number"
    FLAG = "a boolean"
    JSON = "a JSON value"
    MEMBER = "a member map"
    MEMBERS = "a list of member maps"


@dataclass(frozen=True, slots=True)
class _Field:
    key: str  # the contract's name, used in the plain map
    kind: _Kind
    # proto3 ``optional``: set only when present, so absent and 0/false stay apart.
    optional: bool = False

    @property
    def proto_name(self) -> str:
        return f"{self.key}_json" if self.kind is _Kind.JSON else self.key


# Read from the generated descriptors, so push.proto is the one place a field is written:
# a field added there is encoded and decoded here with nothing else to change, and a
# field of a type this codec does not map fails at import, naming the field.
_SCALAR_KINDS = {
    FieldDescriptor.TYPE_STRING: _Kind.TEXT,
    FieldDescriptor.TYPE_INT32: _Kind.INT,
    FieldDescriptor.TYPE_INT64: _Kind.INT,
    FieldDescriptor.TYPE_SINT32: _Kind.INT,
    FieldDescriptor.TYPE_SINT64: _Kind.INT,
    FieldDescriptor.TYPE_DOUBLE: _Kind.FLOAT,
    FieldDescriptor.TYPE_BOOL: _Kind.FLAG,
}
_JSON_SUFFIX = "_json"  # a string field named ``<key>_json`` carries the JSON text of <key>


def _field_of(descriptor: FieldDescriptor) -> _Field:
    name = descriptor.name
    if descriptor.message_type is push_pb2.Member.DESCRIPTOR:
        return _Field(name, _Kind.MEMBERS if descriptor.is_repeated else _Kind.MEMBER)
    kind = _SCALAR_KINDS.get(descriptor.type)
    if kind is None or descriptor.is_repeated:
        raise TypeError(f"the protobuf codec maps no field like {descriptor.full_name}")
    if kind is _Kind.TEXT and name.endswith(_JSON_SUFFIX):
        return _Field(name.removesuffix(_JSON_SUFFIX), _Kind.JSON)
    return _Field(name, kind, optional=descriptor.has_presence)


def _body_fields(member: Any) -> dict[str, _Field]:
    # Any: the stubs give the oneof's fields as either runtime's FieldDescriptor (upb or
    # pure Python), which share no declared base.
    body = member.message_type
    if body is None:
        raise TypeError(f"{member.full_name} in the envelope's kind is not a message")
    return {field.key: field for field in map(_field_of, body.fields)}


_ENVELOPE = push_pb2.Envelope.DESCRIPTOR

# Envelope type (= the oneof member's name) -> the fields of its message, in the order
# push.proto declares them.
_SCHEMA: dict[str, dict[str, _Field]] = {
    member.name: _body_fields(member) for member in _ENVELOPE.oneofs_by_name["kind"].fields
}

# What the server reads of a client's frame: the same, without the member fields that
# only server envelopes (``presence`` answers, ``join``, ``leave``) carry.
_MEMBER_KINDS = (_Kind.MEMBER, _Kind.MEMBERS)
_REQUEST_SCHEMA: dict[str, dict[str, _Field]] = {
    kind: {key: field for key, field in fields.items() if field.kind not in _MEMBER_KINDS}
    for kind, fields in _SCHEMA.items()
}

ENVELOPE_TYPES: frozenset[str] = frozenset(_SCHEMA)
_KEY_BY_PROTO_NAME: dict[str, dict[str, str]] = {
    kind: {field.proto_name: field.key for field in fields.values()}
    for kind, fields in _SCHEMA.items()
}
_ENVELOPE_ID_FIELDS = frozenset(field.name for field in _ENVELOPE.oneofs_by_name["id"].fields)


class ProtobufCodec(Codec):
    name = "protobuf"
    subprotocol = "v1.protobuf"
    binary = True

    def decode(self, payload: Payload) -> dict[str, Any]:
        return _decode(payload, _SCHEMA)

    def decode_request(self, payload: Payload) -> dict[str, Any]:
        # Members are made one Python map each (~1 us, against 2 bytes on the wire): a
        # 1 MiB ``presence`` request of empty members cost ~480 ms to decode, where
        # the request reads only its channel. Only server envelopes carry members.
        return _decode(payload, _REQUEST_SCHEMA)

    def encode(self, envelope: dict[str, Any]) -> bytes:
        if not isinstance(envelope, Mapping):
            raise UnencodableEnvelope(f"an envelope must be a map, not {type(envelope).__name__}")
        frame = push_pb2.Envelope()
        _set_request_id(frame, envelope.get("id"))
        kind = envelope.get("type")
        fields = _fields_of(kind)
        body: ProtoMessage = frame
        if kind is not None:
            body = getattr(frame, kind)
            body.SetInParent()  # selects the oneof member even when it has no field set
        for key, value in envelope.items():
            if key in ("type", "id"):
                continue
            field = fields.get(key)
            if field is None:
                raise UnencodableEnvelope(
                    f"a protobuf {kind or 'type-less'} envelope has no field {key!r}"
                )
            _set_field(body, field, value)
        return frame.SerializeToString()

    def encode_message(self, message: WireMessage) -> bytes:
        # The fan-out path: once per message per node. data_json is copied as it is, so
        # the published value is never parsed again.
        frame = push_pb2.Envelope()
        body = frame.message
        body.channel = message.channel
        body.seq = message.seq
        body.message_id = message.message_id
        body.timestamp = message.timestamp
        _set_json_text(body, "data_json", message.data_json, lambda: message.data)
        return frame.SerializeToString()


# ----- decoding ----------------------------------------------------------------------


# A frame's fields this schema does not know are read one by one (``UnknownFieldSet``,
# ~0.7 us a field) to find a known field sent with the wrong wire type: measured, a
# 1 MiB frame of two-byte unknown fields took 210-400 ms to decode, against ~10 us for
# a small frame. A newer schema's fields are a few small ones; a frame carrying more
# than this many bytes of them is refused before they are read (at most ~3 ms).
MAX_UNKNOWN_FIELD_BYTES = 8192


def _parse_frame(payload: Payload) -> push_pb2.Envelope:
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    try:
        frame = push_pb2.Envelope.FromString(payload)
    except Exception as exc:  # DecodeError, and whatever else hostile bytes provoke
        raise undecodable(f"not a push.v1.Envelope: {type(exc).__name__}") from exc
    # (A frame no larger than the bound cannot pass it: most frames need no copy.)
    if len(payload) > MAX_UNKNOWN_FIELD_BYTES and (
        _unknown_field_bytes(frame) > MAX_UNKNOWN_FIELD_BYTES
    ):
        raise undecodable(
            f"more than {MAX_UNKNOWN_FIELD_BYTES} bytes of fields push.v1 does not know"
        )
    return frame


def _unknown_field_bytes(frame: push_pb2.Envelope) -> int:
    """The bytes of ``frame``'s unknown fields, its messages' included, without reading
    them one by one: its size less that of a copy without them (C code, a copy of the
    frame's bytes)."""
    known = push_pb2.Envelope()
    known.CopyFrom(frame)
    known.DiscardUnknownFields()
    return frame.ByteSize() - known.ByteSize()


def _decode(payload: Payload, schema: dict[str, dict[str, _Field]]) -> dict[str, Any]:
    frame = _parse_frame(payload)
    envelope: dict[str, Any] = {}
    kind = frame.WhichOneof("kind")
    if kind is not None:  # none set: the protocol answers UNKNOWN_MESSAGE_TYPE
        envelope["type"] = kind
        _decode_body(kind, getattr(frame, kind), envelope, schema)
    _decode_request_id(frame, envelope)
    return envelope


def _decode_body(
    kind: str, body: ProtoMessage, envelope: dict[str, Any], schema: dict[str, dict[str, _Field]]
) -> None:
    for field in schema[kind].values():
        _GETTERS[field.kind](body, field, envelope)
    for name, raw in _wrong_wire_types(body).items():
        envelope[_KEY_BY_PROTO_NAME[kind][name]] = raw


def _decode_request_id(frame: push_pb2.Envelope, envelope: dict[str, Any]) -> None:
    id_field = frame.WhichOneof("id")
    if id_field is not None:
        envelope["id"] = getattr(frame, id_field)
    for name, raw in _wrong_wire_types(frame).items():
        if name in _ENVELOPE_ID_FIELDS:
            envelope["id"] = raw


def _get_scalar(body: ProtoMessage, field: _Field, out: dict[str, Any]) -> None:
    if field.optional and not body.HasField(field.key):
        return
    out[field.key] = getattr(body, field.key)


def _get_json(body: ProtoMessage, field: _Field, out: dict[str, Any]) -> None:
    text = getattr(body, field.proto_name)
    if text:  # empty means absent: the JSON text of any value has a character at least
        out[field.key] = _parse_json(text, field.proto_name)


def _get_member(body: ProtoMessage, field: _Field, out: dict[str, Any]) -> None:
    if body.HasField(field.key):
        out[field.key] = _decode_member(getattr(body, field.key))


def _get_members(body: ProtoMessage, field: _Field, out: dict[str, Any]) -> None:
    # A repeated field cannot tell "no members" from "none sent": always give a list, so
    # an empty presence answer reads as the JSON one does.
    out[field.key] = [_decode_member(member) for member in getattr(body, field.key)]


_GETTERS: dict[_Kind, Callable[[ProtoMessage, _Field, dict[str, Any]], None]] = {
    _Kind.TEXT: _get_scalar,
    _Kind.INT: _get_scalar,
    _Kind.FLOAT: _get_scalar,
    _Kind.FLAG: _get_scalar,
    _Kind.JSON: _get_json,
    _Kind.MEMBER: _get_member,
    _Kind.MEMBERS: _get_members,
}


def _wrong_wire_types(message: ProtoMessage) -> dict[str, bytes]:
    """Fields of the schema that arrived with another wire type (a string where an
    integer belongs): proto name -> the field's raw bytes (empty unless length-delimited).

    Parsers keep such a field as an unknown one, so it would read as absent and a
    ``since`` sent as a string would silently subscribe without replay. Put back as
    bytes, which no contract field accepts, it is refused as INVALID_MESSAGE, a field of
    the wrong type, the same answer as in JSON and MessagePack. Unknown field numbers
    (a newer schema's fields) are still ignored.
    """
    try:
        unknown = UnknownFieldSet(message)
        if not len(unknown):
            return {}
        known = message.DESCRIPTOR.fields_by_number
        return {
            known[field.field_number].name: field.data if isinstance(field.data, bytes) else b""
            for field in unknown  # type: ignore[attr-defined]  # iterable by index, stubs lack __iter__
            if field.field_number in known
        }
    except Exception as exc:  # groups nested in hostile bytes and the like
        raise undecodable(f"unreadable unknown fields: {type(exc).__name__}") from exc


def _decode_member(member: push_pb2.Member) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    id_field = member.WhichOneof("user_id")
    if id_field is not None:
        decoded["user_id"] = getattr(member, id_field)
    if member.info_json:
        decoded["info"] = _parse_json(member.info_json, "info_json")
    return decoded


def _parse_json(text: str, name: str) -> Any:
    try:
        return json_text.loads(text)
    except (ValueError, RecursionError) as exc:
        raise undecodable(f"'{name}' is not JSON text: {exc}"[:200]) from exc


# ----- encoding ----------------------------------------------------------------------


def _fields_of(kind: object) -> dict[str, _Field]:
    if kind is None:
        return {}
    if not isinstance(kind, str) or kind not in _SCHEMA:
        raise UnencodableEnvelope(f"protobuf has no envelope type {kind!r}")
    return _SCHEMA[kind]


def _set_request_id(frame: push_pb2.Envelope, request_id: object) -> None:
    if request_id is None:
        return
    if isinstance(request_id, str):
        frame.id_str = request_id
    elif isinstance(request_id, int) and not isinstance(request_id, bool):
        _assign(frame, "id_int", request_id, "id")
    else:
        raise UnencodableEnvelope(
            f"'id' must be a string or an integer, not {type(request_id).__name__}"
        )


def _set_field(body: ProtoMessage, field: _Field, value: Any) -> None:
    if value is None and field.kind is not _Kind.JSON:
        return  # None means absent, as in protocol.py's maps; for data it is JSON null
    _SETTERS[field.kind](body, field, value)


def _wrong_type(field: _Field, value: object) -> UnencodableEnvelope:
    return UnencodableEnvelope(
        f"'{field.key}' must be {field.kind.value} in protobuf, not {type(value).__name__}"
    )


def _set_text(body: ProtoMessage, field: _Field, value: Any) -> None:
    if not isinstance(value, str):
        raise _wrong_type(field, value)
    _assign(body, field.key, value, field.key)


def _set_int(body: ProtoMessage, field: _Field, value: Any) -> None:
    # bool is an int in Python but a different type on the wire contract.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(field, value)
    _assign(body, field.key, value, field.key)


def _set_float(body: ProtoMessage, field: _Field, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(field, value)
    if isinstance(value, int) and float(value) != value:
        raise UnencodableEnvelope(f"'{field.key}' = {value} is not exact as a double")
    _assign(body, field.key, float(value), field.key)


def _set_flag(body: ProtoMessage, field: _Field, value: Any) -> None:
    if not isinstance(value, bool):
        raise _wrong_type(field, value)
    setattr(body, field.key, value)


def _set_json(body: ProtoMessage, field: _Field, value: Any) -> None:
    _set_json_text(body, field.proto_name, _json_text(value, field.key), lambda: value)


def _set_member(body: ProtoMessage, field: _Field, value: Any) -> None:
    _fill_member(getattr(body, field.key), value)


def _set_members(body: ProtoMessage, field: _Field, value: Any) -> None:
    if not isinstance(value, list | tuple):
        raise _wrong_type(field, value)
    members = getattr(body, field.key)
    for member in value:
        _fill_member(members.add(), member)


_SETTERS: dict[_Kind, Callable[[ProtoMessage, _Field, Any], None]] = {
    _Kind.TEXT: _set_text,
    _Kind.INT: _set_int,
    _Kind.FLOAT: _set_float,
    _Kind.FLAG: _set_flag,
    _Kind.JSON: _set_json,
    _Kind.MEMBER: _set_member,
    _Kind.MEMBERS: _set_members,
}


def _fill_member(target: push_pb2.Member, member: Any) -> None:
    if not isinstance(member, Mapping):
        raise UnencodableEnvelope(f"a member must be a map, not {type(member).__name__}")
    unknown = set(member) - {"user_id", "info"}
    if unknown:
        raise UnencodableEnvelope(f"a protobuf member has no field {sorted(map(str, unknown))}")
    user_id = member.get("user_id")
    if isinstance(user_id, str):
        target.user_id_str = user_id
    elif isinstance(user_id, int) and not isinstance(user_id, bool):
        _assign(target, "user_id_int", user_id, "user_id")
    elif user_id is not None:
        raise UnencodableEnvelope(
            f"'user_id' must be a string or an integer, not {type(user_id).__name__}"
        )
    if "info" in member:
        info = member["info"]
        _set_json_text(target, "info_json", _json_text(info, "info"), lambda: info)


def _assign(target: ProtoMessage, name: str, value: Any, key: str) -> None:
    # The runtime checks ranges (int64, int32) and UTF-8: turn its errors into ours.
    try:
        setattr(target, name, value)
    except (TypeError, ValueError) as exc:
        raise UnencodableEnvelope(f"'{key}' does not fit the protobuf schema: {exc}") from exc


def _json_text(value: Any, key: str) -> str:
    try:
        text = _encoder.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:  # NaN, bytes, cycles, depth
        raise UnencodableEnvelope(f"'{key}' is not a JSON value: {exc}") from exc
    _check_string_keys(value, key)
    return text


def _check_string_keys(value: Any, key: str) -> None:
    # json turns a key 1 into "1" silently; the other formats would refuse it, so we do.
    # Runs after json.dumps, which has already refused cycles, so this walk ends.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for name, child in item.items():
                if not isinstance(name, str):
                    raise UnencodableEnvelope(f"'{key}' object keys must be strings, not {name!r}")
                pending.append(child)
        elif isinstance(item, list | tuple):
            pending.extend(item)


def _set_json_text(target: ProtoMessage, name: str, text: str, value_of: Callable[[], Any]) -> None:
    try:
        setattr(target, name, text)
    except UnicodeEncodeError:
        # A lone surrogate cannot be UTF-8; its \u escape parses back to the same value.
        setattr(target, name, _ascii_encoder.encode(value_of()))
