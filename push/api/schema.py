"""The REST API's OpenAPI schema (``GET /api/v1/schema/``, drf-spectacular): the shapes
the views answer with and the parameters they read, as docs/protocol.md (REST) states
them.

The views build their answers as plain dicts (and a history page as ``StoredMessages``,
rendered from the stored JSON), so nothing here runs while a request is served: these
serializers only describe. The request serializers the views validate with
(``push.api.serializers``) describe themselves.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.authentication import SessionScheme
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers
from rest_framework.permissions import SAFE_METHODS

from push.api.serializers import MAX_BATCH_MESSAGES


class PushAutoSchema(AutoSchema):
    """drf-spectacular's ``AutoSchema``, with anonymous reads shown as allowed.

    The channel views' permission (``accounts.permissions.ChannelPermission``) lets an
    anonymous caller read a channel the decider allows it (a public channel's history,
    the channel list), which drf-spectacular cannot see in a custom permission class;
    a write always needs a credential (401 otherwise)."""

    def get_auth(self) -> list[dict[str, list[Any]]]:
        auths: list[dict[str, list[Any]]] = super().get_auth()
        if self.method in SAFE_METHODS and {} not in auths:
            auths.append({})
        return auths


class PushTokenScheme(OpenApiAuthenticationExtension):
    """``Authorization: Token <key>``, a user's token or a service token
    (``accounts.authentication.PushTokenAuthentication``); registered by importing this
    module, which the views do."""

    target_class = "accounts.authentication.PushTokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix=self.target.keyword
        )


class PushSessionScheme(SessionScheme):
    """The session cookie (``accounts.authentication.PushSessionAuthentication``, DRF's
    own with failed look-ups counted), as drf-spectacular shows DRF's."""

    target_class = "accounts.authentication.PushSessionAuthentication"


# ----- errors ---------------------------------------------------------------------------------


# A serializer's docstring is its component's description in the schema: written for
# the API's users, with the code it describes named in a comment instead.


# push.api.exceptions writes it.
class ErrorSerializer(serializers.Serializer):
    """Every error: the same envelope as on the WebSocket, with the code's HTTP status."""

    type = serializers.CharField(help_text='Always "error".')
    code = serializers.CharField(
        help_text="INVALID_JSON, INVALID_MESSAGE, NOT_AUTHENTICATED, AUTHENTICATION_FAILED, "
        "FORBIDDEN, NOT_FOUND, MESSAGE_TOO_LARGE, RATE_LIMITED or UNAVAILABLE; another "
        "HTTP error has DRF's code in capitals (e.g. METHOD_NOT_ALLOWED)."
    )
    message = serializers.CharField()
    field = serializers.CharField(required=False, help_text="The request field at fault.")
    index = serializers.IntegerField(
        required=False, help_text="The position of the refused item of a batch."
    )
    # As with ``data`` below, the stubs' ``Serializer.errors`` (a property); DRF takes the
    # declared field from the class body all the same.
    errors = serializers.DictField(  # type: ignore[assignment]  # see above
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="DRF's messages per field, for an INVALID_MESSAGE found by a serializer.",
    )


_ERROR_MEANINGS = {
    400: "INVALID_JSON (the body is not JSON) or INVALID_MESSAGE (a malformed field, "
    "channel name or query parameter).",
    401: "NOT_AUTHENTICATED (a credential is needed) or AUTHENTICATION_FAILED (an invalid "
    "or revoked token).",
    403: "FORBIDDEN: the caller may not do this on this channel.",
    413: "MESSAGE_TOO_LARGE: the body is over the frame byte limit, or a batch holds too "
    "many messages.",
    429: "RATE_LIMITED: over the caller's or the address's budget; see Retry-After.",
    503: "UNAVAILABLE: PostgreSQL or Redis is down; nothing was done, retry later.",
}


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """The error envelope for each of ``statuses``, with what each means here."""
    return {s: OpenApiResponse(ErrorSerializer, description=_ERROR_MEANINGS[s]) for s in statuses}


# ----- publishing -----------------------------------------------------------------------------


# push.api.serializers.published_body writes it.
class PublishedSerializer(serializers.Serializer):
    """A stored message's place in its channel."""

    channel = serializers.CharField()
    seq = serializers.IntegerField(help_text="The message's position in its channel, from 1.")
    message_id = serializers.UUIDField()
    timestamp = serializers.FloatField(help_text="Seconds since the epoch, when it was stored.")


class BatchItemSerializer(serializers.Serializer):
    channel = serializers.CharField()
    # The stubs declare ``Serializer.data`` (the output) on the class; DRF takes this
    # declared field from the class body all the same.
    data = serializers.JSONField(allow_null=True, help_text="Any JSON value.")  # type: ignore[assignment]  # see above


# push.api.serializers.batch_items reads it.
class BatchPublishSerializer(serializers.Serializer):
    """Up to 1,000 messages, each to its own channel, published in one transaction."""

    messages = serializers.ListField(
        child=BatchItemSerializer(), min_length=1, max_length=MAX_BATCH_MESSAGES
    )


class BatchPublishedSerializer(serializers.Serializer):
    results = PublishedSerializer(many=True, help_text="One per message, in request order.")


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 255},
    OpenApiParameter.HEADER,
    description="1 to 255 printable characters: a retry with the same key answers 200 "
    "with the first result instead of publishing again (24 hours by default, per "
    "credential and channel). Not taken by channels of history mode `recent`.",
)

PUBLISHED = {
    201: PublishedSerializer,
    200: OpenApiResponse(
        PublishedSerializer, description="A retried Idempotency-Key: the first result."
    ),
}


# ----- history and channels -------------------------------------------------------------------


# ChannelMessage.envelope, or push.api.renderers from the stored JSON.
class MessageEnvelopeSerializer(serializers.Serializer):
    """A stored message, in the shape of the WebSocket `message` envelope."""

    type = serializers.CharField(help_text='Always "message".')
    channel = serializers.CharField()
    seq = serializers.IntegerField()
    message_id = serializers.UUIDField()
    data = serializers.JSONField(allow_null=True, help_text="Any JSON value, as published.")  # type: ignore[assignment]  # as BatchItemSerializer's
    timestamp = serializers.FloatField()


_NEXT_HELP = "The next page's URL; null on the last page."


class HistoryPageSerializer(serializers.Serializer):
    results = MessageEnvelopeSerializer(many=True, help_text="Oldest first.")
    next = serializers.URLField(allow_null=True, help_text=_NEXT_HELP)


# push.services.channel_info.channel_bodies writes it.
class ChannelSerializer(serializers.Serializer):
    """What a channel is now."""

    channel = serializers.CharField()
    last_seq = serializers.IntegerField(help_text="0 for a channel without messages.")
    subscribers = serializers.IntegerField(help_text="Across nodes, up to ~2 s behind.")
    presence_members = serializers.IntegerField(
        required=False, help_text="Presence channels only: how many members."
    )


class ChannelPageSerializer(serializers.Serializer):
    results = ChannelSerializer(many=True, help_text="By name.")
    next = serializers.URLField(allow_null=True, help_text=_NEXT_HELP)


class PresenceMemberSerializer(serializers.Serializer):
    user_id = serializers.JSONField(help_text="The user's id, or a subscription token's.")
    info = serializers.DictField(help_text="What the member's subscription token says of it.")


class PresenceSerializer(serializers.Serializer):
    channel = serializers.CharField()
    members = PresenceMemberSerializer(many=True)


def _query(name: str, schema: dict[str, Any], description: str) -> OpenApiParameter:
    return OpenApiParameter(name, schema, OpenApiParameter.QUERY, description=description)


# The bounds are settings (PUSH_HISTORY_PAGE_DEFAULT, PUSH_HISTORY_PAGE_MAX); their
# defaults are named, not read, so the schema does not vary between nodes.
LIMIT = _query(
    "limit",
    {"type": "integer", "minimum": 1},
    "Page size: 100 by default, at most 1,000 (PUSH_HISTORY_PAGE_DEFAULT, PUSH_HISTORY_PAGE_MAX).",
)
SUBSCRIPTION_TOKEN = OpenApiParameter(
    "X-Subscription-Token",
    {"type": "string"},
    OpenApiParameter.HEADER,
    description="A signed subscription token for this channel, as a WebSocket `subscribe` "
    "carries one: it lets its holder read the channel without a grant (a bad, expired or "
    "foreign-channel token is 403 `FORBIDDEN`). Send it again when following `next`.",
)

HISTORY_QUERY = [
    _query(
        "since",
        {"type": "integer", "minimum": 0, "default": 0},
        "The messages with a seq above this one.",
    ),
    LIMIT,
]
CHANNEL_LIST_QUERY = [
    _query("prefix", {"type": "string", "maxLength": 100}, "Only names that start with it."),
    _query(
        "occupied",
        {"type": "boolean", "default": False},
        "The channels with a subscriber on some node now, instead of the stored ones.",
    ),
    _query("after", {"type": "string", "maxLength": 100}, "The last name of the previous page."),
    LIMIT,
]
USER_ID = OpenApiParameter(
    "user_id",
    int,
    OpenApiParameter.PATH,
    description="The user's id: the message goes to the channel `user:<id>`.",
)
CHANNEL = OpenApiParameter(
    "channel",
    str,
    OpenApiParameter.PATH,
    description="A channel name, e.g. `news`, `private-orders`, `presence-room`.",
)
