"""Rewind, the latest value and occupancy in headless Chromium: the page's own module
import of /static/push/pushclient.js subscribes against a real node. A rewind while
messages are published over REST gets exactly the last N stored ones, then live, with
no gap and no duplicate in what the server sent or what the handler got; ``latest``
hands the current value, then each change; ``occupancy: true`` reports the subscriber
count as another client in the page joins and leaves."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from tests.browser.pages import page_record, publish_rest, wait_for
from tests.servers import ServerNode
from tests.waiting import wait_until_blocking

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

STORED = 6
REWIND = 4
# How long the publisher goes on after the rewind's reply: live messages follow it.
LIVE_SECS = 0.5

# `frames`: the seq of every message frame the server sent, before the client's own
# ordering (which would hide a duplicate or repair a gap); `messages`: what the handler
# got, with its `replayed` flag.
START_CLIENT = """
const [url, channel, rewind, done] = arguments;
(async () => {
  const { PushClient } = await import("/static/push/pushclient.js");
  const seen = (window.contextSeen = { frames: [], messages: [], values: [], events: [] });
  const client = new PushClient(url, { transports: ["websocket"] });
  const undelta = client.undelta.bind(client);
  client.undelta = (message, frame) => {
    if (message.channel === channel) seen.frames.push(message.seq);
    return undelta(message, frame);
  };
  for (const name of ["error", "gap", "unrecovered"]) {
    client.on(name, (event) => seen.events.push([name, event.code ?? null]));
  }
  await client.connect();
  window.contextClient = client;
  const handler = (m, meta) => seen.messages.push([m.seq, m.data, meta.replayed]);
  const subscription = await client.subscribe(channel, handler, { rewind });
  done(subscription.seq);
})().catch((error) => done(String(error)));
"""

START_LATEST = """
const [channel, done] = arguments;
const seen = window.contextSeen;
window.contextClient
  .latest(channel, (value, message) => seen.values.push([message.seq, value]))
  .then((subscription) => done(subscription.seq), (error) => done(String(error)));
"""

# The watcher subscribes with occupancy; `second` is another client (its own
# WebSocket, so another subscriber for the server) that joins and leaves.
START_WATCHER = """
const [url, channel, done] = arguments;
(async () => {
  const { PushClient } = await import("/static/push/pushclient.js");
  const seen = (window.occupancySeen = { counts: [], events: [] });
  const client = new PushClient(url, { transports: ["websocket"] });
  client.on("occupancy", (event) => {
    if (event.channel === channel) seen.counts.push(event.subscribers);
  });
  client.on("error", (error) => seen.events.push(["error", error.code]));
  await client.connect();
  window.occupancySubscription = await client.subscribe(channel, () => {}, { occupancy: true });
  window.secondClient = new PushClient(url, { transports: ["websocket"] });
  await window.secondClient.connect();
  done(true);
})().catch((error) => done(String(error)));
"""

SECOND_JOINS = """
const [channel, done] = arguments;
window.secondClient.subscribe(channel, () => {}).then(
  () => done(true),
  (error) => done(String(error)),
);
"""

SECOND_UNSUBSCRIBES = """
const [channel, done] = arguments;
window.secondClient.unsubscribe(channel).then(
  (reply) => done(reply.type),
  (error) => done(String(error)),
);
"""


class SteadyPublisher:
    """Publishes ``{"n": k}`` over REST every few milliseconds from a thread of its own
    until stopped; ``published`` maps each seq to its data."""

    def __init__(self, node: ServerNode, token: str, channel: str) -> None:
        self.node, self.token, self.channel = node, token, channel
        self.published: dict[int, Any] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 0
        while not self.stop.is_set():
            data = {"n": k}
            self.published[publish_rest(self.node, self.token, self.channel, data)] = data
            k += 1
            time.sleep(0.01)

    def __enter__(self) -> SteadyPublisher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def test_the_browser_client_rewinds_then_goes_live_without_gap_or_duplicate(
    browser: Any, page_node: ServerNode, publisher_token: str
) -> None:
    channel = f"rewind-page-{uuid.uuid4().hex[:8]}"
    stored: dict[int, Any] = {}
    for i in range(STORED):
        stored[publish_rest(page_node, publisher_token, channel, {"stored": i})] = {"stored": i}
    browser.get(f"{page_node.http_url}/?channel=unused-{channel}")
    browser.set_script_timeout(20)
    with SteadyPublisher(page_node, publisher_token, channel) as publisher:
        # The subscribe lands while the channel is being published to: the seam.
        wait_until_blocking(lambda: publisher.published, "the publisher's first message")
        latest = browser.execute_async_script(START_CLIENT, page_node.ws_url, channel, REWIND)
        assert isinstance(latest, int), latest
        time.sleep(LIVE_SECS)
    published = {**stored, **publisher.published}
    last = max(published)
    assert latest > STORED and last > latest, (latest, last)

    def seen() -> dict[str, Any]:
        return page_record(browser, "contextSeen")

    wait_for(f"seq {last}", lambda: seen()["frames"][-1:] == [last], browser)
    result = seen()
    expected = list(range(latest - REWIND + 1, last + 1))
    assert result["frames"] == expected  # what the server sent: no gap, no duplicate
    assert result["messages"] == [[seq, published[seq], seq <= latest] for seq in expected]
    assert result["events"] == []

    # `latest`: the current value at once, then each change.
    other = f"latest-page-{uuid.uuid4().hex[:8]}"
    for price in (10, 11, 12):
        publish_rest(page_node, publisher_token, other, {"price": price})
    assert browser.execute_async_script(START_LATEST, other) == 3
    wait_for("the latest value", lambda: seen()["values"] == [[3, {"price": 12}]], browser)
    publish_rest(page_node, publisher_token, other, {"price": 13})
    wait_for(
        "the change",
        lambda: seen()["values"] == [[3, {"price": 12}], [4, {"price": 13}]],
        browser,
    )
    assert seen()["events"] == []


def test_the_browser_client_hears_the_occupancy_of_its_channel(
    browser: Any, page_node: ServerNode
) -> None:
    channel = f"occupancy-page-{uuid.uuid4().hex[:8]}"
    browser.get(f"{page_node.http_url}/?channel=unused-{channel}")
    browser.set_script_timeout(20)
    assert browser.execute_async_script(START_WATCHER, page_node.ws_url, channel) is True

    def seen() -> dict[str, Any]:
        return page_record(browser, "occupancySeen")

    def until(count: int) -> None:
        wait_for(f"the count {count}", lambda: seen()["counts"][-1:] == [count], browser)

    until(1)  # itself, at once
    assert browser.execute_async_script(SECOND_JOINS, channel) is True
    until(2)
    assert browser.execute_async_script(SECOND_UNSUBSCRIBES, channel) == "unsubscribed"
    until(1)
    assert browser.execute_async_script(SECOND_JOINS, channel) is True
    until(2)
    browser.execute_script("window.secondClient.close()")  # the connection goes
    until(1)
    result = seen()
    held = browser.execute_script("return window.occupancySubscription.subscribers")
    assert held == 1  # `subscription.subscribers` follows the events
    # Only changes, and each one the count went through.
    assert result["counts"] == [1, 2, 1, 2, 1]
    assert result["events"] == []
