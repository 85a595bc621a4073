"""Batch publish (``POST /api/v1/messages``) and the async REST views, as an HTTP client
sees them: all or nothing, errors that name the refused item, idempotent retries, the
browsable API."""

from __future__ import annotations

import inspect
import json

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from django.urls import resolve
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.models import ChannelGrant
from push.models import Channel, IdempotencyKey, Message

pytestmark = pytest.mark.django_db(transaction=True)

BATCH_URL = "/api/v1/messages"


def _api(username: str, pattern: str = "*") -> APIClient:
    user = User.objects.create_user(username, password="x")
    ChannelGrant.objects.create(user=user, pattern=pattern, can_publish=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return api


@pytest.fixture
def publisher() -> APIClient:
    return _api("batcher")


def _batch(api: APIClient, body: object, **extra: str):  # type: ignore[no-untyped-def]  # its response type is private in the stubs
    raw = body if isinstance(body, str) else json.dumps(body)
    return api.post(BATCH_URL, data=raw, content_type="application/json", **extra)


def _messages(*channels: str) -> dict[str, list[dict[str, object]]]:
    return {"messages": [{"channel": c, "data": {"n": n}} for n, c in enumerate(channels)]}


def test_batch_results_in_request_order_with_consecutive_seqs(publisher: APIClient) -> None:
    response = _batch(publisher, _messages("a", "b", "a", "c", "a"))
    assert response.status_code == 201, response.json()
    results = response.json()["results"]
    assert [(r["channel"], r["seq"]) for r in results] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("c", 1),
        ("a", 3),
    ]
    assert all(set(r) == {"channel", "seq", "message_id", "timestamp"} for r in results)
    stored = Message.objects.filter(channel__name="a").order_by("seq")
    assert [json.loads(m.data)["n"] for m in stored] == [0, 2, 4]
    history = publisher.get("/api/v1/channels/a/messages").json()["results"]
    assert [m["message_id"] for m in history] == [r["message_id"] for r in results[::2]]


def test_a_forbidden_channel_refuses_the_whole_batch_and_names_its_index() -> None:
    api = _api("newsdesk", pattern="news*")
    body = _messages("news", "news-2", "news-3", "private-x", "news")
    response = _batch(api, body)
    assert response.status_code == 403
    assert response.json() == {
        "type": "error",
        "code": "FORBIDDEN",
        "message": "not allowed to publish to 'private-x'",
        "index": 3,
    }
    assert not Message.objects.exists() and not Channel.objects.exists()


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"channel": "bad*name", "data": 1}, "channel"),
        ({"channel": 5, "data": 1}, "channel"),
        ({"data": 1}, "channel"),
        ({"channel": "ok"}, "data"),
        ("not an object", "messages"),
        ({"channel": "ok", "data": 2**64}, "data"),
    ],
    ids=["bad-name", "name-not-a-string", "no-channel", "no-data", "not-an-object", "big-int"],
)
def test_an_invalid_item_is_a_400_naming_its_index(
    publisher: APIClient, item: object, field: str
) -> None:
    body = {"messages": [{"channel": "ok", "data": 0}, {"channel": "ok", "data": 1}, item]}
    response = _batch(publisher, body)
    assert response.status_code == 400
    payload = response.json()
    assert (payload["code"], payload["index"], payload["field"]) == ("INVALID_MESSAGE", 2, field)
    assert not Message.objects.exists()


def test_a_lone_surrogate_in_one_item_names_its_index(publisher: APIClient) -> None:
    raw = '{"messages": [{"channel": "ok", "data": 1}, {"channel": "ok", "data": "\\ud800"}]}'
    response = _batch(publisher, raw)
    assert response.status_code == 400
    assert (response.json()["code"], response.json()["index"]) == ("INVALID_MESSAGE", 1)
    assert not Message.objects.exists()


def test_data_nested_too_deeply(publisher: APIClient) -> None:
    deep: object = 1
    for _ in range(100):
        deep = [deep]
    response = _batch(publisher, {"messages": [{"channel": "ok", "data": deep}]})
    assert response.status_code == 400
    assert (response.json()["code"], response.json()["index"]) == ("INVALID_MESSAGE", 0)
    # Past Python's recursion limit the JSON itself is refused, not the request failed.
    abyss = '{"messages": [{"channel": "ok", "data": ' + "[" * 100_000 + "]" * 100_000 + "}]}"
    response = _batch(publisher, abyss)
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_JSON"
    assert not Message.objects.exists()


@pytest.mark.parametrize(
    "body",
    [{}, {"messages": []}, {"messages": {"channel": "a"}}, {"messages": "a"}, [1, 2], "text"],
    ids=["no-messages", "empty", "an-object", "a-string", "body-a-list", "body-a-string"],
)
def test_a_body_without_a_list_of_messages(publisher: APIClient, body: object) -> None:
    response = _batch(publisher, json.dumps(body))
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_MESSAGE"
    assert response.json()["field"] == "messages"


def test_malformed_json(publisher: APIClient) -> None:
    response = _batch(publisher, '{"messages": [')
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_JSON"


def test_at_most_1000_messages(publisher: APIClient) -> None:
    response = _batch(publisher, {"messages": [{"channel": "c", "data": n} for n in range(1001)]})
    assert response.status_code == 413
    assert response.json()["code"] == "MESSAGE_TOO_LARGE"
    assert not Message.objects.exists()
    full = _batch(publisher, {"messages": [{"channel": "c", "data": n} for n in range(1000)]})
    assert full.status_code == 201
    assert [r["seq"] for r in full.json()["results"]] == list(range(1, 1001))


@override_settings(PUSH={"MAX_FRAME_BYTES": 1000})
def test_a_body_over_the_frame_limit(publisher: APIClient) -> None:
    body = {"messages": [{"channel": "c", "data": "x" * 300} for _ in range(4)]}
    response = _batch(publisher, body)
    assert response.status_code == 413
    assert response.json()["code"] == "MESSAGE_TOO_LARGE"
    assert not Message.objects.exists()


def test_anonymous_batches_need_a_token() -> None:
    response = _batch(APIClient(), _messages("a"))
    assert response.status_code == 401
    assert response.json()["code"] == "NOT_AUTHENTICATED"


def test_an_idempotent_batch_retry_answers_the_first_body(publisher: APIClient) -> None:
    body = _messages("x", "y", "x")
    first = _batch(publisher, body, HTTP_IDEMPOTENCY_KEY="batch-1")
    assert first.status_code == 201
    retry = _batch(publisher, body, HTTP_IDEMPOTENCY_KEY="batch-1")
    assert retry.status_code == 200
    assert retry.json() == first.json()
    assert Message.objects.count() == 3
    # Another key, or another credential with the same key, is another batch.
    assert _batch(publisher, body, HTTP_IDEMPOTENCY_KEY="batch-2").status_code == 201
    other = _api("other-batcher")
    assert _batch(other, body, HTTP_IDEMPOTENCY_KEY="batch-1").status_code == 201
    assert Message.objects.count() == 9
    # A single publish with the same key is not the batch.
    single = publisher.post(
        "/api/v1/channels/x/messages",
        data={"data": 1},
        format="json",
        HTTP_IDEMPOTENCY_KEY="batch-1",
    )
    assert single.status_code == 201
    assert IdempotencyKey.objects.filter(key="batch-1", channel="x").count() == 1


def test_a_refused_idempotent_batch_can_be_retried_once_fixed() -> None:
    api = _api("fixer", pattern="news*")
    refused = _batch(api, _messages("news", "private-x"), HTTP_IDEMPOTENCY_KEY="k")
    assert refused.status_code == 403 and refused.json()["index"] == 1
    fixed = _batch(api, _messages("news", "news-2"), HTTP_IDEMPOTENCY_KEY="k")
    assert fixed.status_code == 201


def test_the_browsable_api_renders(publisher: APIClient) -> None:
    _batch(publisher, _messages("shown"))
    page = publisher.get("/api/v1/channels/shown/messages", HTTP_ACCEPT="text/html")
    assert page.status_code == 200
    assert page["Content-Type"].startswith("text/html")
    assert b"Channel Messages" in page.content and b"&quot;seq&quot;: 1" in page.content
    # The batch endpoint only takes POST: its page says so, with the form to POST.
    batch_page = publisher.get(BATCH_URL, HTTP_ACCEPT="text/html")
    assert batch_page.status_code == 405
    assert b"Batch Messages" in batch_page.content and b"<form" in batch_page.content


def test_options_describes_the_views(publisher: APIClient) -> None:
    response = publisher.options(BATCH_URL)
    assert response.status_code == 200
    assert response.json()["name"] == "Batch Messages"
    assert "POST" in response["Allow"]


def test_errors_of_the_async_views_go_through_the_one_handler(publisher: APIClient) -> None:
    response = publisher.get("/api/v1/channels/x/messages?limit=0")
    assert response.status_code == 400 and response.json()["code"] == "INVALID_MESSAGE"
    response = publisher.put("/api/v1/channels/x/messages", data={}, format="json")
    assert response.status_code == 405 and response.json()["type"] == "error"


@pytest.mark.parametrize(
    "path",
    ["/api/v1/messages", "/api/v1/channels/c/messages", "/api/v1/users/1/messages"],
)
def test_publish_and_history_are_served_on_the_event_loop(path: str) -> None:
    """Django runs a coroutine view on the loop; a sync one on a thread of its own per
    request."""
    assert inspect.iscoroutinefunction(resolve(path).func)
