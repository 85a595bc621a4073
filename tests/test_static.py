"""Every node serves static files itself (the admin's CSS, the JavaScript client),
under daphne with DEBUG off, where Django alone would not."""

from __future__ import annotations

import httpx
import pytest

from tests.servers import ServerNode

pytestmark = pytest.mark.e2e


def test_daphne_node_serves_admin_css_and_the_client(
    two_nodes: tuple[ServerNode, ServerNode],
) -> None:
    node = two_nodes[0]  # daphne, DEBUG off (tests/conftest.py)
    css = httpx.get(f"{node.http_url}/static/admin/css/base.css", timeout=10)
    client = httpx.get(f"{node.http_url}/static/push/pushclient.js", timeout=10)
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert client.status_code == 200 and "javascript" in client.headers["content-type"]
