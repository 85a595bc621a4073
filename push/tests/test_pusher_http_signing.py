"""The Pusher HTTP API's signature checks and the authorization endpoints' signatures,
held to what the official Pusher server library (pusher-http-python) makes: its
requests are built here, never sent, and checked as the server checks them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pusher
import pytest
from pusher.http import Request

from accounts.principals import ANONYMOUS, Grant, Principal
from common.errors import ErrorCode, PushError
from push.services.pusher_apps import PusherApp, channel_auth_valid, user_auth_valid
from push.services.pusher_auth import channel_authorize, pusher_member, user_authenticate
from push.services.pusher_http import (
    PusherRefusal,
    SignedRequest,
    TriggeredEvent,
    api_request_verify,
    batch_read,
    commit_units,
    info_attributes,
    trigger_read,
)

APP = PusherApp(app_id="4242", key="test-key", secret="test-secret")
TOLERANCE_SECS = 600
SOCKET = "1234.5678"
MASTER_KEY = base64.b64encode(bytes(range(32))).decode()


def library(secret: str = APP.secret, **options: Any) -> pusher.Pusher:
    return pusher.Pusher(
        app_id=APP.app_id, key=APP.key, secret=secret, host="127.0.0.1", ssl=False, **options
    )


def signed(request: Request) -> SignedRequest:
    """What the server sees of a request the library built (the query arrives decoded)."""
    return SignedRequest(
        method=request.method,
        paths=(request.path,),
        params=dict(request.query_params),
        body=request.body,
    )


def verify(request: SignedRequest, app: PusherApp | None = APP, now: float | None = None) -> None:
    api_request_verify(
        app, request, now=time.time() if now is None else now, tolerance_secs=TOLERANCE_SECS
    )


def refusal(request: SignedRequest, **kwargs: Any) -> PusherRefusal:
    with pytest.raises(PusherRefusal) as caught:
        verify(request, **kwargs)
    return caught.value


# ----- the HTTP API ------------------------------------------------------------------------


def test_the_librarys_requests_are_accepted() -> None:
    client = library()._pusher_client
    for request in (
        client.trigger.make_request(["a", "b"], "ev", {"x": 1}, "1.2"),
        client.trigger_batch.make_request([{"channel": "a", "name": "ev", "data": "d"}]),
        client.channels_info.make_request("presence-", ["user_count"]),
        client.channel_info.make_request("presence-room", ["subscription_count", "user_count"]),
        client.users_info.make_request("presence-room"),
        client.terminate_user_connections.make_request("42"),
    ):
        verify(signed(request))


def test_a_wrong_secret_is_refused_and_told_what_to_sign() -> None:
    request = signed(library(secret="not-the-secret")._pusher_client.users_info.make_request("x"))
    refused = refusal(request)
    assert refused.status == 401
    assert refused.message.startswith("Invalid signature")
    assert "GET\\n/apps/4242/channels/x/users\\nauth_key=test-key" in refused.message


def test_a_wrong_key_is_refused() -> None:
    request = signed(library()._pusher_client.users_info.make_request("x"))
    other = PusherApp(app_id=APP.app_id, key="other-key", secret=APP.secret)
    assert refusal(request, app=other).message == "Invalid auth_key"


def test_an_unknown_app_is_404() -> None:
    request = signed(library()._pusher_client.users_info.make_request("x"))
    assert refusal(request, app=None).status == 404


@pytest.mark.parametrize("skew", [-TOLERANCE_SECS - 5, TOLERANCE_SECS + 5])
def test_a_stale_or_future_timestamp_is_refused(skew: int) -> None:
    request = signed(library()._pusher_client.trigger.make_request("a", "ev", "d"))
    refused = refusal(request, now=time.time() + skew)
    assert refused.status == 401
    assert refused.message.startswith("Timestamp expired")


def test_a_timestamp_within_the_tolerance_is_accepted() -> None:
    request = signed(library()._pusher_client.trigger.make_request("a", "ev", "d"))
    verify(request, now=time.time() + TOLERANCE_SECS - 5)


def test_a_tampered_body_is_refused() -> None:
    request = signed(library()._pusher_client.trigger.make_request("a", "ev", "small"))
    tampered = SignedRequest(
        request.method, request.paths, request.params, request.body.replace(b"small", b"large")
    )
    refused = refusal(tampered)
    assert (refused.status, refused.message) == (401, "body_md5 does not match the body")


def test_a_body_without_body_md5_is_refused() -> None:
    request = signed(library()._pusher_client.trigger.make_request("a", "ev", "d"))
    params = {k: v for k, v in request.params.items() if k != "body_md5"}
    stripped = SignedRequest(request.method, request.paths, params, request.body)
    # The signature covered body_md5: without it the signature fails first.
    assert refusal(stripped).status == 401


def test_a_changed_query_parameter_breaks_the_signature() -> None:
    request = signed(library()._pusher_client.channels_info.make_request("presence-"))
    changed = SignedRequest(
        request.method, request.paths, {**request.params, "filter_by_prefix": "private-"}, b""
    )
    assert refusal(changed).message.startswith("Invalid signature")


def test_another_path_breaks_the_signature() -> None:
    request = signed(library()._pusher_client.users_info.make_request("presence-a"))
    moved = SignedRequest(
        request.method, ("/apps/4242/channels/presence-b/users",), request.params, b""
    )
    assert refusal(moved).message.startswith("Invalid signature")


def test_any_candidate_path_may_carry_the_signature() -> None:
    request = signed(library()._pusher_client.users_info.make_request("presence-a"))
    verify(SignedRequest(request.method, ("/decoded", request.paths[0]), request.params, b""))


def test_auth_version_must_be_1_0() -> None:
    request = signed(library()._pusher_client.users_info.make_request("x"))
    params = {**request.params, "auth_version": "2.0"}
    assert refusal(SignedRequest("GET", request.paths, params, b"")).status == 401


# ----- reading triggers ----------------------------------------------------------------------


def body_of(request: Request) -> bytes:
    return bytes(request.body)


def test_a_trigger_to_several_channels_is_one_event_per_channel() -> None:
    request = library()._pusher_client.trigger.make_request(["a", "b", "a"], "ev", {"x": 1}, "1.2")
    events, info = trigger_read(body_of(request))
    assert events == [
        TriggeredEvent("a", "ev", '{"x": 1}', "1.2"),
        TriggeredEvent("b", "ev", '{"x": 1}', "1.2"),
    ]
    assert info == ()


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"name": "e", "data": "d"}, 400, "channels"),
        ({"name": "e", "data": "d", "channel": "a", "channels": ["b"]}, 400, "not both"),
        ({"name": "e", "data": "d", "channels": [f"c{n}" for n in range(101)]}, 400, "100"),
        ({"name": "e", "data": "d", "channel": "bad name"}, 400, "Invalid channel"),
        ({"name": "e", "data": "d", "channel": "x" * 165}, 400, "Invalid channel"),
        ({"name": "e" * 201, "data": "d", "channel": "a"}, 400, "200"),
        ({"name": "e", "data": {"not": "a string"}, "channel": "a"}, 400, "data"),
        ({"name": "e", "data": "d", "channel": "a", "socket_id": "nope"}, 400, "socket_id"),
        ({"name": "e", "data": "d", "channel": "a", "info": "cache"}, 400, "info"),
        ([1, 2], 400, "object"),
    ],
)
def test_a_trigger_is_checked_as_pusher_checks_it(body: Any, status: int, says: str) -> None:
    with pytest.raises(PusherRefusal) as caught:
        trigger_read(json.dumps(body).encode())
    assert caught.value.status == status
    assert says in caught.value.message


def test_pushers_channel_characters_are_accepted() -> None:
    events, _ = trigger_read(b'{"name": "e", "data": "d", "channel": "a-_=@,.;Z9"}')
    assert events[0].channel == "a-_=@,.;Z9"


def test_data_over_the_frame_limit_is_413(settings: Any) -> None:
    settings.PUSH = {**settings.PUSH, "MAX_FRAME_BYTES": 100}
    with pytest.raises(PusherRefusal) as caught:
        trigger_read(json.dumps({"name": "e", "data": "x" * 101, "channel": "a"}).encode())
    assert caught.value.status == 413


def test_a_batch_names_the_refused_event() -> None:
    batch = [{"channel": "a", "name": "e", "data": "d"}, {"channel": "a", "name": "e", "data": 1}]
    with pytest.raises(PusherRefusal) as caught:
        batch_read(json.dumps({"batch": batch}).encode())
    assert caught.value.message.startswith("batch[1]: ")


def test_a_batch_holds_at_most_ten_events() -> None:
    batch = [{"channel": "a", "name": "e", "data": "d"}] * 11
    with pytest.raises(PusherRefusal):
        batch_read(json.dumps({"batch": batch}).encode())


def test_info_attributes() -> None:
    assert info_attributes("subscription_count,user_count") == ("subscription_count", "user_count")
    assert info_attributes(None) == ()


def test_commit_units_keep_order_and_share_commits() -> None:
    events = [
        TriggeredEvent("a", "e", "1"),
        TriggeredEvent("b", "e", "2"),
        TriggeredEvent("a", "e", "3", "1.1"),
        TriggeredEvent("a", "e", "4", "1.1"),
        TriggeredEvent("a", "e", "5"),
    ]
    units = commit_units(events)
    assert [(exclude, [e.data for e in unit]) for exclude, unit in units] == [
        (None, ["1", "2"]),
        ("1.1", ["3", "4"]),
        (None, ["5"]),
    ]


def test_a_recent_only_channel_commits_alone(settings: Any) -> None:
    settings.PUSH = {**settings.PUSH, "HISTORY_MODES": [("ticker:*", "recent")]}
    events = [TriggeredEvent(c, "e", "d") for c in ("a", "ticker:1", "ticker:2", "b")]
    units = commit_units(events)
    # The durable channels share one commit, whatever the order they were named in.
    assert [[e.channel for e in unit] for _, unit in units] == [
        ["a", "b"],
        ["ticker:1"],
        ["ticker:2"],
    ]


def test_a_channels_events_never_join_an_earlier_commit_past_its_own(settings: Any) -> None:
    settings.PUSH = {**settings.PUSH, "HISTORY_MODES": [("ticker:*", "recent")]}
    events = [
        TriggeredEvent("a", "e", "1"),
        TriggeredEvent("a", "e", "2", "1.1"),
        TriggeredEvent("ticker:1", "e", "3"),
        TriggeredEvent("b", "e", "4"),
        TriggeredEvent("a", "e", "5"),
    ]
    assert [(exclude, [e.data for e in unit]) for exclude, unit in commit_units(events)] == [
        (None, ["1", "4"]),
        ("1.1", ["2"]),
        (None, ["3"]),
        (None, ["5"]),
    ]


# ----- the authorization endpoints' signatures --------------------------------------------------


def user(*grants: Grant, staff: bool = False) -> Principal:
    return Principal(kind="user", id=7, name="alice", grants=grants, is_staff=staff)


SUBSCRIBE_PRIVATE = Grant("private-*", subscribe=True, publish=False, presence=False)
SUBSCRIBE_PRESENCE = Grant("presence-*", subscribe=True, publish=False, presence=False)
SEE_PRESENCE = Grant("presence-*", subscribe=True, publish=False, presence=True)


def test_a_private_channel_is_signed_as_the_library_signs_it() -> None:
    body = channel_authorize(
        principal=user(SUBSCRIBE_PRIVATE), app=APP, socket_id=SOCKET, channel="private-a"
    )
    assert body == library().authenticate(channel="private-a", socket_id=SOCKET)


def test_a_presence_channel_is_signed_with_the_users_member() -> None:
    body = channel_authorize(
        principal=user(SEE_PRESENCE), app=APP, socket_id=SOCKET, channel="presence-room"
    )
    assert json.loads(body["channel_data"]) == {"user_id": "7", "user_info": {"username": "alice"}}
    assert channel_auth_valid(APP, SOCKET, "presence-room", body["auth"], body["channel_data"])
    expected = hmac.new(
        APP.secret.encode(),
        f"{SOCKET}:presence-room:{body['channel_data']}".encode(),
        hashlib.sha256,
    ).hexdigest()
    assert body["auth"] == f"{APP.key}:{expected}"


def test_presence_needs_the_presence_right_as_the_member_list_does() -> None:
    with pytest.raises(PushError) as caught:
        channel_authorize(
            principal=user(SUBSCRIBE_PRESENCE), app=APP, socket_id=SOCKET, channel="presence-room"
        )
    assert caught.value.code is ErrorCode.FORBIDDEN


@pytest.mark.parametrize("channel", ["private-a", "presence-a"])
def test_no_grant_no_signature(channel: str) -> None:
    with pytest.raises(PushError) as caught:
        channel_authorize(principal=user(), app=APP, socket_id=SOCKET, channel=channel)
    assert caught.value.code is ErrorCode.FORBIDDEN


def test_anonymous_is_refused() -> None:
    with pytest.raises(PushError) as caught:
        channel_authorize(principal=ANONYMOUS, app=APP, socket_id=SOCKET, channel="private-a")
    assert caught.value.code is ErrorCode.FORBIDDEN


@pytest.mark.parametrize(
    ("socket_id", "channel", "field"),
    [
        ("nope", "private-a", "socket_id"),
        (None, "private-a", "socket_id"),
        (SOCKET, "public", "channel_name"),
        (SOCKET, "Private-a", "channel_name"),
        (SOCKET, "private-bad name", "channel_name"),
        (SOCKET, None, "channel_name"),
    ],
)
def test_bad_input_is_invalid(socket_id: Any, channel: Any, field: str) -> None:
    with pytest.raises(PushError) as caught:
        channel_authorize(principal=user(staff=True), app=APP, socket_id=socket_id, channel=channel)
    assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_MESSAGE, field)


def test_an_encrypted_channel_gets_the_librarys_shared_secret(settings: Any) -> None:
    settings.PUSH = {**settings.PUSH, "PUSHER_APP_ENCRYPTION_MASTER_KEY": MASTER_KEY}
    channel = "private-encrypted-a"
    body = channel_authorize(
        principal=user(SUBSCRIBE_PRIVATE), app=APP, socket_id=SOCKET, channel=channel
    )
    expected = library(encryption_master_key_base64=MASTER_KEY).authenticate(
        channel=channel, socket_id=SOCKET
    )
    assert body["auth"] == expected["auth"]
    assert body["shared_secret"] == expected["shared_secret"].decode()


def test_an_encrypted_channel_without_a_master_key_is_refused() -> None:
    with pytest.raises(PushError) as caught:
        channel_authorize(
            principal=user(SUBSCRIBE_PRIVATE),
            app=APP,
            socket_id=SOCKET,
            channel="private-encrypted-a",
        )
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    assert "PUSHER_APP_ENCRYPTION_MASTER_KEY" in caught.value.message


def test_a_malformed_master_key_is_refused_at_start() -> None:
    from common.conf import PushSettings

    with pytest.raises(ValueError, match="PUSHER_APP_ENCRYPTION_MASTER_KEY"):
        PushSettings(PUSHER_APP_ENCRYPTION_MASTER_KEY=base64.b64encode(b"short").decode())


def test_user_sign_in_signs_the_same_member() -> None:
    principal = user()
    body = user_authenticate(principal=principal, app=APP, socket_id=SOCKET)
    member = pusher_member(principal)
    assert json.loads(body["user_data"]) == {"id": "7", "user_info": member["user_info"]}
    assert user_auth_valid(APP, SOCKET, body["user_data"], body["auth"])


def test_user_sign_in_refuses_anonymous() -> None:
    with pytest.raises(PushError) as caught:
        user_authenticate(principal=ANONYMOUS, app=APP, socket_id=SOCKET)
    assert caught.value.code is ErrorCode.FORBIDDEN
