"""The demo page without a WebSocket, in headless Chromium against real nodes: told to
skip it, or pointed at a WebSocket port where nothing listens, the client says "sse",
receives over EventSource what is published elsewhere, publishes from its box over
REST, and switches back to a WebSocket once one answers, without losing or repeating
a message."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.browser.pages import (
    publish_from_page,
    publish_rest,
    save_screenshot,
    wait_for,
    wait_for_seqs,
    wait_for_state,
)
from tests.servers import ServerNode

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PUBLISH_INTERVAL_SECS = 0.05


def open_demo(driver: Any, node: ServerNode, **params: str) -> None:
    driver.get(f"{node.http_url}/?{urlencode(params)}")


def text_of(driver: Any, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def test_page_told_to_skip_the_websocket_uses_sse_and_rest(
    browser: Any, page_node: ServerNode, other_node: ServerNode, publisher_token: str
) -> None:
    channel = f"sse-{uuid.uuid4().hex[:8]}"
    open_demo(browser, page_node, channel=channel, transport="sse")
    wait_for_state(browser, "sse")
    assert text_of(browser, "transport-used") == "Server-Sent Events + REST"

    # Published over REST on another node, delivered through the page's EventSource.
    for i in range(1, 4):
        publish_rest(other_node, publisher_token, channel, {"text": f"elsewhere {i}"})
    wait_for_seqs(browser, [1, 2, 3])
    assert '{"text":"elsewhere 3"}' in text_of(browser, "feed")

    # The publish box on SSE goes through REST with the token; Connect keeps the
    # transport the URL asked for and starts a fresh feed at the channel's seq.
    browser.find_element("id", "token").send_keys(publisher_token)
    browser.find_element("id", "connect").click()
    wait_for_state(browser, "sse")
    publish_from_page(browser, json.dumps({"text": "from the page"}))
    wait_for_seqs(browser, [4])
    result = browser.find_element("id", "publish-result")
    wait_for("the publish result", lambda: "published, seq 4 (over REST)" in result.text, browser)
    assert '{"text":"from the page"}' in text_of(browser, "feed")
    assert "transport=sse" in browser.current_url
    save_screenshot(browser, "demo-page-sse.png")


class Publisher(threading.Thread):
    """Publishes to a channel over REST until stopped, remembering every seq."""

    def __init__(self, node: ServerNode, token: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.node, self.token, self.channel = node, token, channel
        self.seqs: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(PUBLISH_INTERVAL_SECS):
            self.seqs.append(publish_rest(self.node, self.token, self.channel, len(self.seqs)))

    def stop(self) -> list[int]:
        self.stopped.set()
        self.join(10)
        return self.seqs


def test_page_falls_back_by_itself_and_returns_to_the_websocket_without_loss(
    browser: Any, page_node: ServerNode, e2e_env: dict[str, str], publisher_token: str
) -> None:
    channel = f"sse-back-{uuid.uuid4().hex[:8]}"
    # Nothing listens on this node's port until it starts: the page's WebSocket fails.
    ws_node = ServerNode(e2e_env, name=f"ws-{uuid.uuid4().hex[:6]}")
    open_demo(browser, page_node, channel=channel, ws=ws_node.ws_url)
    wait_for_state(browser, "sse")
    assert text_of(browser, "server-id") == page_node.name
    for i in range(1, 4):
        publish_rest(page_node, publisher_token, channel, {"over": "sse", "i": i})
    wait_for_seqs(browser, [1, 2, 3])

    # A WebSocket answers now; the page's next probe switches to it while messages
    # keep coming, and the feed stays exactly consecutive.
    publisher = Publisher(page_node, publisher_token, channel)
    try:
        ws_node.start()
        publisher.start()
        wait_for_state(browser, "connected")
        sent_on_sse = len(publisher.seqs)
        wait_for(
            "messages over the WebSocket", lambda: len(publisher.seqs) >= sent_on_sse + 5, browser
        )
        published = publisher.stop()
        assert published == list(range(4, 4 + len(published)))
        wait_for_seqs(browser, list(range(1, 4 + len(published))))
        assert text_of(browser, "transport-used") == "WebSocket"
        assert text_of(browser, "server-id") == ws_node.name
        assert text_of(browser, "gaps") == "0"
        events = text_of(browser, "events")
        assert "reconnecting → sse" in events
        assert "sse → connected" in events
    finally:
        publisher.stop()
        ws_node.stop()
