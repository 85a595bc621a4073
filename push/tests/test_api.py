"""REST API: publish, history, channel list, as a client of the HTTP API sees them."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings
from rest_framework.authtoken.models import Token
from rest_framework.renderers import JSONRenderer
from rest_framework.test import APIClient

from accounts.models import ChannelGrant
from accounts.permissions import can_subscribe
from accounts.principals import Grant, Principal
from push.models import Channel, Message
from push.services import channel_info
from push.services.publishing import message_publish
from push.storage import selectors

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def client() -> APIClient:
    return APIClient()


@pytest.fixture
def publisher(client: APIClient) -> APIClient:
    user = User.objects.create_user("rest-publisher", password="x")
    ChannelGrant.objects.create(user=user, pattern="*", can_publish=True)
    token = Token.objects.create(user=user)
    authed = APIClient()
    authed.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return authed


def _publish(api: APIClient, channel: str, body: object, **extra: str):  # type: ignore[no-untyped-def]  # its response type is private in the stubs
    return api.post(
        f"/api/v1/channels/{channel}/messages",
        data=json.dumps(body),
        content_type="application/json",
        **extra,
    )


def test_publish_returns_201_with_seq(publisher: APIClient) -> None:
    first = _publish(publisher, "news", {"data": {"a": 1}})
    assert first.status_code == 201
    body = first.json()
    assert set(body) == {"channel", "seq", "message_id", "timestamp"}
    assert body["channel"] == "news" and body["seq"] == 1
    second = _publish(publisher, "news", {"data": 2})
    assert second.json()["seq"] == 2


def test_publish_stores_data_losslessly(publisher: APIClient, client: APIClient) -> None:
    data = {"s": "a\u0000b", "max": 2**64 - 1, "min": -(2**63), "f": 0.1, "tiny": 5e-324}
    _publish(publisher, "exact", {"data": data})
    stored = client.get("/api/v1/channels/exact/messages").json()["results"][0]
    assert stored["data"] == data
    assert json.loads(Message.objects.get().data) == data


def test_a_history_page_is_the_json_drf_would_render_and_the_browsable_api_shows_it(
    publisher: APIClient, client: APIClient
) -> None:
    """The page is written around each message's stored JSON, never parsed again: its
    bytes are what DRF's JSONRenderer makes of the same values, line separators
    escaped for JavaScript included."""
    tricky = [
        {"s": "a\u0000b\u2028c\u2029d", "e": "é😀", "q": '"\\/'},
        [2**64 - 1, -(2**63), 0.1, 5e-324, 1e300, True, None],
        "plain",
        {"nested": {"deep": [[[{}]]]}},
    ]
    for data in tricky:
        _publish(publisher, "exact", {"data": data})
    response = client.get("/api/v1/channels/exact/messages?limit=3")
    page = json.loads(response.content)
    assert [m["data"] for m in page["results"]] == tricky[:3]
    assert "since=3" in page["next"]
    assert response.content == JSONRenderer().render(page)
    assert b"\\u2028" in response.content and "\u2028".encode() not in response.content
    html = client.get("/api/v1/channels/exact/messages?since=3", HTTP_ACCEPT="text/html")
    assert html.status_code == 200 and b"&quot;deep&quot;" in html.content


def test_publish_requires_a_token(client: APIClient) -> None:
    response = _publish(client, "news", {"data": 1})
    assert response.status_code == 401
    assert response.json()["type"] == "error"


def test_publish_with_a_bad_token_is_refused(client: APIClient) -> None:
    response = _publish(client, "news", {"data": 1}, HTTP_AUTHORIZATION="Token nope")
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "data"), ({"other": 1}, "data"), ("just text", "data"), ([1, 2], "data")],
)
def test_publish_without_data_names_the_field(publisher: APIClient, body: dict, field: str) -> None:
    response = _publish(publisher, "news", body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["code"] == "INVALID_MESSAGE"
    assert field in payload["message"]


def test_publish_with_malformed_json(publisher: APIClient) -> None:
    response = publisher.post(
        "/api/v1/channels/news/messages", data="{oops", content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_JSON"


def test_publish_null_is_a_value(publisher: APIClient) -> None:
    assert _publish(publisher, "news", {"data": None}).status_code == 201


@pytest.mark.parametrize("data", [2**64, {"s": "\ud800"}], ids=["past-64-bits", "lone-surrogate"])
def test_publish_of_data_that_is_not_representable(publisher: APIClient, data: object) -> None:
    response = _publish(publisher, "news", {"data": data})  # the surrogate as a \ud800 escape
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_MESSAGE"


def test_publish_to_bad_channel_name(publisher: APIClient) -> None:
    response = _publish(publisher, "bad*name", {"data": 1})
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_MESSAGE"


def _api_with_news_grant() -> APIClient:
    user = User.objects.create_user("news-only", password="x")
    ChannelGrant.objects.create(user=user, pattern="news", can_publish=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return api


def test_users_publish_to_public_channels_and_reserved_ones_need_a_grant() -> None:
    api = _api_with_news_grant()
    assert _publish(api, "news", {"data": 1}).status_code == 201
    assert _publish(api, "sport", {"data": 1}).status_code == 201
    for channel in ("private-room", "Private-news", "presence-room", "user:999"):
        response = _publish(api, channel, {"data": 1})
        assert response.status_code == 403
        assert response.json()["code"] == "FORBIDDEN"


@override_settings(PUSH={"USERS_PUBLISH": False})
def test_without_users_publish_every_channel_needs_a_grant() -> None:
    api = _api_with_news_grant()
    assert _publish(api, "news", {"data": 1}).status_code == 201
    for channel in ("private-room", "sport", "Private-news"):
        response = _publish(api, channel, {"data": 1})
        assert response.status_code == 403
        assert response.json()["code"] == "FORBIDDEN"


@override_settings(PUSH={"MAX_FRAME_BYTES": 1000})
def test_publish_over_the_size_limit(publisher: APIClient) -> None:
    response = _publish(publisher, "news", {"data": "x" * 2000})
    assert response.status_code == 413
    assert response.json()["code"] == "MESSAGE_TOO_LARGE"


def test_history_is_oldest_first_and_paginated(publisher: APIClient, client: APIClient) -> None:
    for n in range(5):
        _publish(publisher, "feed", {"data": n})
    page = client.get("/api/v1/channels/feed/messages?since=1&limit=2").json()
    assert [m["seq"] for m in page["results"]] == [2, 3]
    first = page["results"][0]
    assert set(first) == {"type", "channel", "seq", "message_id", "data", "timestamp"}
    assert first["data"] == 1
    page = client.get(page["next"]).json()
    assert [m["seq"] for m in page["results"]] == [4, 5]
    assert page["next"] is None


@override_settings(PUSH={"HISTORY_PAGE_MAX_BYTES": 250_000})
def test_history_page_stops_at_its_byte_budget(client: APIClient) -> None:
    """Messages of 100 KB against a 250 KB budget: pages of two, ``next`` pointing on,
    and following it returns every message exactly once."""
    big = "x" * 100_000
    for n in range(7):
        message_publish(channel="bulky", data={"n": n, "pad": big})
    url: str | None = "/api/v1/channels/bulky/messages?since=0&limit=1000"
    pages: list[list[int]] = []
    while url is not None:
        page = client.get(url).json()
        pages.append([m["data"]["n"] for m in page["results"]])
        url = page["next"]
    assert pages == [[0, 1], [2, 3], [4, 5], [6]]


@override_settings(PUSH={"HISTORY_PAGE_MAX_BYTES": 1000})
def test_a_history_page_holds_one_message_even_over_the_budget(client: APIClient) -> None:
    for n in range(3):
        message_publish(channel="huge", data="y" * 5000 + str(n))
    page = client.get("/api/v1/channels/huge/messages?since=0").json()
    assert [m["seq"] for m in page["results"]] == [1]
    assert page["next"] is not None and "since=1" in page["next"]
    last = client.get("/api/v1/channels/huge/messages?since=2").json()
    assert ([m["seq"] for m in last["results"]], last["next"]) == ([3], None)


@override_settings(PUSH={"RETENTION_MAX_MESSAGES": 3})
def test_history_serves_what_retention_keeps_before_the_trim_job_ran(client: APIClient) -> None:
    """The count limit keeps seqs 3 to 5: REST history served 1 to 5 until
    ``trim_history`` deleted the rows, where a resume replays 3 to 5 either way."""
    for n in range(5):
        message_publish(channel="kept", data=n)
    page = client.get("/api/v1/channels/kept/messages?since=0").json()
    assert [m["seq"] for m in page["results"]] == [3, 4, 5]
    call_command("trim_history", stdout=io.StringIO())
    assert client.get("/api/v1/channels/kept/messages?since=0").json() == page


@pytest.mark.parametrize(
    ("trimmed", "pages"), [(2, [[3, 4, 5, 6], [7, 8, 9, 10]]), (6, [[7, 8, 9, 10]])]
)
def test_a_page_whose_head_is_trimmed_while_it_is_read_still_points_on(
    client: APIClient, monkeypatch: pytest.MonkeyPatch, trimmed: int, pages: list[list[int]]
) -> None:
    """A page is read in two steps (its messages' sizes, then the messages within the
    byte budget). When ``trim_history`` deleted the page's first messages in between,
    the page came back shorter than its limit with ``next`` null: a client following
    ``next`` until null stopped there, before messages 7 to 10 (none at all when the
    trim took the whole page)."""
    for n in range(10):
        message_publish(channel="racing", data=n)

    class TrimmedBeforeTheRead(selectors.EpochSeconds):  # made for the second step
        def as_sql(self, *args: Any, **kwargs: Any) -> Any:
            if not deleted:  # (once: the page may be read again)
                deleted.append(
                    Message.objects.filter(channel__name="racing", seq__lte=trimmed).delete()
                )
            return super().as_sql(*args, **kwargs)

    deleted: list[object] = []
    monkeypatch.setattr(selectors, "EpochSeconds", TrimmedBeforeTheRead)
    url: str | None = "/api/v1/channels/racing/messages?since=0&limit=5"
    read = []
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200
        read.append([m["seq"] for m in response.json()["results"]])
        url = response.json()["next"]
    assert read == pages


def test_history_defaults(publisher: APIClient, client: APIClient) -> None:
    _publish(publisher, "feed", {"data": 1})
    page = client.get("/api/v1/channels/feed/messages").json()
    assert [m["seq"] for m in page["results"]] == [1]
    assert client.get("/api/v1/channels/empty/messages").json() == {"results": [], "next": None}


@pytest.mark.parametrize("query", ["since=-1", "since=abc", "limit=0", "limit=1001", "limit=x"])
def test_history_bad_query(client: APIClient, query: str) -> None:
    response = client.get(f"/api/v1/channels/feed/messages?{query}")
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_MESSAGE"


# One more than Django reads (DATA_UPLOAD_MAX_NUMBER_FIELDS, 1000 by default).
TOO_MANY_PARAMETERS = "&".join(f"p{i}=1" for i in range(1001))


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/api/v1/channels/feed/messages"),
        ("post", "/api/v1/channels/feed/messages"),
        ("post", "/api/v1/messages"),
        ("get", "/api/v1/channels/"),
        ("get", "/api/v1/channels/feed"),
    ],
)
def test_more_query_parameters_than_django_reads_are_refused_400(
    client: APIClient, method: str, path: str
) -> None:
    # DRF's content negotiation reads the query string before anything else, and left
    # Django's refusal of it uncaught: answered 500 (seconds of CPU with DEBUG on).
    response = getattr(client, method)(f"{path}?{TOO_MANY_PARAMETERS}", format="json")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "INVALID_MESSAGE"
    assert "DATA_UPLOAD_MAX_NUMBER_FIELDS" in body["message"]


def test_an_unknown_format_is_a_404_in_the_error_envelope(client: APIClient) -> None:
    # DRF's content negotiation raises Django's Http404, which the envelope missed.
    response = client.get("/api/v1/channels/feed/messages?format=yaml")
    assert response.status_code == 404
    assert response.json() == {"type": "error", "code": "NOT_FOUND", "message": "Not found."}


@override_settings(DEBUG=False)
def test_an_unknown_api_path_is_a_404_in_the_error_envelope(client: APIClient) -> None:
    response = client.get("/api/v1/chanels/feed/messages")
    assert response.status_code == 404
    assert response.json() == {
        "type": "error",
        "code": "NOT_FOUND",
        "message": "no API endpoint at /api/v1/chanels/feed/messages",
    }
    assert client.get("/no-such-page/").status_code == 404  # Django's own page


def test_history_of_private_channel_is_forbidden(client: APIClient) -> None:
    assert client.get("/api/v1/channels/private-x/messages").status_code == 403


def test_channel_list_shows_last_seq_and_hides_private(
    publisher: APIClient, client: APIClient
) -> None:
    _publish(publisher, "alpha", {"data": 1})
    _publish(publisher, "alpha", {"data": 2})
    _publish(publisher, "beta", {"data": 1})
    message_publish(channel="private-secret", data=1)
    listing = client.get("/api/v1/channels/").json()
    assert listing["results"] == [
        {"channel": "alpha", "last_seq": 2, "subscribers": 0},
        {"channel": "beta", "last_seq": 1, "subscribers": 0},
    ]
    assert listing["next"] is None


def test_channel_list_shows_the_private_channels_a_grant_opens() -> None:
    for name in ("news", "private-room-1", "private-other", "presence-room-2", "user:1"):
        message_publish(channel=name, data=1)
    user = User.objects.create_user("roomie", password="x")
    ChannelGrant.objects.create(user=user, pattern="*-room-*", can_subscribe=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    names = [c["channel"] for c in api.get("/api/v1/channels/").json()["results"]]
    assert names == ["news", "presence-room-2", "private-room-1"]


STORED_CHANNELS = 2000


def test_a_channel_list_page_looks_at_a_bounded_number_of_stored_channels(
    client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's rights are a filter the index cannot use: an anonymous list over
    many channels it may not see (``user:`` ones) read every one of them for each page,
    ~0.5 s of PostgreSQL over 500,000. A page now stops looking after
    ``CHANNEL_LIST_SCAN_MAX`` names and its ``next`` goes on from there."""
    monkeypatch.setattr(channel_info, "CHANNEL_LIST_SCAN_MAX", 50, raising=False)
    Channel.objects.bulk_create([Channel(name=f"user:{n}") for n in range(STORED_CHANNELS)])
    for name in ("a-first", "zz-last"):
        message_publish(channel=name, data=1)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE push_channel")  # the planner sees the table's size
    with transaction.atomic():
        read_before = _channel_rows_read()
        first = client.get("/api/v1/channels/").json()
        assert _channel_rows_read() - read_before <= 60
    names = [c["channel"] for c in first["results"]]
    url = first["next"]
    while url is not None:
        page = client.get(url).json()
        names += [c["channel"] for c in page["results"]]
        url = page["next"]
    assert names == ["a-first", "zz-last"]


def _channel_rows_read() -> int:
    """Rows of the channel table this connection has read and not yet reported (no
    report is made inside a transaction, so a difference there is what it read)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT sum(pg_stat_get_xact_tuples_returned(oid)) FROM ("
            " SELECT 'push_channel'::regclass::oid AS oid UNION ALL"
            " SELECT indexrelid FROM pg_index WHERE indrelid = 'push_channel'::regclass) r"
        )
        return int(cursor.fetchone()[0])


def test_concurrent_publishers_get_gapless_seqs() -> None:
    threads, per_thread = 8, 25

    def publish_many(worker: int) -> list[int]:
        from django.db import connection

        try:
            return [
                message_publish(channel="race", data={"w": worker, "i": i}).seq
                for i in range(per_thread)
            ]
        finally:
            connection.close()

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(publish_many, range(threads)))
    seqs = sorted(seq for worker in results for seq in worker)
    assert seqs == list(range(1, threads * per_thread + 1))
    for worker in results:
        assert worker == sorted(worker), "one publisher's messages keep their order"
    stored = list(Message.objects.filter(channel__name="race").values_list("seq", flat=True))
    assert sorted(stored) == seqs


def test_publish_inside_a_rolled_back_transaction_stores_nothing() -> None:
    from django.db import transaction

    with pytest.raises(RuntimeError), transaction.atomic():
        message_publish(channel="tx", data=1)
        raise RuntimeError("application failed")
    assert not Message.objects.filter(channel__name="tx").exists()
    assert message_publish(channel="tx", data=2).seq == 1


def test_a_token_made_by_drf_create_token_authenticates_rest() -> None:
    User.objects.create_user("carol")
    out = io.StringIO()
    call_command("drf_create_token", "carol", stdout=out)
    key = re.search(r"Generated token (\w+)", out.getvalue())
    assert key is not None, out.getvalue()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key.group(1)}")
    response = _publish(api, "news", {"data": "hi"})
    assert response.status_code == 201, response.json()


def test_channel_list_counts_presence_members_without_reading_each_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A page of the channel list may name a thousand presence channels: their member
    counts are asked of Redis together, not each channel's every member read on a
    connection of its own."""
    from common.redis_client import redis_prefix, redis_sync
    from push.cluster import occupancy, presence

    rooms = [f"presence-count-{n}" for n in range(5)]
    redis = redis_sync()
    for n, room in enumerate(rooms):
        message_publish(channel=room, data=1)
        members = {json.dumps(f"u{i}"): json.dumps({"bio": "x" * 100}) for i in range(n + 1)}
        redis.hset(f"{redis_prefix()}:presence:{room}:members", mapping=members)
    opened = []

    def counted(**options: object):  # type: ignore[no-untyped-def]  # redis-py's client type
        opened.append(options)
        return redis_sync(**options)

    monkeypatch.setattr(presence, "redis_sync", counted)
    monkeypatch.setattr(occupancy, "redis_sync", counted)
    user = User.objects.create_user("roomie", password="x")
    ChannelGrant.objects.create(user=user, pattern="presence-count-*", can_subscribe=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    try:
        listing = api.get("/api/v1/channels/?prefix=presence-count-").json()["results"]
        assert [c["presence_members"] for c in listing] == [1, 2, 3, 4, 5]
        assert len(opened) <= 2, "the subscriber counts and the member counts"
        info = api.get(f"/api/v1/channels/{rooms[2]}").json()
        assert info["presence_members"] == 3
    finally:
        redis.delete(*[f"{redis_prefix()}:presence:{room}:members" for room in rooms])
        redis.close()


# ----- the channel list's patterns: what the rights match -----------------------------


LISTED_PATTERNS = [
    "news",
    "ticker:*",
    "ticker:?",
    "room-[0-9]",
    "room-[!0-9]",
    "a[]b]",
    "a[!]]b",
    "a[b",
    "x[a-c.]y",
    "[!a]*",
    "*[:]*",
]
LISTED_NAMES = ["news", "ticker:A", "ticker:AB", "room-1", "room-a", "a]b", "ab", "x.y", "xby"]


@pytest.mark.django_db
def test_the_channel_list_matches_a_pattern_as_the_rights_do() -> None:
    """The rights match a grant's pattern with fnmatch, ``[...]`` classes included, and
    the channel list lists what they match. (Once it ran the pattern as a regular
    expression in the database: read literally there, a grant on ``room-[0-9]`` let
    its user subscribe to ``room-1``, and listed nothing.)"""
    Channel.objects.bulk_create([Channel(name=name) for name in LISTED_NAMES])
    listings = {}
    for pattern in LISTED_PATTERNS:
        # A service token lists exactly what its subscribe scopes grant.
        grant = Grant(pattern, subscribe=True, publish=False, presence=False)
        service = Principal(kind="service", id=9, name="lister", grants=(grant,))
        listed, _ = channel_info.channel_names_visible(
            principal=service, prefix="", occupied=False, after="", limit=100
        )
        listings[pattern] = set(listed)
        assert listings[pattern] == {n for n in LISTED_NAMES if can_subscribe(service, n)}
    assert listings["room-[0-9]"] == {"room-1"} and listings["a[]b]"] == {"ab"}
