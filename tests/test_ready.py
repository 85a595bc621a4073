"""Readiness names the dependency that is down; health stays up."""

from __future__ import annotations

import httpx
import pytest

from devtools.processes import free_port
from tests.servers import ServerNode

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("down", ["database", "redis"])
def test_ready_is_503_naming_the_unreachable_dependency(e2e_env: dict[str, str], down: str) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = dict(e2e_env)
    if down == "database":
        env["DATABASE_URL"] = f"postgres://postgres@{closed}/nowhere"
    else:
        env["REDIS_URL"] = f"redis://{closed}/0"
    node = ServerNode(env, name=f"ready-{down}").start()
    try:
        assert httpx.get(f"{node.http_url}/health", timeout=5).status_code == 200
        response = httpx.get(f"{node.http_url}/ready", timeout=10)
        assert response.status_code == 503
        failing = response.json()["failing"]
        assert len(failing) == 1 and failing[0].startswith(down)
    finally:
        node.stop()
