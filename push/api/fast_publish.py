"""A back-end's REST publishes served without Django's handler, middleware and DRF,
when none of them would change the answer.

``POST /api/v1/channels/<channel>/messages`` is the request a back-end sends most,
one per message, and ``POST /api/v1/messages`` its batches. Through Django and DRF a
request cost about 1.1 ms of the node's CPU, of which the publish itself (the write
pipeline, the broker) is a fraction; a node answered 800 single publishes a second
while its database commits 6,000. A request this module takes is answered here, on
the event loop, by the same services and the same rules:

- the caller is a token this process verified a moment ago
  (``accounts.principal_cache.kept_token_principal``), which no throttle counts (a
  service token, by default);
- it may publish on every channel it names (``authorize_publish``);
- the body, with a ``Content-Length`` of at most ``PUSH_MAX_FRAME_BYTES``, is what the
  view accepts as it is: a JSON object with ``data``, or with ``messages`` that
  ``batch_items`` accepts;
- DRF's content negotiation would answer it in plain JSON, there is no query string,
  no header is sent twice, its ``Host`` is allowed, and its ``Idempotency-Key``, if
  any, is valid.

Anything else (the first request of a token, a user's session, a refusal, a body the
view would refuse, the browsable API) goes to Django with the body it sent, so every
refusal is DRF's own answer, byte for byte. What the fast path sends is what Django's
path would: the same status and JSON, the same headers (DRF's ``Allow`` and ``Vary``,
the security middleware's), the same django-prometheus counters and ``django.request``
log lines. It stands aside whenever the project's middleware or request signals are
not the ones it mirrors (a project that adds its own), and
``PUSH_REST_FAST_PUBLISH=0`` turns it off.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core import signals
from django.db import DatabaseError
from django.http import HttpRequest
from django.utils.module_loading import import_string
from redis.exceptions import RedisError
from rest_framework.exceptions import NotAcceptable
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.utils.encoders import JSONEncoder
from rest_framework.views import APIView

from accounts.permissions import authorize_publish
from accounts.principal_cache import is_kept_key, kept_token_principal
from accounts.principals import Principal
from accounts.throttling import PrincipalRateThrottle
from common import metrics
from common.conf import push_settings
from common.errors import PushError
from common.hosts import host_header_allowed
from push.api.exceptions import error_envelope
from push.api.handler import receivers_on_loop
from push.api.renderers import MessagePageRenderer, javascript_safe
from push.api.request_metrics import ViewMetrics
from push.api.security_headers import security_headers
from push.api.serializers import (
    MAX_BATCH_MESSAGES,
    batch_items,
    first_index_of_each_channel,
    published_body,
)
from push.api.views import BatchMessagesView, ChannelMessagesView, valid_idempotency_key
from push.fanout.message import ChannelMessage
from push.services.publishing import message_publish_queued, messages_publish_batch
from push.wire import json_text
from push.wire.protocol import validate_channel_name, validate_data

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
# A probe of whether the server knows the client of ``send`` is gone, or None under a
# server it does not know (``push.transport.server_adapters.peer_gone_probe``).
PeerGoneProbe = Callable[[Any], Callable[[], bool] | None]
Answer = tuple[int, Any]  # status, and what DRF's JSON renderer would render

# The URLs of the two views (push.api.urls under realtime_project.urls' api/v1/):
# Django's ``<str:channel>`` is one path segment, at least one character.
PUBLISH_PATH = re.compile(r"/api/v1/channels/([^/]+)/messages")
BATCH_PATH = re.compile(r"/api/v1/messages")
# Content-Type of a body DRF's JSON parser reads as UTF-8 (lower case, no spaces).
JSON_MEDIA_TYPES = (b"application/json", b"application/json;charset=utf-8")
# Accept headers whose negotiation is kept are at most this long (64 of them per
# view): real clients send a few dozen bytes; a longer one goes to Django.
MAX_ACCEPT_BYTES = 256
# Django's answer to an exception no handler took, without a 500.html template.
SERVER_ERROR = b"<h1>Server Error (500)</h1>"
_RENDERER = MessagePageRenderer()  # a plain JSONRenderer for anything but a page
# DRF's JSON as it renders by default (compact, UTF-8, no NaN), which json_text writes
# for a reply of strings and numbers (a batch's answer: 80 us less per request).
_DEFAULT_JSON = (
    _RENDERER.compact
    and not _RENDERER.ensure_ascii
    and _RENDERER.strict
    and _RENDERER.encoder_class is JSONEncoder
)
# Where the server offers to write a whole answer at once (one write, not one for its
# head and one for its body): ``push.transport.server_adapters.write_whole_response``,
# under uvicorn.
WHOLE_RESPONSE_EXTENSION = "push.http.response.whole"
# Django's logger of answered requests (4xx warnings, 5xx errors).
request_logger = logging.getLogger("django.request")
_PUBLISHED_OVER_REST = metrics.MESSAGES_PUBLISHED.labels("rest")


@dataclass(slots=True)
class PlainRequest:
    """What a request that may be served here says: where, as whom, with which key."""

    path: str
    channel: str | None  # the single publish's, from its URL
    token: str
    address: str | None
    idempotency_key: str | None
    secure: bool
    content_length: int
    started_at: float = 0.0  # for the latency django-prometheus observes


@dataclass
class Body:
    """A request's body as the server sent it, kept to hand it on to Django unread."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0
    complete: bool = False

    def bytes(self) -> bytes:
        if len(self.messages) == 1:  # the whole body in one message, as it nearly always is
            return self.messages[0].get("body", b"")
        return b"".join(m.get("body", b"") for m in self.messages)

    def replayed(self, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
        """A ``receive`` that gives what was read, then what the server has next."""
        pending = list(self.messages)

        async def replay() -> dict[str, Any]:
            return pending.pop(0) if pending else await receive()

        return replay


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """An answer's headers in the order Django sends them, but its Content-Length,
    which comes after ``before_length``."""

    before_length: tuple[tuple[bytes, bytes], ...]
    after_length: tuple[tuple[bytes, bytes], ...]  # the security middleware's

    @classmethod
    def of(
        cls,
        allow: bytes,
        status: int,
        security: tuple[tuple[tuple[bytes, bytes], ...], tuple[tuple[bytes, bytes], ...]],
    ) -> ResponseHead:
        # The middleware's headers before Content-Length follow the view's own.
        before, after = security
        if status == 500:
            return cls(((b"content-type", b"text/html; charset=utf-8"), *before), after)
        json_headers = (
            (b"content-type", b"application/json"),
            (b"vary", b"Accept"),
            (b"allow", allow),
            *before,
        )
        return cls(json_headers, after)


class Endpoint:
    """One of the two views, as this module answers for it: its URL name, its
    ``Allow``, its throttles and its content negotiation, read from the view itself."""

    def __init__(self, view_class: type[APIView], name: str) -> None:
        self.view = view_class()
        self.view.setup(HttpRequest())  # as as_view() does: HEAD allowed where GET is
        self.allow = ", ".join(self.view.allowed_methods).encode()
        self.metrics = ViewMetrics(name, "POST")
        self._throttled_kinds: dict[str, bool] = {}
        self._heads: dict[tuple[int, bool], ResponseHead] = {}

    def head(self, status: int, secure: bool) -> ResponseHead:
        """The headers of an answer with ``status`` over https (``secure``) or not:
        made once, and again if the security headers were made again."""
        security = security_headers(secure)
        head = self._heads.get((status, secure))
        if head is None or head.after_length is not security[1]:
            head = self._heads[(status, secure)] = ResponseHead.of(self.allow, status, security)
        return head

    def throttled(self, principal: Principal) -> bool:
        """Whether a throttle of the view counts this kind of caller (by default a
        user, not a service token); the settings decide, so once per kind."""
        throttled = self._throttled_kinds.get(principal.kind)
        if throttled is None:
            throttled = self._throttled_kinds[principal.kind] = not all(
                isinstance(t, PrincipalRateThrottle) and not t.counts(principal)
                for t in self.view.get_throttles()
            )
        return throttled

    @functools.lru_cache(maxsize=64)  # noqa: B019  # two instances, for the process
    def renders_json(self, accept: bytes) -> bool:
        """Whether DRF's content negotiation answers a request with this ``Accept`` in
        plain JSON (not the browsable API, not indented, not 406)."""
        negotiated = HttpRequest()  # what the negotiation reads: Accept, ?format=
        negotiated.META["HTTP_ACCEPT"] = accept.decode("latin-1")
        try:
            renderer, media_type = self.view.get_content_negotiator().select_renderer(
                Request(negotiated), self.view.get_renderers()
            )
        except NotAcceptable:
            return False
        return isinstance(renderer, JSONRenderer) and media_type == "application/json"


class FastPublish:
    """A kept back-end token's publishes answered on the loop; every other request to
    ``django_app``."""

    def __init__(self, django_app: Asgi, peer_gone: PeerGoneProbe | None = None) -> None:
        self.django_app = django_app
        self.peer_gone = peer_gone
        self.single = Endpoint(ChannelMessagesView, "channel-messages")
        self.batch = Endpoint(BatchMessagesView, "batch-messages")
        self.body_limit = min(
            push_settings.MAX_FRAME_BYTES,
            settings.DATA_UPLOAD_MAX_MEMORY_SIZE or push_settings.MAX_FRAME_BYTES,
        )
        # Read once, as Django's SecurityMiddleware reads it when it is made.
        self.ssl_redirect = bool(settings.SECURE_SSL_REDIRECT)
        # Off when Django's path does something not mirrored here: middleware of the
        # project's own, or settings with which Django's middleware redirects or
        # refuses a request.
        self.mirrors_django = (
            push_settings.REST_FAST_PUBLISH
            and all(_mirrored(path) for path in settings.MIDDLEWARE)
            and not (settings.PREPEND_WWW or settings.USE_X_FORWARDED_HOST)
            and not settings.DISALLOWED_USER_AGENTS
        )

    def enabled(self) -> bool:
        """Whether requests may be answered here; not once the project connected
        receivers of its own to Django's request signals (which may come later)."""
        return (
            self.mirrors_django
            and receivers_on_loop(signals.request_started)
            and receivers_on_loop(signals.request_finished)
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        found = self._endpoint(scope) if self.enabled() else None
        request = None if found is None else plain_request(scope, *found, self.ssl_redirect)
        # A body declared too large is Django's to refuse, before any of it is read.
        if found is None or request is None or request.content_length > self.body_limit:
            return await self.django_app(scope, receive, send)
        endpoint = found[0]
        body = await read_body(receive, self.body_limit)
        if body is None:
            return  # the client left
        answer = await self._answer(endpoint, request, body, send) if body.complete else None
        if answer is None:
            return await self.django_app(scope, body.replayed(receive), send)
        await self._send(endpoint, request, send, *answer, scope.get("extensions"))

    def _endpoint(self, scope: dict[str, Any]) -> tuple[Endpoint, str | None] | None:
        """The endpoint of the request's path, with the channel its URL names."""
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        matched = PUBLISH_PATH.fullmatch(path)
        if matched is not None:
            return self.single, matched.group(1)
        return (self.batch, None) if BATCH_PATH.fullmatch(path) else None

    async def _answer(
        self, endpoint: Endpoint, request: PlainRequest, body: Body, send: Any
    ) -> Answer | None:
        """The status and JSON of the answer, or None when Django must answer (nothing
        was published then)."""
        # The caller before the body: a refused one costs no parse.
        principal = await kept_token_principal(request.token, request.address)
        if principal is None or endpoint.throttled(principal) or self._client_left(send):
            return None
        items = _publish_items(principal, request.channel, body.bytes())
        if items is None:
            return None
        request.started_at = endpoint.metrics.started(request.secure, request.content_length)
        metrics.REST_FAST_PUBLISHES.inc()
        try:
            messages, replayed = await _publish(principal, request, items)
        except (PushError, DatabaseError, RedisError) as exc:
            return error_envelope(exc)
        except Exception:
            # What Django answers for an exception no handler took (no traceback sent).
            request_logger.exception("Internal Server Error: %s", request.path)
            return 500, None
        if not replayed:
            _PUBLISHED_OVER_REST.inc(len(messages))
        if request.channel is not None:
            reply = published_body(messages[0])
        else:
            reply = {"results": [published_body(m) for m in messages]}
        return 200 if replayed else 201, reply

    def _client_left(self, send: Any) -> bool:
        """Whether the server knows the client left (it closed after sending). Django's
        handler listens for that while the view runs and cancels it, before it
        publishes: handed to Django, such a request is not published here either."""
        probe = None if self.peer_gone is None else self.peer_gone(send)
        return probe is not None and probe()

    async def _send(
        self,
        endpoint: Endpoint,
        request: PlainRequest,
        send: Any,
        status: int,
        reply: Any,
        extensions: dict[str, Any] | None,
    ) -> None:
        content = SERVER_ERROR if status == 500 else _rendered(reply)
        head = endpoint.head(status, request.secure)
        whole = extensions.get(WHOLE_RESPONSE_EXTENSION) if extensions else None
        if whole is None or not whole["write"](
            send, status, head.before_length, head.after_length, content
        ):
            headers = [*head.before_length, (b"content-length", b"%d" % len(content))]
            headers.extend(head.after_length)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})
        endpoint.metrics.answered(request.started_at, status, len(content))
        if status >= 400:
            _log_refusal(status, request.path)


def _rendered(reply: Any) -> bytes:
    """The answer's body as ``_RENDERER`` renders it: a reply of strings, numbers,
    lists and dicts (a publish's result, an error envelope)."""
    if not _DEFAULT_JSON:
        return _RENDERER.render(reply)
    body = json_text.dumps_bytes(reply)
    # Text in ASCII holds no U+2028 or U+2029 to escape: the bytes as orjson wrote them.
    return body if body.isascii() else javascript_safe(body.decode())


def _mirrored(middleware_path: str) -> bool:
    """Whether the fast path reproduces this middleware's work: the class says so
    itself (``push.api.middleware``), not through a project's subclass of it."""
    return vars(import_string(middleware_path)).get("mirrored_by_fast_publish", False) is True


async def _publish(
    principal: Principal, request: PlainRequest, items: list[tuple[str, Any]]
) -> tuple[list[ChannelMessage], bool]:
    """Publish as the view does: the messages, and whether they are an idempotent
    retry's first result."""
    if request.channel is None:
        return await messages_publish_batch(
            items=items,
            publisher_id=principal.user_id,
            principal=principal.key,
            idempotency_key=request.idempotency_key,
            checked=True,  # batch_items validated every channel's name and data
        )
    message, replayed = await message_publish_queued(
        channel=request.channel,
        data=items[0][1],
        publisher_id=principal.user_id,
        principal=principal.key,
        idempotency_key=request.idempotency_key,
        checked=True,  # the URL's channel name and the data (_publish_items)
    )
    return [message], replayed


def _publish_items(
    principal: Principal, channel: str | None, body: bytes
) -> list[tuple[str, Any]] | None:
    """The ``(channel, data)`` items of a body the view would accept as it is, from a
    caller who may publish on each; None when the view must answer."""
    try:
        parsed = json_text.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    try:
        if channel is None:
            items = batch_items(parsed, max_messages=MAX_BATCH_MESSAGES)
            for item_channel in first_index_of_each_channel(items).values():
                authorize_publish(principal, item_channel)
        elif isinstance(parsed, dict) and "data" in parsed:
            # Checked here, not by the service: data it would refuse may be refused
            # first, in other words, by the view's serializer (a float past the
            # double's range, read as infinity) or its parser (deep nesting).
            items = [(channel, validate_data(parsed["data"]))]
            authorize_publish(principal, channel)
        else:
            return None
    except PushError:
        return None  # DRF words the refusal
    return items


def _log_refusal(status: int, path: str) -> None:
    """As Django logs a 4xx or 5xx answer (``django.utils.log.log_response``)."""
    level = logging.ERROR if status >= 500 else logging.WARNING
    request_logger.log(
        level, "%s: %s", HTTPStatus(status).phrase, path, extra={"status_code": status}
    )


def plain_request(
    scope: dict[str, Any], endpoint: Endpoint, url_channel: str | None, ssl_redirect: bool
) -> PlainRequest | None:
    """The request's parts when it may be a back-end's plain publish, else None."""
    if scope.get("root_path") or scope.get("query_string"):
        return None
    raw_headers = scope["headers"]
    if type(raw_headers) is not list and not isinstance(raw_headers, tuple):
        raw_headers = list(raw_headers)
    headers: dict[bytes, bytes] = dict(raw_headers)
    if len(headers) != len(raw_headers):
        return None  # a header sent twice: Django would join them, leave it that reading
    secure = scope.get("scheme") == "https"
    if ssl_redirect and not secure:
        return None
    content_type = headers.get(b"content-type", b"")
    if (  # as sent nearly always, else as DRF reads it
        content_type not in JSON_MEDIA_TYPES
        and content_type.lower().replace(b" ", b"") not in JSON_MEDIA_TYPES
    ):
        return None
    accept = headers.get(b"accept", b"*/*")
    if len(accept) > MAX_ACCEPT_BYTES or not endpoint.renders_json(accept):
        return None
    # A key this process does not keep goes to DRF before its body is read here.
    token = _token(headers.get(b"authorization"))
    host = headers.get(b"host")  # without one Django answers (it falls back on the server)
    if token is None or not is_kept_key(token) or host is None or not host_header_allowed(host):
        return None
    key = headers.get(b"idempotency-key")
    idempotency_key = None if key is None else key.decode("latin-1")
    try:
        channel = None if url_channel is None else _valid_url_channel(url_channel)
        if idempotency_key is not None:
            valid_idempotency_key(idempotency_key)
        # Django reads a body of Content-Length bytes, and none without the header
        # (a chunked body): it answers those.
        content_length = int(headers[b"content-length"])
    except (PushError, ValueError, KeyError):
        return None
    client = scope.get("client")
    # Positionally: keywords cost ~0.5 us more per request here.
    return PlainRequest(
        scope["path"],
        channel,
        token,
        client[0] if client else None,
        idempotency_key,
        secure,
        content_length,
    )


# Channel names of URLs found valid, asked again on every publish to them (the check
# is a pattern's match); at most this many, forgotten all at once past it.
MAX_VALID_URL_CHANNELS = 4096
_valid_url_channels: set[str] = set()


def _valid_url_channel(name: str) -> str:
    """``name`` if it is a valid channel name, else ``PushError``."""
    if name in _valid_url_channels:
        return name
    validate_channel_name(name)
    if len(_valid_url_channels) >= MAX_VALID_URL_CHANNELS:
        _valid_url_channels.clear()
    _valid_url_channels.add(name)
    return name


def _token(authorization: bytes | None) -> str | None:
    """The key of ``Authorization: Token <key>``, split as DRF's authentication does."""
    if authorization is None:
        return None
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != b"token":
        return None
    return parts[1].decode("latin-1")


async def read_body(receive: Any, limit: int) -> Body | None:
    """The request's body, up to ``limit`` bytes (then ``complete`` is False and the
    rest is left to be read); None when the client left."""
    body = Body()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body.messages.append(message)
        body.size += len(message.get("body", b""))
        if not message.get("more_body", False):
            body.complete = body.size <= limit
            return body
        if body.size > limit:
            return body
