"""REST API: publish to a channel or many at once, read its history, list channels.

Views check the request's shape and call the services; who may do what is
``accounts.permissions.ChannelPermission``'s to say (the decider WebSocket and SSE ask),
from each view's ``channel_rights`` and ``request_channel()``. They hold no rules of
their own. Publishing and history are async views (``push.api.base``): a request
waiting on the database holds no thread of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlencode

from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, HttpResponseBase
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularAPIView
from rest_framework import exceptions, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import request_principal
from accounts.permissions import ChannelPermission, authorize_publish
from common import metrics
from common.conf import push_settings
from common.db import db_call
from common.errors import ErrorCode, PushError
from push.api import schema
from push.api.base import AsyncAPIView
from push.api.renderers import (
    BoundedBrowsableAPIRenderer,
    MessagePageRenderer,
    StoredMessages,
)
from push.api.serializers import (
    MAX_BATCH_MESSAGES,
    ChannelListQuerySerializer,
    HistoryQuerySerializer,
    PublishSerializer,
    batch_items,
    first_index_of_each_channel,
    published_body,
    validated,
)
from push.cluster.node import running_node
from push.cluster.presence import presence_members_sync
from push.services.admission import history_admitted, history_read
from push.services.channel_info import channel_bodies, channel_info, channel_names_visible
from push.services.publishing import message_publish_queued, messages_publish_batch, user_channel
from push.storage import selectors
from push.wire.protocol import validate_channel_name

MAX_IDEMPOTENCY_KEY_CHARS = 255

# History reads run on the database threads: a slow one holds a thread, not the loop.
_message_list_since = db_call(selectors.message_list_since, history=True)

F = TypeVar("F", bound=Callable[..., Any])


def _page_url(request: Request, **params: Any) -> str:
    query = request.query_params.copy()
    for key, value in params.items():
        query[key] = str(value)
    return request.build_absolute_uri(request.path) + "?" + urlencode(query)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    return None if key is None else valid_idempotency_key(key)


def valid_idempotency_key(key: str) -> str:
    """``key`` if it may be an ``Idempotency-Key``, else the request's 400."""
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable():
        raise PushError(
            ErrorCode.INVALID_MESSAGE,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters",
            field="Idempotency-Key",
        )
    return key


def _check_body_size(request: Request) -> None:
    """A publish body is at most one frame's bytes (``PUSH_MAX_FRAME_BYTES``)."""
    limit = push_settings.MAX_FRAME_BYTES
    try:
        size = len(request.body)
    except RequestDataTooBig:  # past Django's own limit, which is above ours
        size = limit + 1
    if size > limit:
        raise PushError(ErrorCode.MESSAGE_TOO_LARGE, f"body is larger than {limit} bytes")


def _published_response(body: Any, replayed: bool) -> Response:
    """201 for a new publish; 200 with the first result for a retried Idempotency-Key."""
    return Response(body, status=status.HTTP_200_OK if replayed else status.HTTP_201_CREATED)


async def _publish_response(request: Request, channel: str) -> Response:
    """Publish the request's ``data`` on ``channel`` for the REST caller."""
    principal = request_principal(request)
    _check_body_size(request)
    data = validated(PublishSerializer, request.data)["data"]
    message, replayed = await message_publish_queued(
        channel=channel,
        data=data,
        publisher_id=principal.user_id,
        principal=principal.key,
        idempotency_key=_idempotency_key(request),
    )
    if not replayed:
        metrics.MESSAGES_PUBLISHED.labels("rest").inc()
    return _published_response(published_body(message), replayed)


def _publish_schema(
    *, operation_id: str, summary: str, description: str, target: OpenApiParameter
) -> Callable[[F], F]:
    """The schema of a single publish (a channel's, a user's): ``{"data": ...}`` in,
    the published message's reference out, ``Idempotency-Key`` honoured."""
    return extend_schema(
        operation_id=operation_id,
        summary=summary,
        description=description,
        parameters=[target, schema.IDEMPOTENCY_KEY],
        request=PublishSerializer,
        responses={**schema.PUBLISHED, **schema.error_responses(400, 401, 403, 413, 429, 503)},
    )


class ChannelView(AsyncAPIView):
    """A view about the channel named in its URL."""

    permission_classes = [ChannelPermission]
    channel_rights: dict[str, str] = {}

    def request_channel(self) -> str:
        return validate_channel_name(self.kwargs["channel"])


class ChannelMessagesView(ChannelView):
    channel_rights = {"GET": "subscribe", "POST": "publish"}
    renderer_classes = [MessagePageRenderer, BoundedBrowsableAPIRenderer]

    @_publish_schema(
        operation_id="channel_publish",
        summary="Publish a message on a channel",
        description="Stores `data` as the channel's next message and delivers it to its "
        "subscribers. Needs a credential with the publish right on the channel.",
        target=schema.CHANNEL,
    )
    async def post(self, request: Request, channel: str) -> Response:
        return await _publish_response(request, channel)

    # The response is declared: a page's results are StoredMessages, rendered from
    # their stored JSON (MessagePageRenderer), nothing a serializer could show.
    @extend_schema(
        operation_id="channel_history",
        summary="Read a channel's history",
        description="Stored messages with a seq above `since`, oldest first. A page also "
        "stops at a byte budget, so it may hold fewer than `limit` while `next` is not "
        "null: follow `next` until it is null. Needs the subscribe right on the channel, "
        "or its signed subscription token in `X-Subscription-Token`.",
        parameters=[schema.CHANNEL, *schema.HISTORY_QUERY, schema.SUBSCRIPTION_TOKEN],
        responses={
            200: schema.HistoryPageSerializer,
            **schema.error_responses(400, 401, 403, 429, 503),
        },
    )
    async def get(self, request: Request, channel: str) -> Response:
        query = validated(
            HistoryQuerySerializer,
            request.query_params,
            max_limit=push_settings.HISTORY_PAGE_MAX,
            default_limit=push_settings.HISTORY_PAGE_DEFAULT,
        )
        since, limit = query["since"], query["limit"]
        principal = request_principal(request)
        scope = getattr(request._request, "scope", {})
        retry_after = await history_admitted(scope, principal)
        if retry_after is not None:
            raise exceptions.Throttled(
                math.ceil(retry_after), detail="too much history read from this address"
            )
        read = 0
        try:
            messages, cut_short = await _message_list_since(
                channel=channel,
                since=since,
                limit=limit + 1,
                max_bytes=push_settings.HISTORY_PAGE_MAX_BYTES,
            )
            has_more = len(messages) > limit or cut_short
            messages = messages[:limit]
            read = sum(m.data_bytes for m in messages)  # the page (not the look-ahead)
        finally:
            history_read(scope, principal, read)  # settled, also when the read failed
        next_url = _page_url(request, since=messages[-1].seq, limit=limit) if has_more else None
        return Response({"results": StoredMessages(messages), "next": next_url})


class BatchMessagesView(AsyncAPIView):
    """``POST /api/v1/messages``: publish many messages, all or nothing.

    Every item is validated and authorized (the decider's ``authorize_publish``, as a
    single publish is) before anything is stored; a refusal names the item's index."""

    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="messages_publish_batch",
        summary="Publish many messages at once, all or nothing",
        description="Every message is validated and authorized before anything is "
        "stored; a refused one is named by `index` in the error, and nothing is "
        "published. Messages to one channel get consecutive seqs in request order.",
        parameters=[schema.IDEMPOTENCY_KEY],
        request=schema.BatchPublishSerializer,
        responses={
            201: schema.BatchPublishedSerializer,
            200: OpenApiResponse(
                schema.BatchPublishedSerializer,
                description="A retried Idempotency-Key: the first result.",
            ),
            **schema.error_responses(400, 401, 403, 413, 429, 503),
        },
    )
    async def post(self, request: Request) -> Response:
        principal = request_principal(request)
        _check_body_size(request)
        items = batch_items(request.data, max_messages=MAX_BATCH_MESSAGES)
        for index, channel in first_index_of_each_channel(items).items():
            try:
                authorize_publish(principal, channel)
            except PushError as exc:
                exc.index = index
                raise
        messages, replayed = await messages_publish_batch(
            items=items,
            publisher_id=principal.user_id,
            principal=principal.key,
            idempotency_key=_idempotency_key(request),
            checked=True,  # batch_items validated every channel's name and data
        )
        if not replayed:
            metrics.MESSAGES_PUBLISHED.labels("rest").inc(len(messages))
        return _published_response({"results": [published_body(m) for m in messages]}, replayed)


class ChannelListView(APIView):
    """``GET /api/v1/channels/?prefix=<p>&occupied=true``: the channels the caller may
    subscribe to, by name, each as ``GET /api/v1/channels/<channel>`` answers; paged
    as history is (``limit``, ``next``)."""

    # No channel right: the list holds only the channels the caller may subscribe to.
    permission_classes = [ChannelPermission]

    @extend_schema(
        operation_id="channel_list",
        summary="List the channels the caller may subscribe to",
        description="By name, paged as history is. Without `occupied=true`, the stored "
        "channels (those that ever had a message).",
        parameters=schema.CHANNEL_LIST_QUERY,
        responses={200: schema.ChannelPageSerializer, **schema.error_responses(400, 401, 429, 503)},
    )
    def get(self, request: Request) -> Response:
        query = validated(
            ChannelListQuerySerializer,
            request.query_params,
            max_limit=push_settings.HISTORY_PAGE_MAX,
            default_limit=push_settings.HISTORY_PAGE_DEFAULT,
        )
        limit = query["limit"]
        names, scanned_to = channel_names_visible(
            principal=request_principal(request),
            prefix=query["prefix"],
            occupied=query["occupied"],
            after=query["after"],
            limit=limit + 1,
        )
        # A page may hold fewer than ``limit`` names and still have a next one, where
        # the stored list stopped looking (as a history page stops at its byte budget).
        next_after = names[limit - 1] if len(names) > limit else scanned_to
        names = names[:limit]
        next_url = _page_url(request, after=next_after, limit=limit) if next_after else None
        return Response({"results": channel_bodies(names), "next": next_url})


class ChannelInfoView(ChannelView):
    """``GET /api/v1/channels/<channel>``: its last seq and subscribers across nodes
    (and presence members), for whoever may subscribe to it."""

    channel_rights = {"GET": "subscribe"}

    @extend_schema(
        operation_id="channel_info",
        summary="A channel's last seq and subscribers",
        description="For callers that may subscribe to the channel; `presence_members` "
        "on presence channels only.",
        parameters=[schema.CHANNEL, schema.SUBSCRIPTION_TOKEN],
        responses={
            200: schema.ChannelSerializer,
            **schema.error_responses(400, 401, 403, 429, 503),
        },
    )
    def get(self, request: Request, channel: str) -> Response:
        return Response(channel_info(channel=channel))


class UserMessagesView(ChannelView):
    """``POST /api/v1/users/<id>/messages``: to all of one user's connections."""

    channel_rights = {"POST": "publish"}

    def request_channel(self) -> str:
        return user_channel(self.kwargs["user_id"])

    @_publish_schema(
        operation_id="user_publish",
        summary="Publish to all of one user's connections",
        description="Publishes on the channel `user:<id>`, which only that user may "
        "subscribe to, as a channel publish does.",
        target=schema.USER_ID,
    )
    async def post(self, request: Request, user_id: int) -> Response:
        return await _publish_response(request, user_channel(user_id))


class ChannelPresenceView(ChannelView):
    """``GET /api/v1/channels/<presence-channel>/presence``: who is there now."""

    channel_rights = {"GET": "presence"}

    @extend_schema(
        operation_id="channel_presence",
        summary="The members of a presence channel now",
        description="For callers with the presence right on the channel.",
        parameters=[schema.CHANNEL],
        responses={
            200: schema.PresenceSerializer,
            **schema.error_responses(400, 401, 403, 429, 503),
        },
    )
    def get(self, request: Request, channel: str) -> Response:
        node = running_node()
        members = presence_members_sync(channel, local=node.presence if node is not None else None)
        return Response({"channel": channel, "members": members})


class SchemaView(SpectacularAPIView):
    """``GET /api/v1/schema/``: drf-spectacular's view, the schema generated and
    rendered once per process and format.

    Generating it walks every view, and YAML renders in pure Python: 10 to 20 ms a
    request, measured. Anyone may fetch it, so uncached that was a sixth of a core for
    one address within the anonymous REST rate (600 a minute). The schema depends on
    the code alone (no server list, no versioning, public), so each format's bytes are
    kept."""

    # By renderer, never by the accepted media type: that carries the Accept header's
    # parameters as the client wrote them, an unbounded set of keys.
    _rendered: ClassVar[dict[type[BaseRenderer], bytes]] = {}

    @extend_schema(exclude=True)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponseBase:
        renderer = request.accepted_renderer
        body = self._rendered.get(type(renderer))
        if body is None:
            response = super().get(request, *args, **kwargs)
            response.accepted_renderer = renderer
            response.accepted_media_type = renderer.media_type  # no client parameters
            response.renderer_context = self.get_renderer_context()
            body = self._rendered[type(renderer)] = response.render().content
        response = HttpResponse(body, content_type=renderer.media_type)
        response["Content-Disposition"] = f'inline; filename="{self._get_filename(request, None)}"'
        return response
