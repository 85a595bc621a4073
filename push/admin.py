"""Django admin: live connections, stored history and channels.

History is read-only: editing or deleting a message in place would make clients that
already received it disagree with what resumes and REST return.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path

from common.conf import webhook_url_problem
from common.redis_client import redis_prefix, redis_sync
from push.cluster.directory import cluster_nodes, connections_disconnect
from push.cluster.node import running_node
from push.models import Channel, Connection, Message, PusherApp
from push.ops.event_worker import dead_letters
from push.services.pusher_apps import app_cache, free_app_id, new_credentials
from push.storage.retention import retention_policy

# Channels listed per connection on the change list; the rest are counted.
CHANNELS_SHOWN = 5


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class LiveFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("live", "Live"), ("closed", "Closed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Connection]) -> QuerySet:
        if self.value() == "live":
            return queryset.filter(disconnected_at__isnull=True)
        if self.value() == "closed":
            return queryset.filter(disconnected_at__isnull=False)
        return queryset


@admin.register(Connection)
class ConnectionAdmin(ReadOnlyAdmin):
    list_display = (
        "connection_id",
        "user",
        "ip",
        "server_id",
        "wire_format",
        "connected_at",
        "disconnected_at",
        "close_code",
        "last_heartbeat",
        "channels",
        "is_live",
    )
    list_filter = (
        LiveFilter,
        "server_id",
        ("user", admin.RelatedOnlyFieldListFilter),
        "wire_format",
    )
    # "subscriptions" finds the connections whose channel list contains the text.
    search_fields = ("connection_id", "user__username", "ip", "server_id", "subscriptions")
    list_select_related = ("user",)
    date_hierarchy = "connected_at"

    actions = ("disconnect_connections", "disconnect_users")
    change_list_template = "admin/push/connection_change_list.html"

    @admin.display(description="subscriptions")
    def channels(self, obj: Connection) -> str:
        shown = ", ".join(obj.subscriptions[:CHANNELS_SHOWN])
        more = len(obj.subscriptions) - CHANNELS_SHOWN
        return f"{shown} (+{more})" if more > 0 else shown

    @admin.display(boolean=True, description="live")
    def is_live(self, obj: Connection) -> bool:
        return obj.is_live

    def has_disconnect_permission(self, request: HttpRequest) -> bool:
        """Closing clients changes them: staff who may only view connections may not.
        The rows themselves stay read-only for everyone (the registry writes them)."""
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.{get_permission_codename('change', opts)}")

    @admin.action(
        description="Disconnect the selected connections (whatever their node)",
        permissions=["disconnect"],
    )
    def disconnect_connections(self, request: HttpRequest, queryset: QuerySet) -> None:
        ids = [
            str(c)
            for c in queryset.filter(disconnected_at__isnull=True).values_list(
                "connection_id", flat=True
            )
        ]
        connections_disconnect(connection_ids=ids)
        self.message_user(request, f"Asked every node to close {len(ids)} connection(s).")

    @admin.action(
        description="Disconnect every connection of the selected connections' users",
        permissions=["disconnect"],
    )
    def disconnect_users(self, request: HttpRequest, queryset: QuerySet) -> None:
        user_ids = sorted({u for u in queryset.values_list("user_id", flat=True) if u})
        connections_disconnect(user_ids=user_ids)
        self.message_user(
            request, f"Asked every node to close the connections of {len(user_ids)} user(s)."
        )

    def get_urls(self) -> list[Any]:
        nodes = path("nodes/", self.admin_site.admin_view(self.nodes_view), name="push_nodes")
        dead = path(
            "events/dead/", self.admin_site.admin_view(self.dead_events_view), name="push_dead"
        )
        return [nodes, dead, *super().get_urls()]

    def _require_view_permission(self, request: HttpRequest) -> None:
        """The node pages show what the connection list shows, and more (client events'
        data): ``admin_view`` lets in any staff account, so they ask for the view
        permission on connections themselves."""
        if not self.has_view_permission(request):
            raise PermissionDenied

    def dead_events_view(self, request: HttpRequest) -> HttpResponse:
        """Lifecycle events that kept failing their handlers (the dead-letter stream)."""
        self._require_view_permission(request)
        stream = f"{redis_prefix()}:events"
        rows: list[dict[str, Any]] = []
        if settings.REDIS_URL:
            client = redis_sync(socket_timeout=5)
            try:
                rows = dead_letters(client, stream)
            finally:
                client.close()
        context = {
            **self.admin_site.each_context(request),
            "rows": rows,
            "stream": stream,
            "available": bool(settings.REDIS_URL),
        }
        return TemplateResponse(request, "admin/push/dead_events.html", context)

    def nodes_view(self, request: HttpRequest) -> HttpResponse:
        """Every live node, and the busiest channels summed over nodes."""
        self._require_view_permission(request)
        running = running_node()
        nodes = cluster_nodes(local=running.stats if running is not None else None)
        channels: dict[str, dict[str, Any]] = {}
        for node in nodes:
            node["started"] = datetime.fromtimestamp(node["started_at"], tz=UTC)
            node["updated"] = datetime.fromtimestamp(node["updated_at"], tz=UTC)
            for channel in node["channels"]:
                total = channels.setdefault(
                    channel["name"],
                    {
                        "name": channel["name"],
                        "subscribers": 0,
                        "messages_per_sec": 0.0,
                        "nodes": 0,
                    },
                )
                total["subscribers"] += channel["subscribers"]
                # Every node fans out every message of a channel it serves: the rate is
                # the channel's, not a share of it.
                total["messages_per_sec"] = max(
                    total["messages_per_sec"], channel["messages_per_sec"]
                )
                total["nodes"] += 1
        busiest = sorted(channels.values(), key=lambda c: -c["subscribers"])
        context = {**self.admin_site.each_context(request), "nodes": nodes, "channels": busiest}
        return TemplateResponse(request, "admin/push/nodes.html", context)


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("channel", "seq", "message_id", "publisher", "created_at", "data_preview")
    search_fields = ("channel__name", "message_id")
    ordering = ("channel__name", "seq")
    list_select_related = ("channel", "publisher")
    show_full_result_count = False

    @admin.display(description="data")
    def data_preview(self, obj: Message) -> str:
        return obj.data if len(obj.data) <= 120 else obj.data[:117] + "..."


@admin.register(Channel)
class ChannelAdmin(ReadOnlyAdmin):
    list_display = ("name", "last_seq", "oldest_kept_seq", "retention", "created_at")
    search_fields = ("name",)
    ordering = ("name",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Channel]:
        # Per listed channel, its first row by the (channel, seq) index. A Min over a
        # join grouped every message of every channel for each page (119 ms for 300,000
        # messages, growing with the table; this is a few index probes a page).
        oldest = Message.objects.filter(channel=OuterRef("pk")).order_by("seq").values("seq")
        return super().get_queryset(request).annotate(oldest_seq=Subquery(oldest[:1]))

    @admin.display(description="oldest kept seq", ordering="oldest_seq")
    def oldest_kept_seq(self, obj: Channel) -> int | None:
        return obj.oldest_seq  # type: ignore[attr-defined]  # the annotation get_queryset adds

    @admin.display(description="retention")
    def retention(self, obj: Channel) -> str:
        return retention_policy(obj.name).describe()


class PusherAppForm(forms.ModelForm):
    class Meta:
        model = PusherApp
        fields = "__all__"

    def clean_webhook_urls(self) -> str:
        """Only URLs a webhook can be POSTed to, as ``manage.py pusher_app`` takes: any
        other failed every delivery, each retried until dead-lettered, found only when
        events came."""
        text: str = self.cleaned_data["webhook_urls"]
        problems = [p for p in map(webhook_url_problem, text.split()) if p is not None]
        if problems:
            raise ValidationError(problems)
        return text


@admin.register(PusherApp)
class PusherAppAdmin(admin.ModelAdmin):
    """Apps of the Pusher protocol. The id, key and secret are made by the server when
    an app is added (as ``manage.py pusher_app create`` does) and never typed in: a
    secret someone chose is a secret someone else may guess. The secret is shown once,
    in the message after adding, as the command prints it once: on the app's page,
    anyone allowed to view apps could read it and sign for any channel. Changes reach
    every node within ``APP_CACHE_SECS``."""

    list_display = ("name", "app_id", "key", "client_events", "enabled", "created_at")
    list_filter = ("enabled", "client_events")
    search_fields = ("name", "app_id", "key")
    fields = ("name", "app_id", "key", "client_events", "enabled", "webhook_urls")
    readonly_fields = ("app_id", "key")
    form = PusherAppForm

    def save_model(self, request: HttpRequest, obj: PusherApp, form: Any, change: bool) -> None:
        if not change:
            obj.key, obj.secret = new_credentials()
            obj.app_id = free_app_id()
        super().save_model(request, obj, form, change)
        app_cache.forget()
        if not change:
            messages.warning(request, f"Secret of {obj} (shown only now): {obj.secret}")

    def delete_model(self, request: HttpRequest, obj: PusherApp) -> None:
        super().delete_model(request, obj)
        app_cache.forget()
