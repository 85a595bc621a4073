"""The parts of ``push.api.fast_publish`` that follow settings and DRF's negotiation:
they must decide as Django's path would (tests/test_rest_fast_publish.py compares the
two paths' answers on real nodes)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.dispatch import Signal
from django.test import override_settings

from push.api import fast_publish, middleware
from push.api.fast_publish import Endpoint, FastPublish
from push.api.handler import LoopHandler, receivers_on_loop
from push.api.security_headers import security_headers
from push.api.views import BatchMessagesView, ChannelMessagesView


@pytest.fixture
def fresh_headers() -> Iterator[None]:
    security_headers.cache_clear()
    yield
    security_headers.cache_clear()


@pytest.mark.usefixtures("fresh_headers")
def test_security_headers_are_the_middleware_s_for_the_settings() -> None:
    with override_settings(
        SECURE_HSTS_SECONDS=60,
        SECURE_HSTS_INCLUDE_SUBDOMAINS=True,
        SECURE_REFERRER_POLICY="no-referrer, strict-origin",
        X_FRAME_OPTIONS="sameorigin",
    ):
        secure = dict(header for part in security_headers(True) for header in part)
        plain = dict(header for part in security_headers(False) for header in part)
    assert secure[b"strict-transport-security"] == b"max-age=60; includeSubDomains"
    assert b"strict-transport-security" not in plain  # HSTS only over https
    assert secure[b"x-frame-options"] == plain[b"x-frame-options"] == b"SAMEORIGIN"
    assert plain[b"referrer-policy"] == b"no-referrer,strict-origin"
    assert plain[b"x-content-type-options"] == b"nosniff"


@pytest.mark.usefixtures("fresh_headers")
def test_security_headers_stand_where_the_middleware_add_them() -> None:
    # Each adds its headers on the way out, the last listed first; CommonMiddleware
    # adds Content-Length, which divides the headers made before it from the rest.
    assert [[name for name, _ in part] for part in security_headers(False)] == [
        [b"x-frame-options"],
        [b"x-content-type-options", b"referrer-policy", b"cross-origin-opener-policy"],
    ]
    reordered = [path for path in settings.MIDDLEWARE if "XFrame" not in path]
    reordered.insert(0, "push.api.middleware.XFrameOptionsMiddleware")
    security_headers.cache_clear()
    with override_settings(MIDDLEWARE=reordered):
        before, after = security_headers(False)
    assert before == ()
    assert [name for name, _ in after][-1] == b"x-frame-options"


@pytest.mark.parametrize(
    ("accept", "plain_json"),
    [
        (b"*/*", True),
        (b"application/json", True),
        (b"application/json, text/plain, */*", True),
        (b"application/*", True),
        (b"text/html", False),
        (b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
        (b"application/json; indent=2", False),
        (b"text/plain", False),
        (b"", False),
    ],
)
@pytest.mark.parametrize("view", [ChannelMessagesView, BatchMessagesView])
def test_plain_json_is_what_drf_would_render(
    view: type[ChannelMessagesView], accept: bytes, plain_json: bool
) -> None:
    assert Endpoint(view, "view").renders_json(accept) is plain_json


def test_allow_is_what_drf_sends() -> None:
    assert Endpoint(ChannelMessagesView, "view").allow == b"GET, POST, HEAD, OPTIONS"
    assert Endpoint(BatchMessagesView, "view").allow == b"POST, OPTIONS"


class ProjectSecurityMiddleware(middleware.SecurityMiddleware):
    """A project's own subclass of a shipped middleware: it may do more."""


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise AssertionError("not called")


def test_the_shipped_settings_are_mirrored() -> None:
    fast = FastPublish(_app)
    assert fast.mirrors_django and fast.enabled()


@pytest.mark.parametrize(
    "added",
    [
        "django.middleware.gzip.GZipMiddleware",
        "push.tests.test_fast_publish.ProjectSecurityMiddleware",
    ],
)
def test_a_middleware_of_the_project_s_own_turns_the_fast_path_off(added: str) -> None:
    with override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, added]):
        assert not FastPublish(_app).mirrors_django


@pytest.mark.parametrize(
    "setting",
    [{"PREPEND_WWW": True}, {"USE_X_FORWARDED_HOST": True}, {"DISALLOWED_USER_AGENTS": ["x"]}],
)
def test_settings_with_which_django_redirects_or_refuses_turn_it_off(
    setting: dict[str, Any],
) -> None:
    with override_settings(**setting):
        assert not FastPublish(_app).mirrors_django


def test_a_request_signal_receiver_of_the_project_s_own_turns_it_off() -> None:
    """Also once the answer was kept: connecting or disconnecting a receiver, or one
    receiver taking another's place, is seen on the next request."""
    fast = FastPublish(_app)
    assert fast.enabled()

    def receiver(**kwargs: Any) -> None:
        pass

    def other(**kwargs: Any) -> None:
        pass

    request_started.connect(receiver)
    try:
        assert not fast.enabled()
        request_started.disconnect(receiver)
        assert fast.enabled()
        request_finished.connect(receiver)
        assert not fast.enabled()
        request_finished.disconnect(receiver)
        request_finished.connect(other)
        assert not fast.enabled()
    finally:
        request_started.disconnect(receiver)
        request_finished.disconnect(receiver)
        request_finished.disconnect(other)
    assert fast.enabled()


def test_a_receiver_for_one_sender_counts_for_that_sender_only() -> None:
    """The kept answers are per sender, and connecting one for a sender is seen by all."""
    assert receivers_on_loop(request_started, LoopHandler)
    assert receivers_on_loop(request_started)

    def receiver(**kwargs: Any) -> None:
        pass

    request_started.connect(receiver, sender=LoopHandler)
    try:
        assert not receivers_on_loop(request_started, LoopHandler)
        assert receivers_on_loop(request_started)  # sent by Django's own handler
    finally:
        request_started.disconnect(receiver, sender=LoopHandler)
    assert receivers_on_loop(request_started, LoopHandler)


def test_a_receiver_that_was_collected_no_longer_turns_it_off() -> None:
    """A weakly held receiver that is gone (Django only flags it dead) stops counting,
    as Django stops calling it, though the answer with it was kept."""
    fast = FastPublish(_app)

    class Listener:
        def __call__(self, **kwargs: Any) -> None:
            pass

    listener = Listener()
    # Weakly, as Django holds receivers by default: gone when the object is.
    request_finished.connect(listener, dispatch_uid="collected-listener")
    try:
        assert not fast.enabled()
        assert not fast.enabled()  # kept
        del listener
        gc.collect()
        assert fast.enabled()
        assert fast.enabled()
    finally:
        request_finished.disconnect(dispatch_uid="collected-listener")


# close_old_connections looks at the test process's connection when the signal is sent.
@pytest.mark.django_db
def test_the_answer_is_kept_on_a_signal_that_caches_its_receivers() -> None:
    """A signal made with ``use_caching`` holds its cache weakly, by sender."""
    signal = Signal(use_caching=True)
    assert receivers_on_loop(signal, LoopHandler)
    signal.connect(close_old_connections)
    assert receivers_on_loop(signal, LoopHandler)

    def receiver(**kwargs: Any) -> None:
        pass

    signal.connect(receiver, sender=LoopHandler)
    assert not receivers_on_loop(signal, LoopHandler)
    assert signal.send(sender=LoopHandler) == [(close_old_connections, None), (receiver, None)]
    signal.disconnect(receiver, sender=LoopHandler)
    assert receivers_on_loop(signal, LoopHandler)


def _publish_scope(scheme: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "scheme": scheme,
        "path": "/api/v1/channels/news/messages",
        "root_path": "",
        "query_string": b"",
        "client": ("192.0.2.1", 40000),
        "headers": [
            (b"host", b"example.com"),
            (b"authorization", b"Token svc_kept"),
            (b"content-type", b"application/json"),
            (b"content-length", b"11"),
            *headers,
        ],
    }


@pytest.mark.parametrize(
    ("ssl_redirect", "scheme", "headers", "taken"),
    [
        (False, "http", [], True),
        (True, "http", [], False),  # Django redirects it to https
        (True, "https", [], True),
        (False, "http", [(b"accept", b"application/json")], True),
        (False, "http", [(b"accept", b"*/*"), (b"accept", b"application/json")], False),
    ],
)
@override_settings(ALLOWED_HOSTS=["example.com"])
def test_a_request_is_taken_only_as_django_would_read_it(
    monkeypatch: pytest.MonkeyPatch,
    ssl_redirect: bool,
    scheme: str,
    headers: list[tuple[bytes, bytes]],
    taken: bool,
) -> None:
    """Over plain HTTP with ``SECURE_SSL_REDIRECT`` (read once, as Django's middleware
    does), or with a header sent twice (Django would join them), Django answers."""
    monkeypatch.setattr(fast_publish, "is_kept_key", lambda key: key == "svc_kept")
    with override_settings(SECURE_SSL_REDIRECT=ssl_redirect):
        fast = FastPublish(_app)
    scope = _publish_scope(scheme, headers)
    found = fast._endpoint(scope)
    assert found is not None
    request = fast_publish.plain_request(scope, *found, fast.ssl_redirect)
    assert (request is not None) is taken
    if request is not None:
        assert (request.channel, request.token, request.secure) == (
            "news",
            "svc_kept",
            scheme == "https",
        )


@pytest.mark.parametrize(
    "reply",
    [
        {
            "channel": "news",
            "seq": 7,
            "message_id": "01a2472d-f370-79dc-8071-70dd6054e925",
            "timestamp": 1796490523.504882,
        },
        {"results": [{"channel": "n", "seq": 1, "message_id": "a-be-c", "timestamp": 1.5}]},
        {"error": {"code": "X", "message": "h\u00e9llo \u2028 \u2029 \u2013 \U0001f600"}},
        {"n": [1e-07, 5e-05, 0.5, -0.0, 2**63, 2**70], "s": ":1e-5"},
        {"\u2028": None},
    ],
)
def test_an_answer_is_rendered_as_drf_renders_it(reply: dict[str, Any]) -> None:
    """Byte for byte what the views' renderer sends (it escapes U+2028 and U+2029)."""
    assert fast_publish._DEFAULT_JSON
    assert fast_publish._rendered(reply) == fast_publish._RENDERER.render(reply)


@pytest.mark.parametrize(
    ("content_type", "channel", "taken"),
    [
        (b"application/json", "news", True),
        (b"Application/JSON; charset=UTF-8", "news", True),  # read as DRF reads it
        (b"application/json; charset=latin-1", "news", False),
        (b"text/plain", "news", False),
        (b"application/json", "bad*name", False),
        (b"application/json", "x" * 101, False),
    ],
)
@override_settings(ALLOWED_HOSTS=["example.com"])
def test_a_body_s_type_and_the_url_s_channel_are_read_as_the_view_reads_them(
    monkeypatch: pytest.MonkeyPatch, content_type: bytes, channel: str, taken: bool
) -> None:
    """Asked twice: a channel name found valid (or not) is not found otherwise later."""
    monkeypatch.setattr(fast_publish, "is_kept_key", lambda key: key == "svc_kept")
    fast = FastPublish(_app)
    scope = _publish_scope("http", [])
    scope["path"] = f"/api/v1/channels/{channel}/messages"
    scope["headers"] = [
        (name, content_type if name == b"content-type" else value)
        for name, value in scope["headers"]
    ]
    found = fast._endpoint(scope)
    assert found is not None
    for _ in range(2):
        request = fast_publish.plain_request(scope, *found, fast.ssl_redirect)
        assert (request is not None) is taken
        assert request is None or request.channel == channel
