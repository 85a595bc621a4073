"""DRF's browsable API on a real node: what anyone gets asking a REST page with
``Accept: text/html``, a browser's default."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.servers import ServerNode, publish_rest

pytestmark = pytest.mark.e2e

# Three messages of ~600 KB of JSON each: a page of ~1.8 MB, well within its byte budget.
MESSAGES = 3
ZEROS = 300_000
# The shown part (64 KiB) and the page around it.
HTML_MAX_BYTES = 256 * 1024


async def test_the_browsable_api_shows_the_start_of_a_large_page(
    own_node: ServerNode, publisher_token: str
) -> None:
    """The browsable API indents a response and runs Django's ``urlize`` over it: such
    a page of arrays became ~10 times its size in HTML and cost the node seconds of
    CPU and hundreds of MB of memory per anonymous request. It shows the start now, and
    JSON still has the whole page."""
    channel = f"browsable-{uuid.uuid4().hex[:8]}"
    for _ in range(MESSAGES):
        await publish_rest(own_node, publisher_token, channel, [0] * ZEROS)
    path = f"/api/v1/channels/{channel}/messages?since=0"
    async with httpx.AsyncClient(base_url=own_node.http_url, timeout=60) as http:
        html = await http.get(path, headers={"Accept": "text/html"})
        page = await http.get(path, headers={"Accept": "application/json"})
    assert html.status_code == 200
    assert html.headers["Content-Type"].startswith("text/html")
    assert len(html.content) < HTML_MAX_BYTES
    assert "ask with Accept: application/json for the whole response" in html.text
    assert [m["data"] for m in page.json()["results"]] == [[0] * ZEROS] * MESSAGES
