"""Hypothesis strategies for envelopes and frames, shared by the codec unit tests and the
fuzzing of the real consumer, so both draw from the same shapes."""

from __future__ import annotations

import json
from typing import Any

import msgpack
from hypothesis import strategies as st

from push.wire import protocol
from push.wire.codecs import Codec, UnencodableEnvelope
from push.wire.codecs.protobuf_codec import _SCHEMA, ENVELOPE_TYPES, _Kind

INT64_MAX = 2**63 - 1
REQUEST_TYPES = ["heartbeat", "presence", "publish", "subscribe", "unsubscribe"]
# The channel the consumer fuzz's observers subscribe to.
OBSERVED_CHANNEL = "fuzz"
# Valid names of every kind (public, private, presence, a user's), so that drawn
# requests get past validation to the permission checks and the handlers.
CHANNEL_NAMES = [OBSERVED_CHANNEL, "news", "private-room", "presence-lobby", "user:1"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=protocol.INT64_MIN, max_value=protocol.UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
# Every value ``data`` may hold: what a publish is answered ``published`` for.
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
channel_names = st.sampled_from(CHANNEL_NAMES) | st.text(max_size=12)
request_ids = st.integers(-(2**63), INT64_MAX) | st.text(max_size=64)
# Signed subscription tokens are "<payload>.<signature>": the dotted form reaches the
# signature check, a dot-less one stops at the format check.
_token_parts = st.text(max_size=12)
subscription_tokens = st.text(max_size=16) | st.builds("{}.{}".format, _token_parts, _token_parts)
# Lone UTF-16 surrogates: not UTF-8, so only JSON can carry them (as \ud800 escapes).
lone_surrogates = st.sampled_from(["\ud800", "x\udfff"])

# Anything a hostile client could put in a map: wrong types, odd keys, huge numbers.
wild_values = st.recursive(
    scalars
    | st.integers()
    | st.floats()
    | st.binary(max_size=8)
    | st.sampled_from([*REQUEST_TYPES, *CHANNEL_NAMES, "x" * 65]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), children, max_size=4)
    ),
    max_leaves=15,
)
wild_envelopes = st.dictionaries(
    st.sampled_from(["type", "channel", "since", "token", "data", "id"]) | st.text(max_size=5),
    wild_values,
    max_size=6,
)
# Requests of a known type with wild fields: most get past decoding to validation,
# permissions and the handlers.
wild_requests = st.fixed_dictionaries(
    {"type": st.sampled_from(REQUEST_TYPES)},
    optional={
        "channel": channel_names | wild_values,
        "since": st.integers() | wild_values,
        "token": subscription_tokens
        | st.builds("{}.{}".format, lone_surrogates, _token_parts)
        | wild_values,
        "data": wild_values | lone_surrogates,
        "id": request_ids | wild_values,
    },
)
valid_channel_names = st.sampled_from(CHANNEL_NAMES)
# Requests that pass validation, of every type: they reach the permission checks and
# the handlers, and publishing ones reach the observed channel's subscribers.
well_formed_requests = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("publish"), "channel": st.just(OBSERVED_CHANNEL), "data": json_values},
        optional={"id": request_ids},
    ),
    st.fixed_dictionaries(
        {"type": st.just("subscribe"), "channel": valid_channel_names},
        optional={
            "since": st.integers(min_value=0, max_value=INT64_MAX),
            "token": subscription_tokens,
            "id": request_ids,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("unsubscribe"), "channel": valid_channel_names},
        optional={"id": request_ids},
    ),
    st.fixed_dictionaries(
        {"type": st.just("presence"), "channel": st.just("presence-lobby") | valid_channel_names},
        optional={"id": request_ids},
    ),
    st.fixed_dictionaries({"type": st.just("heartbeat")}, optional={"id": request_ids}),
)


def _protobuf_envelopes_of(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    by_kind = {
        _Kind.TEXT: st.text(),
        _Kind.INT: st.integers(min_value=-(2**31), max_value=2**31 - 1),
        _Kind.FLOAT: st.floats(allow_nan=False),
        _Kind.FLAG: st.booleans(),
        _Kind.JSON: json_values,
        _Kind.MEMBER: st.fixed_dictionaries({"user_id": st.integers(0, 9) | st.text()}),
        _Kind.MEMBERS: st.lists(st.fixed_dictionaries({"user_id": st.text()}), max_size=3),
    }
    by_key = {"channel": channel_names, "token": subscription_tokens}
    fields = {key: by_key.get(key, by_kind[field.kind]) for key, field in _SCHEMA[kind].items()}
    return st.fixed_dictionaries({"type": st.just(kind)}, optional={**fields, "id": request_ids})


# Every envelope the typed schema can hold, of every kind (server-only kinds included):
# the structures a Protobuf client can send at all.
protobuf_envelopes = st.sampled_from(sorted(ENVELOPE_TYPES)).flatmap(_protobuf_envelopes_of)


def client_frame(codec: Codec, structure: dict[str, Any]) -> bytes | str | None:
    """``structure`` as a client library of the format writes it, or None if that library
    cannot write it (the client could not have sent it either)."""
    try:
        if codec.name == "json":
            return json.dumps(structure)  # NaN and all: the decoder must refuse them
        if codec.name == "msgpack":
            return msgpack.packb(structure, use_bin_type=True)
        return codec.encode(structure)
    except (UnencodableEnvelope, TypeError, ValueError, OverflowError):
        return None
