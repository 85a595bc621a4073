"""The real Pusher client libraries against real nodes, for tests/test_pusher_js.py and
tests/browser/test_pusher_browser.py: pusher-js and Laravel Echo from npm (pinned by
``tests/pusher_js/package-lock.json``, installed by ``make services``), driven in Node
through ``tests/pusher_js/*_client.mjs``, and a small web site for the browser page and
the channel authorization the libraries ask for."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from devtools.processes import free_port
from tests.servers import ROOT, ServerNode, manage
from tests.test_context_js_e2e import NodeSubscriber
from tests.test_delta_e2e import node_command

PUSHER_JS = ROOT / "tests" / "pusher_js"
PUSHER_CLIENT = PUSHER_JS / "pusher_client.mjs"
ECHO_CLIENT = PUSHER_JS / "echo_client.mjs"
MISSING_PACKAGES = (
    "needs pusher-js and laravel-echo from npm: make services "
    "(npm ci in tests/pusher_js, as package-lock.json pins them)"
)
# The scripts end by themselves after this long, whatever the test does.
SCRIPT_LIFETIME_SECS = 90
QUIET_SECS = 1.0


def require_pusher_js() -> None:
    """Skip (fail in CI, where ``make services`` installs them) without the packages."""
    if not (PUSHER_JS / "node_modules" / "pusher-js" / "package.json").exists():
        if os.environ.get("CI"):
            pytest.fail(MISSING_PACKAGES)
        pytest.skip(MISSING_PACKAGES)


def api_tokens(env: dict[str, str], *, granted: list[str], refused: list[str]) -> dict[str, str]:
    """API tokens by username, made in one go: the ``granted`` users may subscribe,
    publish and see presence on every channel; the ``refused`` ones have no grant (a
    signed-in user's public channels only)."""
    script = (
        "from django.contrib.auth.models import User;"
        "from rest_framework.authtoken.models import Token;"
        "from accounts.models import ChannelGrant;"
        f"granted = {granted!r};"
        f"names = granted + {refused!r};"
        "users = [User.objects.get_or_create(username=n)[0] for n in names];"
        "[ChannelGrant.objects.get_or_create(user=u, pattern='*', can_subscribe=True,"
        " can_publish=True, can_presence=True) for u in users if u.username in granted];"
        "[print('TOKEN', u.username, Token.objects.get_or_create(user=u)[0].key) for u in users]"
    )
    output = manage(env, "shell", "-c", script)
    return {
        parts[1]: parts[2]
        for parts in (line.split() for line in output.splitlines())
        if len(parts) == 3 and parts[0] == "TOKEN"
    }


class PusherScript(NodeSubscriber):
    """pusher_client.mjs or echo_client.mjs in a process of its own: commands in, its
    JSON lines as they come."""

    @classmethod
    async def launch(cls, script: Any, node: ServerNode, key: str, **config: Any) -> PusherScript:
        require_pusher_js()
        settings = {"key": key, "port": node.port, "lifetimeSecs": SCRIPT_LIFETIME_SECS, **config}
        process = await asyncio.create_subprocess_exec(
            *node_command(),
            str(script),
            json.dumps(settings),
            cwd=PUSHER_JS,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def send(self, op: str, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await self.process.stdin.drain()

    async def connected(self) -> str:
        """Wait for the connection; its socket id."""
        line = await self.until("the connection", lambda line: line.get("state") == "connected")
        return str(line["socket_id"])

    async def event(self, channel: str, event: str) -> Any:
        """Wait for ``event`` on ``channel``; its data."""
        line = await self.until(
            f"{event} on {channel}",
            lambda line: line.get("channel") == channel and line.get("event") == event,
        )
        return line["data"]

    async def line_with(self, **fields: Any) -> dict[str, Any]:
        """Wait for a line with these values."""
        return await self.until(
            str(fields), lambda line: all(line.get(k) == v for k, v in fields.items())
        )

    async def line_having(self, key: str) -> dict[str, Any]:
        return await self.until(key, lambda line: key in line)

    async def subscribed(self, channel: str) -> Any:
        await self.send("subscribe", channel=channel)
        return await self.event(channel, "pusher:subscription_succeeded")

    async def quiet(self, what: str, unwanted: Callable[[dict[str, Any]], bool]) -> None:
        """Read for QUIET_SECS and fail if a line satisfies ``unwanted``."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + QUIET_SECS
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                raw = await asyncio.wait_for(self.process.stdout.readline(), remaining)
            except TimeoutError:
                return
            if not raw:
                return
            line = json.loads(raw)
            self.lines.append(line)
            assert not unwanted(line), f"{what}: {line}; lines:\n{self.transcript()}"

    def transcript(self) -> str:
        """Every line so far, one a line: the frames exchanged (the ``frames`` setting),
        what the library reported and logged (for an assertion's message)."""
        return "\n".join(json.dumps(line) for line in self.lines)


class _SiteHandler(BaseHTTPRequestHandler):
    server: PusherSite

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = (PUSHER_JS / self.path.split("?")[0].lstrip("/")).resolve()
        if not path.is_relative_to(PUSHER_JS) or not path.is_file():
            self._answer(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            return
        kind = "text/html" if path.suffix == ".html" else "text/javascript"
        self._answer(HTTPStatus.OK, path.read_bytes(), kind)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/pusher/auth":
            status, answer = self.server.authorize(self.headers.get("Authorization", ""), body)
            self._answer(status, answer, "application/json")
        elif self.path == "/pusher/forged-auth":
            # A signature that no secret made: the node must refuse the subscribe.
            forged = {"auth": f"{self.server.app_key}:{'0' * 64}"}
            self._answer(HTTPStatus.OK, json.dumps(forged).encode(), "application/json")
        else:
            self._answer(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

    def _answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class PusherSite(ThreadingHTTPServer):
    """A web site of the tests on a port of its own: the files of tests/pusher_js (the
    browser page, pusher-js's web build) and ``POST /pusher/auth``, which a page of this
    site may call (same origin). The authorization itself is the node's: the site passes
    the request on and its answer back. ``POST /pusher/forged-auth`` answers a signature
    that no secret made."""

    def __init__(self, node: ServerNode, app_key: str) -> None:
        super().__init__(("127.0.0.1", free_port()), _SiteHandler)
        self.node = node
        self.app_key = app_key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def authorize(self, authorization: str, body: bytes) -> tuple[int, bytes]:
        response = httpx.post(
            f"{self.node.http_url}/pusher/auth",
            content=body,
            headers={
                "Authorization": authorization,
                "Content-Type": "application/x-www-form-urlencoded",
            },
            timeout=10,
        )
        return response.status_code, response.content


@contextmanager
def pusher_site(node: ServerNode, app_key: str) -> Iterator[PusherSite]:
    site = PusherSite(node, app_key)
    thread = threading.Thread(target=site.serve_forever, name="pusher-site", daemon=True)
    thread.start()
    try:
        yield site
    finally:
        site.shutdown()
        site.server_close()
        thread.join(timeout=5)
