"""ASGI entry point: HTTP to Django, WebSocket to the push consumer, ``/sse/`` to the
Server-Sent Events stream.

Before anything else, every request's client address is taken from behind the
trusted proxies (``PUSH_TRUSTED_PROXIES``; by default the socket peer), so REST
throttles, connection limits, the registry and logs all see the same address; and
WebSocket and SSE requests must name one of ``ALLOWED_HOSTS`` in ``Host``, as Django
checks for its views (else a DNS-rebinding page could read an intranet deployment's
streams). WebSockets then pass the origin check (browsers only; a client without
``Origin`` is not a browser and is allowed) and token or session authentication before
the consumer, in ``push.transport.entry``. A REST request from an address over its
REST budget (``push.services.admission``) is answered 429 here, before Django, and an
anonymous one while the node is overloaded 503; so is any other request Django serves
(the admin, ``/ready``, ``/metrics``) over that budget.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")

import django

django.setup(set_prefix=False)

from push.api.fast_publish import FastPublish  # noqa: E402
from push.api.handler import LoopHandler  # noqa: E402
from push.transport.server_adapters import (  # noqa: E402
    MAX_CONTENT_TYPE_BYTES,
    peer_gone_probe,
)

# What get_asgi_application() returns, with the middleware hooks that cannot block
# run on the event loop (push.api.middleware).
django_asgi_app = LoopHandler()
# A back-end's plain REST publish answered on the loop, the rest through Django (and
# so is one whose client left before its answer, as Django cancels it).
rest_app = FastPublish(django_asgi_app, peer_gone=peer_gone_probe)

from channels.security.websocket import WebsocketDenier  # noqa: E402
from django.conf import settings  # noqa: E402

from common.conf import push_settings  # noqa: E402
from common.errors import ErrorCode  # noqa: E402
from push.cluster.node import tune_garbage_collector  # noqa: E402
from push.services.admission import (  # noqa: E402
    rest_failed,
    rest_refused,
    shed_anonymous_rest,
)
from push.services.runtime import get_node  # noqa: E402
from push.transport.entry import WebSocketEntry  # noqa: E402
from push.transport.origin import forwarded_client, forwarded_scheme, host_allowed  # noqa: E402
from push.transport.sse import SSE_PATHS, SseEntry  # noqa: E402

websocket_entry = WebSocketEntry(settings.ALLOWED_ORIGINS)
sse_entry = SseEntry(settings.ALLOWED_ORIGINS)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """HTTP to Django, WebSocket to the push consumer (what ProtocolTypeRouter does,
    without one more frame held for every connection)."""
    if scope["type"] in ("http", "websocket"):
        _apply_trusted_proxies(scope)
    if scope["type"] == "websocket":
        if not host_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await websocket_entry(scope, receive, send)
    if scope["type"] == "http" and scope["path"] in SSE_PATHS:
        if not host_allowed(scope):
            return await _bad_host(send)
        return await sse_entry(scope, receive, send)
    if scope["type"] == "http" and _content_type_too_long(scope):
        return await _refusal(send, 415, _CONTENT_TYPE_TOO_LONG)
    if scope["type"] == "http" and scope["path"].startswith(NODE_PATHS):
        await _start_node()
        # Our REST API has the address budget; the Pusher HTTP API is for back-ends,
        # signed with their app's secret, as service tokens are not held to it: only
        # its failures are (an unsigned request costs the node what a REST one does).
        if scope["path"].startswith(API_PREFIX):
            retry_after = rest_refused(scope)
            if retry_after is not None:
                return await _rest_refusal(send, 429, retry_after, _OVER_REST_BUDGET)
            if shed_anonymous_rest(scope):
                return await _rest_refusal(send, 503, 1, _OVERLOADED)
            return await rest_app(scope, receive, send)
        return await _failures_budgeted(scope, receive, send)
    elif scope["type"] == "http" and scope["path"] in PUSHER_AUTH_PATHS:
        await _start_node()
        return await _failures_budgeted(scope, receive, send)
    elif scope["type"] == "http" and scope["path"] != LIVENESS_PATH:
        # Every other page Django serves costs what a REST request does (measured: /ready
        # 2.5 ms of CPU with a database read and a Redis connection, /metrics 3.6 ms,
        # the admin's login 3 ms, a 404 1-2 ms), so it takes from the same budget, which
        # the node keeps (started here as for the API, or the first requests go free).
        await _start_node()
        retry_after = rest_refused(scope)
        if retry_after is not None:
            return await _rest_refusal(send, 429, retry_after, _OVER_REST_BUDGET)
    return await django_asgi_app(scope, receive, send)


# Requests that publish (our REST API, the Pusher HTTP API) or read the node's counts.
API_PREFIX = "/api/"
NODE_PATHS = (API_PREFIX, "/apps/")
# Held to the REST budget only when they fail, as the Pusher HTTP API (/apps/, signed by
# back-ends) is: Pusher's authorization endpoints (a browser asks them for each private
# channel it joins: they draw on its credential's REST throttle).
PUSHER_AUTH_PATHS = frozenset({"/pusher/auth", "/pusher/user-auth"})
# Not held to the REST budget at all: cheaper than the refusal, and a refused liveness
# probe would restart the node.
LIVENESS_PATH = "/health"
# After a failed start, REST requests do not try again for this long, so a Redis
# outage does not add a connect timeout to every request.
NODE_RETRY_SECS = 5.0
_logger = logging.getLogger(__name__)
_node_failed_at = -NODE_RETRY_SECS


async def _start_node() -> None:
    """REST publishes (ours and the Pusher HTTP API's) go through the node's write
    pipeline (group commit), so a node that serves only REST starts its node with its
    first API request, as a WebSocket does with its first connection (and with the
    first request to any other page, whose budget the node keeps). If it cannot
    start (Redis down), the request goes on: publishing then writes on the database
    threads and says what failed."""
    global _node_failed_at
    if time.monotonic() - _node_failed_at < NODE_RETRY_SECS:
        return
    try:
        await get_node()
    except Exception as exc:
        _node_failed_at = time.monotonic()
        _logger.warning("node not started for a REST request: %s", exc)


def _apply_trusted_proxies(scope: dict[str, Any]) -> None:
    """The server made this scope for this request alone: rewriting it in place is safe.
    The servers' own proxy-header options stay off (daphne's believes the first
    X-Forwarded-For entry, which the client chooses), so this is the one rule."""
    proxies = push_settings.TRUSTED_PROXIES
    if proxies > 0:
        scope["client"] = forwarded_client(scope, proxies)
        scope["scheme"] = forwarded_scheme(scope)


# Answered here, before Django: the point of the budget (and of shedding load) is that
# a refusal costs little (measured: a request through Django's middleware and DRF costs
# ~4 ms of CPU even when the throttle answers 429).
_OVER_REST_BUDGET = json.dumps(
    {
        "type": "error",
        "code": ErrorCode.RATE_LIMITED.value,
        "message": "too many requests from this address; retry after Retry-After seconds",
    }
).encode()
_CONTENT_TYPE_TOO_LONG = json.dumps(
    {
        "type": "error",
        "code": ErrorCode.INVALID_MESSAGE.value,
        "message": f"the Content-Type header is longer than {MAX_CONTENT_TYPE_BYTES} bytes",
    }
).encode()
_OVERLOADED = json.dumps(
    {
        "type": "error",
        "code": ErrorCode.UNAVAILABLE.value,
        "message": "the node is overloaded; retry after Retry-After seconds",
    }
).encode()


async def _failures_budgeted(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A request that takes from its address's REST budget only when it fails (answered
    4xx or 5xx), refused before Django while that budget is spent. Back-ends' signed
    requests and browsers' authorizations are not counted, while unsigned requests
    are: each was read (up to a 2 MiB body), run through Django and logged as a
    warning, measured 1-4 ms of CPU under uvicorn and up to 9 ms under daphne, as fast
    as one address could send them."""
    retry_after = rest_refused(scope, take=False)
    if retry_after is not None:
        return await _rest_refusal(send, 429, retry_after, _OVER_REST_BUDGET)

    async def send_charging_failure(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            rest_failed(scope)
        await send(message)

    return await django_asgi_app(scope, receive, send_charging_failure)


def over_rest_budget_before_body(scope: dict[str, Any]) -> tuple[int, bytes] | None:
    """For a server that reads a request's whole body before it calls the application
    (daphne): the ``Retry-After`` and body of the 429 that ``application`` is going to
    answer for the address's REST budget, so that the body is not read for nothing
    (measured, 100 bodies of 2 MB from one address, refused: 0.86 s of CPU under
    daphne, spooled to disk, against 0.25 s under uvicorn, which answers first); None
    when the request may go on, or is not budgeted (the liveness probe, SSE streams).
    Every other path takes from the budget or is refused while it is spent."""
    if scope["path"] == LIVENESS_PATH or scope["path"] in SSE_PATHS:
        return None
    _apply_trusted_proxies(scope)
    retry_after = rest_refused(scope, take=False)
    if retry_after is None:
        return None
    return _retry_after_secs(retry_after), _OVER_REST_BUDGET


def _retry_after_secs(secs: float) -> int:
    return max(1, math.ceil(secs))


def _content_type_too_long(scope: dict[str, Any]) -> bool:
    return any(
        name == b"content-type" and len(value) > MAX_CONTENT_TYPE_BYTES
        for name, value in scope["headers"]
    )


async def _refusal(
    send: Any, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A JSON error answered here, before Django."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _rest_refusal(send: Any, status: int, retry_after_secs: float, body: bytes) -> None:
    """429 ``RATE_LIMITED`` (as DRF's throttle answers) or 503 ``UNAVAILABLE``, with
    ``Retry-After``."""
    retry_after = str(_retry_after_secs(retry_after_secs)).encode()
    await _refusal(send, status, body, ((b"retry-after", retry_after),))


async def _bad_host(send: Any) -> None:
    """Django's answer to a disallowed Host (400), for the SSE stream it never sees."""
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"Bad Request: Host not allowed"})


tune_garbage_collector(
    gen0_threshold=push_settings.GC_GEN0_THRESHOLD, freeze=push_settings.GC_FREEZE
)
