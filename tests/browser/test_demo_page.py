"""The demo page in headless Chromium against real nodes: it connects, shows what is
published over REST and from its own publish box, resumes over the WebSocket (with
`since`, the SSE fallback turned off) without a gap when its node restarts while
messages keep being published elsewhere, and speaks MessagePack when asked."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.browser.pages import (
    page_protocol,
    page_state,
    publish_from_page,
    publish_rest,
    save_screenshot,
    wait_for,
    wait_for_seqs,
)
from tests.servers import ServerNode

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def open_demo(driver: Any, node: ServerNode, channel: str, **params: str) -> None:
    driver.get(f"{node.http_url}/?{urlencode({'channel': channel, **params})}")
    wait_for("the page to connect", lambda: page_state(driver) == "connected", driver)


def test_demo_page_loads_the_client_from_the_static_url(page_node: ServerNode) -> None:
    page = httpx.get(f"{page_node.http_url}/", timeout=10)
    script = httpx.get(f"{page_node.http_url}/static/push/pushclient.js", timeout=10)
    assert page.status_code == 200
    assert '"/static/push/demo.js"' in page.text
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "export class PushClient" in script.text


def test_page_receives_rest_messages_and_resumes_after_a_restart_without_gaps(
    browser: Any,
    own_node: ServerNode,
    other_node: ServerNode,
    publisher_token: str,
) -> None:
    page_node = own_node  # stopped and started again below
    channel = f"demo-{uuid.uuid4().hex[:8]}"
    # WebSocket only: the restart below must be survived by a WebSocket resume with
    # `since`, not by the SSE fallback (tests/browser/test_sse_fallback.py has that).
    open_demo(browser, page_node, channel, transport="websocket")
    assert page_protocol(browser) == "v1.json"

    # Published over REST, shown on the page.
    for i in range(1, 4):
        publish_rest(page_node, publisher_token, channel, {"text": f"rest {i}"})
    wait_for_seqs(browser, [1, 2, 3])
    assert '{"text":"rest 3"}' in browser.find_element("id", "feed").text

    # Published from the page's own box, with a token: the page reconnects with it.
    browser.find_element("id", "token").send_keys(publisher_token)
    browser.find_element("id", "connect").click()
    wait_for("the reconnect with a token", lambda: page_state(browser) == "connected", browser)
    # The page starts a fresh feed on Connect: it subscribes at the channel's current seq.
    publish_from_page(browser, json.dumps({"text": "from the page"}))
    wait_for_seqs(browser, [4])
    assert "published, seq 4" in browser.find_element("id", "publish-result").text

    # The page's node goes down; another node keeps publishing what the page misses.
    page_node.stop()
    wait_for("the page to notice", lambda: page_state(browser) == "reconnecting", browser)
    missed = [publish_rest(other_node, publisher_token, channel, {"missed": i}) for i in range(5)]
    assert missed == [5, 6, 7, 8, 9]
    page_node.start()  # the same port: the page reconnects by itself
    wait_for("the page to reconnect", lambda: page_state(browser) == "connected", browser)
    for i in range(3):
        publish_rest(other_node, publisher_token, channel, {"after": i})
    wait_for_seqs(browser, list(range(4, 13)))

    # Stats refresh twice a second: wait for the figure of the one restart.
    reconnects = browser.find_element("id", "reconnects")
    wait_for("the reconnect count", lambda: reconnects.text == "1", browser)
    assert browser.find_element("id", "gaps").text == "0"
    assert browser.find_element("id", "transport-used").text == "WebSocket"
    assert "transport=websocket" in browser.current_url
    assert "sse" not in browser.find_element("id", "events").text
    replayed = browser.find_elements("css selector", "#feed li .lat")
    assert [cell.text for cell in replayed[3:8]] == ["replayed"] * 5  # seqs 9..5
    save_screenshot(browser, "demo-page.png")


def test_page_speaks_messagepack_with_the_vendored_codec(
    browser: Any, page_node: ServerNode, publisher_token: str
) -> None:
    channel = f"demo-mp-{uuid.uuid4().hex[:8]}"
    open_demo(browser, page_node, channel)
    browser.find_element("css selector", "#format option[value=msgpack]").click()
    browser.find_element("id", "connect").click()
    wait_for("the msgpack connection", lambda: page_protocol(browser) == "v1.msgpack", browser)
    assert page_state(browser) == "connected"
    data = {"big": 2**53 - 1, "float": 0.1, "text": "héllo ✓", "list": [None, True]}
    publish_rest(page_node, publisher_token, channel, data)
    wait_for_seqs(browser, [1])
    shown = browser.find_element("css selector", "#feed li .data").text
    assert json.loads(shown) == data
