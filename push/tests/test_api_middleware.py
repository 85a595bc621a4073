"""The middleware of an async request (``push.api.middleware``): hooks that cannot
block run on the loop, the others (a session write, a static file) on the request's
thread, and every middleware still does its work."""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.core.signals import request_finished
from django.db import connection
from django.http import HttpResponseBase
from rest_framework.authtoken.models import Token
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer

from push.api import middleware
from push.api.handler import LoopHandler, RequestExecutor, RequestThreads
from push.api.renderers import MessagePageRenderer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def handler() -> LoopHandler:
    return LoopHandler()


@pytest.fixture
async def http(handler: LoopHandler) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=handler)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


@pytest.fixture
def closed_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """For each response closed, the name of the thread that closed it (Django sends
    ``request_finished`` from there)."""
    threads: list[str] = []
    real = HttpResponseBase.close

    def recording(self: HttpResponseBase) -> None:
        threads.append(threading.current_thread().name)
        real(self)

    monkeypatch.setattr(HttpResponseBase, "close", recording)
    return threads


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hooks ``push.api.middleware`` sent to a thread."""
    sent: list[str] = []
    real = middleware.sync_to_async

    def recording(func: Any, **kwargs: Any) -> Any:
        sent.append(func.__qualname__)
        return real(func, **kwargs)

    monkeypatch.setattr(middleware, "sync_to_async", recording)
    return sent


async def test_an_api_request_runs_every_hook_on_the_loop(
    http: httpx.AsyncClient, hops: list[str]
) -> None:
    user = await User.objects.acreate(username="reader")
    token = await Token.objects.acreate(user=user)
    response = await http.get(
        "/api/v1/channels/news/messages", headers={"Authorization": f"Token {token.key}"}
    )
    assert response.status_code == 200, response.text
    assert hops == []
    # Security, clickjacking and content-type headers, as from Django's own middleware.
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"


async def test_a_sign_in_writes_its_session_on_the_request_s_thread(
    http: httpx.AsyncClient, hops: list[str]
) -> None:
    await User.objects.acreate_superuser("admin", "admin@example.com", "pw-123456")
    signed_in = await sign_in(http)
    assert signed_in.status_code == 302, signed_in.text
    assert await Session.objects.filter(session_key=signed_in.cookies["sessionid"]).aexists()
    assert "SessionMiddleware.process_response" in hops
    assert "CsrfViewMiddleware.process_view" in hops  # it read the form
    assert (await http.get("/admin/")).status_code == 200


async def test_an_admin_message_reaches_the_next_page_and_an_api_request_makes_no_storage(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message storage is made only when a view reads or adds a message."""
    made: list[str] = []
    real = middleware.default_storage

    def recording(request: Any) -> Any:
        made.append(request.path)
        return real(request)

    monkeypatch.setattr(middleware, "default_storage", recording)
    user = await User.objects.acreate(username="reader")
    token = await Token.objects.acreate(user=user)
    response = await http.get(
        "/api/v1/channels/news/messages", headers={"Authorization": f"Token {token.key}"}
    )
    assert response.status_code == 200 and made == []
    assert "messages" not in response.cookies
    await User.objects.acreate_superuser("admin", "admin@example.com", "pw-123456")
    assert (await sign_in(http)).status_code == 302
    added = await post_form(http, "/admin/auth/group/add/", {"name": "editors"})
    assert added.status_code == 302, added.text
    shown = await http.get(added.headers["location"])
    assert "editors" in shown.text and "was added successfully" in shown.text


async def sign_in(http: httpx.AsyncClient) -> httpx.Response:
    form = {"username": "admin", "password": "pw-123456"}
    return await post_form(http, "/admin/login/?next=/admin/", form, page="/admin/login/")


async def post_form(
    http: httpx.AsyncClient, url: str, form: dict[str, str], *, page: str | None = None
) -> httpx.Response:
    """POST ``form`` to ``url`` with the CSRF token of the form on ``page`` (``url``)."""
    shown = await http.get(page or url)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', shown.text)
    assert csrf is not None and "csrftoken" in http.cookies
    return await http.post(url, data={**form, "csrfmiddlewaretoken": csrf[1]})


async def test_a_static_file_is_served(http: httpx.AsyncClient) -> None:
    response = await http.get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert "body" in response.text


async def test_requests_reuse_their_threads_instead_of_starting_new_ones(
    http: httpx.AsyncClient,
) -> None:
    """Every request closes its response on its thread-sensitive thread (Django sends
    ``request_finished`` from there): one after another, they share one lent thread."""
    threads: list[str] = []

    def record(**_: Any) -> None:
        threads.append(threading.current_thread().name)

    request_finished.connect(record)
    try:
        for _ in range(10):
            assert (await http.get("/api/v1/channels/news/messages")).status_code in (200, 401)
    finally:
        request_finished.disconnect(record)
    assert len(threads) == 10
    assert len(set(threads)) == 1 and threads[0].startswith("push-request")


def test_request_threads_keep_a_bounded_number_idle() -> None:
    threads = RequestThreads(idle_max=2)
    lent = [threads.lend() for _ in range(5)]
    assert len({id(executor) for executor in lent}) == 5
    for executor in lent:
        threads.give_back(executor)
    assert {id(threads.lend()) for _ in range(3)} & {id(e) for e in lent[:2]}
    for executor in lent[2:]:  # shut down when given back over the bound
        with pytest.raises(RuntimeError):
            executor.submit(print)


async def test_json_renders_on_the_loop_and_the_browsable_api_on_the_request_thread(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered_on: dict[str, str] = {}
    for renderer in (JSONRenderer, MessagePageRenderer, BrowsableAPIRenderer):
        real = renderer.render

        def recording(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            kind = "html" if isinstance(self, BrowsableAPIRenderer) else "json"
            rendered_on.setdefault(kind, threading.current_thread().name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(renderer, "render", recording)
    path = "/api/v1/channels/news/messages"
    as_json = await http.get(path, headers={"Accept": "application/json"})
    assert as_json.headers["Content-Type"] == "application/json"
    assert as_json.json() == {"results": [], "next": None}
    as_html = await http.get(path, headers={"Accept": "text/html"})
    assert as_html.headers["Content-Type"].startswith("text/html")
    assert rendered_on["json"] == threading.main_thread().name
    assert rendered_on["html"].startswith("push-request")


async def test_a_request_that_needed_no_thread_ends_on_the_loop(
    http: httpx.AsyncClient, closed_on: list[str]
) -> None:
    """With only Django's receivers of the request signals, a request none of whose
    sync calls ran on its lent thread starts and ends without one."""
    assert (await http.get("/api/v1/channels/news/messages")).status_code == 200
    assert closed_on == [threading.main_thread().name]


async def test_a_request_that_used_its_thread_returns_its_database_connection_there(
    handler: LoopHandler, http: httpx.AsyncClient, closed_on: list[str]
) -> None:
    """A sign-in reads the user and writes the session on the request's thread: the
    response is closed there, and ``close_old_connections`` gives the thread's
    connection back to the pool, as Django would."""
    await User.objects.acreate_superuser("admin", "admin@example.com", "pw-123456")
    lent: list[RequestExecutor] = []
    real_lend = handler.request_threads.lend

    def lend() -> RequestExecutor:
        lent.append(real_lend())
        return lent[-1]

    handler.request_threads.lend = lend  # type: ignore[method-assign]  # recording the lent executors
    page = await http.get("/admin/login/")
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert csrf is not None
    signed_in = await http.post(
        "/admin/login/?next=/admin/",
        data={"username": "admin", "password": "pw-123456", "csrfmiddlewaretoken": csrf[1]},
    )
    assert signed_in.status_code == 302, signed_in.text
    assert lent[-1].used
    assert closed_on[-1].startswith("push-request")
    assert lent[-1].submit(lambda: connection.connection is None).result(timeout=5)
