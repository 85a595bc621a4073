"""Password guessing at the admin's login form, against a real node: each guess costs
the node a password hash (~360 ms of CPU), so an address's failed sign-ins count as
its failed authentications (accounts/password_backend.py)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.servers import ServerNode, create_superuser

pytestmark = pytest.mark.e2e

FAILURES_PER_MIN = 3
GUESSES_PAST_THE_LIMIT = 10
# A hash costs ~360 ms of CPU: ten of them would be ~3.6 s.
CPU_SECS_FOR_GUESSES_PAST_THE_LIMIT = 1.0
PASSWORD = "a-long-admin-password"


@pytest.fixture(scope="module")
def admin_node(e2e_env: dict[str, str]) -> Iterator[ServerNode]:
    env = {**e2e_env, "PUSH_AUTH_FAILURES_PER_MIN": str(FAILURES_PER_MIN)}
    node = ServerNode(env, server="uvicorn", name=f"admin-{uuid.uuid4().hex[:6]}").start()
    yield node
    node.stop()


def _cpu_secs(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _sign_in(http: httpx.AsyncClient, username: str, password: str) -> bool:
    """Whether the admin's login form let ``username`` in."""
    page = await http.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None, page.text[:300]
    response = await http.post(
        "/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": token.group(1),
            "username": username,
            "password": password,
            "next": "/admin/",
        },
        headers={"Referer": f"{http.base_url}admin/login/"},
    )
    return response.status_code == 302


def _client(node: ServerNode, address: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=node.http_url, transport=transport, timeout=30)


async def test_an_address_past_its_failures_has_no_password_checked(
    admin_node: ServerNode, e2e_env: dict[str, str]
) -> None:
    username = f"admin-{uuid.uuid4().hex[:6]}"
    create_superuser(e2e_env, username, PASSWORD)
    assert admin_node.process is not None
    async with _client(admin_node, "127.0.3.2") as http:
        for n in range(FAILURES_PER_MIN):
            assert not await _sign_in(http, f"nobody-{n}", "guess")
        before = _cpu_secs(admin_node.process.pid)
        for n in range(GUESSES_PAST_THE_LIMIT):
            assert not await _sign_in(http, f"nobody-{n}", "guess")
        spent = _cpu_secs(admin_node.process.pid) - before
        # Within the minute, the right password is not checked either.
        assert not await _sign_in(http, username, PASSWORD)
    assert spent < CPU_SECS_FOR_GUESSES_PAST_THE_LIMIT
    async with _client(admin_node, "127.0.3.3") as http:
        assert await _sign_in(http, username, PASSWORD)
