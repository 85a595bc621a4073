"""Stored state of the push server: channels, their numbered messages, connections.

PostgreSQL is the source of truth: Redis keeps nothing on disk, so every message is
committed here before anyone is told it exists.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Channel(models.Model):
    name = models.CharField(max_length=100, unique=True)
    # The highest seq handed out; the next message gets last_seq + 1, allocated by an
    # atomic upsert so two nodes publishing at once never repeat or skip a number.
    last_seq = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Message(models.Model):
    # No constraint in the database, and no index of its own: the write pipeline's one
    # statement takes the channel's id from the upsert that locks the channel's row
    # (push.storage.write_batch), so a message cannot name a missing channel, and the
    # constraint's check cost PostgreSQL about 4 us of CPU per message stored (a fifth
    # of what storing one costs). Deleting a channel still deletes its messages (Django's
    # CASCADE), and (channel, seq), the unique constraint below, is the index that
    # reads by channel use.
    channel = models.ForeignKey(
        Channel,
        on_delete=models.CASCADE,
        related_name="messages",
        db_constraint=False,
        db_index=False,
    )
    seq = models.BigIntegerField()
    message_id = models.UUIDField(unique=True)
    # The published value as canonical JSON text, not jsonb: jsonb refuses strings
    # holding U+0000 and would round big integers and floats through numeric.
    data = models.TextField()
    # Indexed only where set (``message_publisher_set``): most messages come from
    # back-ends' service tokens, which have no user, and an index entry per message
    # cost PostgreSQL about 4 us of CPU each. Deleting a user finds theirs through it.
    publisher = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        db_index=False,
    )
    created_at = models.DateTimeField()
    # The Pusher socket id that must not receive the message (a Pusher trigger's
    # ``socket_id``): a node that missed its broadcast reads it back with the message
    # (a gap repair). Written only by publishes that name one; NULL for every other.
    excluded_socket = models.TextField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["channel", "seq"], name="message_unique_channel_seq")
        ]
        indexes = [
            models.Index(
                fields=["publisher"],
                name="message_publisher_set",
                condition=models.Q(publisher__isnull=False),
            )
        ]
        ordering = ["channel", "seq"]

    def __str__(self) -> str:
        return f"{self.channel_id}#{self.seq}"


class Connection(models.Model):
    connection_id = models.UUIDField(unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    ip = models.GenericIPAddressField(null=True, blank=True)
    server_id = models.CharField(max_length=100, db_index=True)
    wire_format = models.CharField(max_length=16, default="json")
    connected_at = models.DateTimeField()
    disconnected_at = models.DateTimeField(null=True, blank=True, db_index=True)
    close_code = models.IntegerField(null=True, blank=True)
    # When the node last heard from the client (any frame), stamped in the registry's
    # batches; the open time for a client that has sent nothing.
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # The channels the connection is subscribed to now (empty once closed): a JSON list,
    # so the same column works on PostgreSQL and SQLite.
    subscriptions = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-connected_at"]

    @property
    def is_live(self) -> bool:
        return self.disconnected_at is None

    def __str__(self) -> str:
        return str(self.connection_id)


class IdempotencyKey(models.Model):
    """A REST publish's ``Idempotency-Key``: a retry within the window gets the first
    publish's result instead of publishing again."""

    # Who published: "user:<id>" (the key is scoped to the credential and the channel;
    # a batch request's key has the empty channel, which no channel is named).
    principal = models.CharField(max_length=64)
    channel = models.CharField(max_length=100)
    key = models.CharField(max_length=255)
    # The first publish's reply, [{channel, seq, message_id, timestamp}, ...], kept in
    # the row itself: retention deletes messages long before a key expires, and a key
    # that pointed at its message (it used to, deleted with it) let a retry publish again.
    result = models.JSONField(null=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["principal", "channel", "key"], name="idempotency_key_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.principal}/{self.channel}/{self.key}"


class PusherApp(models.Model):
    """An app of the Pusher protocol (docs/pusher.md): pusher-js connects to
    ``/app/<key>``, back-ends sign HTTP API requests and channel authorizations with the
    secret. One more app may come from ``PUSHER_APP_ID``/``KEY``/``SECRET``."""

    name = models.CharField(max_length=100)
    app_id = models.CharField("app id", max_length=64, unique=True)
    key = models.CharField(max_length=64, unique=True)
    secret = models.CharField(max_length=128)
    client_events = models.BooleanField(
        default=False, help_text="clients may send client-* events on private and presence channels"
    )
    enabled = models.BooleanField(default=True)
    # One URL per line; webhooks in Pusher's format, signed with the secret.
    webhook_urls = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "Pusher app"

    def __str__(self) -> str:
        return f"{self.name} ({self.app_id})"
