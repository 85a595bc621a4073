"""The Pusher codec and the mapping between the protocols (push/wire/pusher.py), and the
signatures Pusher defines (push/services/pusher_apps.py), checked against values
computed independently here."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from push.fanout.message import ChannelMessage
from push.services.pusher_apps import (
    PusherApp,
    channel_auth,
    channel_auth_valid,
    http_signature,
    http_string_to_sign,
    user_auth_valid,
)
from push.wire.protocol import presence_change
from push.wire.pusher import (
    PUSHER_CODEC,
    SOCKET_ID,
    as_pusher_event,
    message_data,
    new_socket_id,
    presence_data,
)

APP = PusherApp(app_id="1", key="k", secret="s")


def _message(data: object) -> ChannelMessage:
    return ChannelMessage(
        channel="c", seq=1, message_id="m", data_json=json.dumps(data), timestamp=1.0
    )


@pytest.mark.parametrize(
    ("data", "event", "text"),
    [
        ({"event": "e", "data": "plain"}, "e", "plain"),
        ({"event": "e", "data": {"a": 1}}, "e", '{"a":1}'),
        ({"event": "e", "data": None}, "e", "null"),
        ({"event": 5, "data": "x"}, "message", '{"event":5,"data":"x"}'),
        ({"event": "e"}, "message", '{"event":"e"}'),
        # Pusher's own events are the server's to send, never a publisher's.
        (
            {"event": "pusher_internal:member_added", "data": "x"},
            "message",
            '{"event":"pusher_internal:member_added","data":"x"}',
        ),
        ({"event": "pusher:error", "data": "x"}, "message", '{"event":"pusher:error","data":"x"}'),
        ({"event": "pusher-ish", "data": "x"}, "pusher-ish", "x"),
        ([1, 2], "message", "[1,2]"),
        ("text", "message", '"text"'),
        ({"ü": "é"}, "message", '{"ü":"é"}'),
    ],
)
def test_a_message_reaches_pusher_clients_as_the_contract_maps_it(
    data: object, event: str, text: str
) -> None:
    assert as_pusher_event(data) == (event, text)
    frame = json.loads(PUSHER_CODEC.encode_message(_message(data)))
    assert frame == {"event": event, "channel": "c", "data": text}


def test_a_pusher_event_is_stored_as_event_and_data_and_maps_back() -> None:
    assert message_data("e", "d") == {"event": "e", "data": "d"}
    assert as_pusher_event(message_data("e", "d")) == ("e", "d")


def test_presence_changes_become_member_events_with_string_ids() -> None:
    join = json.loads(
        PUSHER_CODEC.encode(
            presence_change(
                kind="join", channel="presence-r", member={"user_id": 5, "info": {"n": 1}}
            )
        )
    )
    assert join == {
        "event": "pusher_internal:member_added",
        "channel": "presence-r",
        "data": '{"user_id":"5","user_info":{"n":1}}',
    }
    leave = json.loads(
        PUSHER_CODEC.encode(
            presence_change(kind="leave", channel="presence-r", member={"user_id": "a", "info": {}})
        )
    )
    assert leave["event"] == "pusher_internal:member_removed"
    assert json.loads(leave["data"]) == {"user_id": "a"}
    assert presence_data([{"user_id": 5, "info": {}}, {"user_id": "a", "info": {"x": 1}}]) == {
        "presence": {"ids": ["5", "a"], "hash": {"5": {}, "a": {"x": 1}}, "count": 2}
    }


def test_socket_ids_look_like_pushers() -> None:
    ids = {new_socket_id() for _ in range(100)}
    assert len(ids) == 100 and all(SOCKET_ID.match(i) for i in ids)


def test_channel_signatures_are_pushers_hmac_and_bound_to_the_socket() -> None:
    expected = hmac.new(b"s", b"1.2:private-x", hashlib.sha256).hexdigest()
    assert channel_auth(APP, "1.2", "private-x", None) == f"k:{expected}"
    assert channel_auth_valid(APP, "1.2", "private-x", f"k:{expected}", None)
    assert not channel_auth_valid(APP, "1.3", "private-x", f"k:{expected}", None)
    assert not channel_auth_valid(APP, "1.2", "private-y", f"k:{expected}", None)
    assert not channel_auth_valid(APP, "1.2", "private-x", None, None)
    assert not channel_auth_valid(APP, "1.2", "private-x", "k:\ud800", None)
    data = '{"user_id":"u"}'
    signed = channel_auth(APP, "1.2", "presence-x", data)
    assert channel_auth_valid(APP, "1.2", "presence-x", signed, data)
    assert not channel_auth_valid(APP, "1.2", "presence-x", signed, '{"user_id":"v"}')


def test_user_signatures_cover_the_user_data() -> None:
    sig = hmac.new(b"s", b'1.2::user::{"id":"u"}', hashlib.sha256).hexdigest()
    assert user_auth_valid(APP, "1.2", '{"id":"u"}', f"k:{sig}")
    assert not user_auth_valid(APP, "1.2", '{"id":"v"}', f"k:{sig}")


def test_http_api_string_to_sign_is_pushers() -> None:
    params = {
        "auth_key": "k",
        "auth_timestamp": "100",
        "auth_version": "1.0",
        "Body_MD5": "x",
        "auth_signature": "ignored",
    }
    assert http_string_to_sign("post", "/apps/1/events", params) == (
        "POST\n/apps/1/events\nauth_key=k&auth_timestamp=100&auth_version=1.0&body_md5=x"
    )
    signed = http_string_to_sign("post", "/apps/1/events", params)
    assert (
        http_signature("s", "post", "/apps/1/events", params)
        == hmac.new(b"s", signed.encode(), hashlib.sha256).hexdigest()
    )
