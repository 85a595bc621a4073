"""pusher-js's web build from npm in headless Chromium against a real node's Pusher
endpoint: the page (tests/pusher_js/page.html) comes from the test's own site, which
also passes ``POST /pusher/auth`` on to the node, as an app's web site would. A public
channel gets what our REST API publishes; a private channel is authorized for a user
with a grant and refused (``pusher:subscription_error``, 403) for one without."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.pages import publish_rest, wait_for
from tests.pusher_clients import PusherSite, api_tokens, pusher_site, require_pusher_js
from tests.pusherclient import APP_KEY
from tests.servers import ServerNode

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


@pytest.fixture(scope="module")
def pusher_node(pusher_nodes: tuple[ServerNode, ServerNode]) -> ServerNode:
    """The daphne node of the shared Pusher pair (tests/conftest.py)."""
    require_pusher_js()
    return pusher_nodes[0]


@pytest.fixture(scope="module")
def tokens(e2e_env: dict[str, str]) -> dict[str, str]:
    return api_tokens(e2e_env, granted=["pbr-carol"], refused=["pbr-dave"])


@pytest.fixture(scope="module")
def site(pusher_node: ServerNode) -> Iterator[PusherSite]:
    with pusher_site(pusher_node, APP_KEY) as running:
        yield running


def _open(browser: Any, site: PusherSite, node: ServerNode, token: str | None) -> None:
    browser.get(f"{site.url}/page.html")
    browser.execute_script(
        "window.startPusher(arguments[0])",
        {"key": APP_KEY, "host": "127.0.0.1", "port": node.port, "token": token},
    )
    wait_for(
        "the connection", lambda: _seen(browser, lambda e: e.get("state") == "connected"), browser
    )


def _seen(browser: Any, match: Any) -> dict[str, Any] | None:
    return next(
        (entry for entry in browser.execute_script("return window.seen") if match(entry)), None
    )


def _event(browser: Any, channel: str, event: str) -> Any:
    entry = wait_for(
        f"{event} on {channel}",
        lambda: _seen(browser, lambda e: e.get("channel") == channel and e.get("event") == event),
        browser,
    )
    return entry["data"]


def _subscribe(browser: Any, channel: str) -> None:
    browser.execute_script("window.subscribe(arguments[0])", channel)


def test_pusher_js_in_chromium_gets_public_messages(
    browser: Any, site: PusherSite, pusher_node: ServerNode, tokens: dict[str, str]
) -> None:
    channel = f"news-{uuid.uuid4().hex[:8]}"
    _open(browser, site, pusher_node, None)
    _subscribe(browser, channel)
    _event(browser, channel, "pusher:subscription_succeeded")
    publish_rest(pusher_node, tokens["pbr-carol"], channel, {"headline": "hello"})
    assert _event(browser, channel, "message") == {"headline": "hello"}
    publish_rest(pusher_node, tokens["pbr-carol"], channel, {"event": "breaking", "data": {"n": 1}})
    assert _event(browser, channel, "breaking") == {"n": 1}


def test_pusher_js_in_chromium_is_authorized_on_a_private_channel_or_refused(
    browser: Any, site: PusherSite, pusher_node: ServerNode, tokens: dict[str, str]
) -> None:
    channel = f"private-inbox-{uuid.uuid4().hex[:8]}"
    _open(browser, site, pusher_node, tokens["pbr-carol"])
    _subscribe(browser, channel)
    _event(browser, channel, "pusher:subscription_succeeded")
    publish_rest(pusher_node, tokens["pbr-carol"], channel, {"event": "mail", "data": {"id": 5}})
    assert _event(browser, channel, "mail") == {"id": 5}

    _open(browser, site, pusher_node, tokens["pbr-dave"])
    _subscribe(browser, channel)
    error = _event(browser, channel, "pusher:subscription_error")
    assert error["status"] == 403, error
