"""Signed subscription tokens on REST reads (``X-Subscription-Token``): a token opens its
channel's history and details as it opens a WebSocket subscribe, refused for the same
reasons with the same error, and never opens a publish."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from rest_framework.test import APIClient

from accounts.subscription_tokens import subscription_token_issue
from push.services.publishing import message_publish
from push.tests.wsclient import connected_client

pytestmark = pytest.mark.django_db(transaction=True)

CHANNEL = "private-room-7"


def _history(token: str | None, url: str = f"/api/v1/channels/{CHANNEL}/messages") -> Any:
    headers = {} if token is None else {"HTTP_X_SUBSCRIPTION_TOKEN": token}
    return APIClient().get(url, **headers)


def _tampered(kind: str) -> str:
    """A token the verifier refuses, one way or another."""
    token = subscription_token_issue(channel=CHANNEL, ttl_secs=60)
    payload, signature = token.split(".")
    if kind == "expired":
        return subscription_token_issue(channel=CHANNEL, ttl_secs=-1)
    if kind == "another channel":
        return subscription_token_issue(channel="private-room-8", ttl_secs=60)
    if kind == "bad signature":
        # The first character: all six of its bits are the signature's (the last one's
        # low bits are padding, and a changed last character may decode the same).
        return f"{payload}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"
    if kind == "forged payload":
        forged = json.dumps({"ch": CHANNEL, "exp": int(time.time()) + 600}).encode()
        return base64.urlsafe_b64encode(forged).rstrip(b"=").decode() + "." + signature
    if kind == "bad user_id":
        return subscription_token_issue(channel=CHANNEL, ttl_secs=60, user_id="x" * 129)
    return "not-a-token"


TAMPERED = ["expired", "another channel", "bad signature", "forged payload", "bad user_id", "junk"]


def test_a_token_opens_the_history_of_its_channel_page_after_page() -> None:
    for n in range(5):
        message_publish(channel=CHANNEL, data=n)
    token = subscription_token_issue(channel=CHANNEL, ttl_secs=60)
    assert _history(None).status_code == 403, "without the token: closed"

    page = _history(token, f"/api/v1/channels/{CHANNEL}/messages?since=1&limit=2").json()
    assert [m["data"] for m in page["results"]] == [1, 2]
    assert token not in page["next"], "the token stays out of URLs (and access logs)"
    # The next page with the header again, as the clients send it.
    page = _history(token, page["next"]).json()
    assert [m["seq"] for m in page["results"]] == [4, 5]
    assert page["next"] is None


def test_a_token_opens_the_channels_details_but_not_its_presence_list() -> None:
    channel = "presence-room-7"
    message_publish(channel=channel, data="hi")
    token = subscription_token_issue(channel=channel, ttl_secs=60, user_id="ann")
    headers = {"HTTP_X_SUBSCRIPTION_TOKEN": token}
    api = APIClient()
    details = api.get(f"/api/v1/channels/{channel}", **headers)
    assert details.status_code == 200
    assert details.json() == {
        "channel": channel,
        "last_seq": 1,
        "subscribers": 0,
        "presence_members": 0,
    }
    assert api.get(f"/api/v1/channels/{channel}").status_code == 403
    # The member list needs the presence right, as it does without a token.
    assert api.get(f"/api/v1/channels/{channel}/presence", **headers).status_code == 403


@pytest.mark.parametrize("kind", TAMPERED)
def test_a_refused_token_is_403_forbidden_with_the_verifiers_reason(kind: str) -> None:
    message_publish(channel=CHANNEL, data=1)
    token = _tampered(kind)
    response = _history(token)
    assert response.status_code == 403
    body = response.json()
    assert body["code"] == "FORBIDDEN"
    assert body["message"].startswith("subscription token refused: ")


@pytest.mark.parametrize("kind", TAMPERED)
async def test_rest_and_websocket_refuse_a_token_with_the_same_error(
    kind: str, fresh_node: None
) -> None:
    token = _tampered(kind)
    rest = (await sync_to_async(_history)(token)).json()
    client = await connected_client()
    reply = await client.request({"type": "subscribe", "channel": CHANNEL, "token": token})
    await client.close()
    assert (rest["code"], rest["message"]) == (reply["code"], reply["message"])


def test_a_token_never_opens_a_publish() -> None:
    token = subscription_token_issue(channel=CHANNEL, ttl_secs=60)
    response = APIClient().post(
        f"/api/v1/channels/{CHANNEL}/messages",
        {"data": 1},
        format="json",
        HTTP_X_SUBSCRIPTION_TOKEN=token,
    )
    assert response.status_code == 401
    assert response.json()["code"] == "NOT_AUTHENTICATED"


def test_the_token_is_checked_even_where_the_caller_could_read_anyway() -> None:
    """As on the WebSocket, a token given is the one that decides: a bad one is refused
    on a public channel too, so a client learns its back-end hands out bad tokens."""
    message_publish(channel="news", data=1)
    assert APIClient().get("/api/v1/channels/news/messages").status_code == 200
    response = _history(_tampered("another channel"), "/api/v1/channels/news/messages")
    assert response.status_code == 403
