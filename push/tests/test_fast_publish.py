"""The parts of ``push.api.fast_publish`` that follow settings and DRF's negotiation:
they must decide as Django's path would (tests/test_rest_fast_publish.py compares the
two paths' answers on real nodes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import override_settings

from push.api.fast_publish import Endpoint
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
        secure = dict(security_headers(True))
        plain = dict(security_headers(False))
    assert secure[b"strict-transport-security"] == b"max-age=60; includeSubDomains"
    assert b"strict-transport-security" not in plain  # HSTS only over https
    assert secure[b"x-frame-options"] == plain[b"x-frame-options"] == b"SAMEORIGIN"
    assert plain[b"referrer-policy"] == b"no-referrer,strict-origin"
    assert plain[b"x-content-type-options"] == b"nosniff"


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
