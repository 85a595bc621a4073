"""Delta compression in headless Chromium: the page's own module import of
/static/push/pushclient.js (which imports the vendored fossil-delta.js beside it, no
build step) subscribes with delta, in JSON and MessagePack; what is published over REST
arrives as deltas and reaches the handler as the published data, and a base altered in
the page is caught by the checksum and recovered without wrong data."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.browser.pages import page_record, publish_rest, wait_for
from tests.servers import ServerNode

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

START_CLIENT = """
const [url, channel, format, done] = arguments;
(async () => {
  const { PushClient } = await import("/static/push/pushclient.js");
  const msgpack = format === "msgpack" ? await import("/static/push/msgpack.js") : null;
  const seen = (window.deltaSeen = { messages: [], errors: [], frames: [] });
  const options = { transports: ["websocket"], ...(msgpack ? { msgpack } : {}) };
  const client = new PushClient(url, options);
  const undelta = client.undelta.bind(client);
  client.undelta = (message, frame) => {
    seen.frames.push([message.seq, Boolean(message.delta)]);
    return undelta(message, frame);
  };
  client.on("error", (error) => seen.errors.push(error.code));
  await client.connect();
  const handler = (m) => seen.messages.push([m.seq, m.data]);
  const subscription = await client.subscribe(channel, handler, { delta: true });
  window.deltaSubscription = subscription;
  done(subscription.deltaAgreed);
})().catch((error) => done(String(error)));
"""

CORRUPT_BASE = """
const base = window.deltaSubscription.base;
window.deltaSubscription.base = { ...base, text: base.text.replace('"bid":', '"bad":') };
"""


def board(seq: int) -> dict[str, Any]:
    rows = [{"id": i, "name": f"instrument {i}", "bid": 100 + i} for i in range(60)]
    rows[seq % 60]["bid"] = 1000 + seq
    return {"version": seq, "price": 100.0 + seq, "rows": rows}


@pytest.mark.parametrize("format", ["json", "msgpack"])
def test_the_browser_client_applies_deltas_and_recovers_from_a_wrong_base(
    browser: Any, page_node: ServerNode, publisher_token: str, format: str
) -> None:
    channel = f"delta-page-{uuid.uuid4().hex[:8]}"
    browser.get(f"{page_node.http_url}/?channel=unused-{channel}")
    browser.set_script_timeout(20)
    agreed = browser.execute_async_script(START_CLIENT, page_node.ws_url, channel, format)
    assert agreed is True, agreed

    def seen() -> dict[str, Any]:
        return page_record(browser, "deltaSeen")

    for seq in range(1, 4):
        publish_rest(page_node, publisher_token, channel, board(seq))
    wait_for("three messages", lambda: len(seen()["messages"]) == 3, browser)
    browser.execute_script(CORRUPT_BASE)
    for seq in range(4, 8):
        publish_rest(page_node, publisher_token, channel, board(seq))
    wait_for("seven messages", lambda: len(seen()["messages"]) == 7, browser)
    result = seen()
    assert result["messages"] == [[seq, board(seq)] for seq in range(1, 8)]
    assert result["errors"] == ["DELTA_MISMATCH"]
    assert result["frames"][:4] == [[1, False], [2, True], [3, True], [4, True]]
    assert [7, True] in result["frames"]
