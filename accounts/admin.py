"""Admin for grants and service tokens. A new service token's key is shown once, in
the message after saving; only its hash is stored."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.models import ChannelGrant, ServiceToken


@admin.register(ChannelGrant)
class ChannelGrantAdmin(admin.ModelAdmin):
    list_display = (
        "pattern",
        "user",
        "group",
        "service_token",
        "can_subscribe",
        "can_publish",
        "can_presence",
    )
    list_filter = ("can_subscribe", "can_publish", "can_presence")
    search_fields = ("pattern", "user__username", "group__name", "service_token__name")
    autocomplete_fields = ("user",)


class GrantInline(admin.TabularInline):
    model = ChannelGrant
    fields = ("pattern", "can_subscribe", "can_publish", "can_presence")
    extra = 1


@admin.register(ServiceToken)
class ServiceTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "key_prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("key_prefix", "created_at", "last_used_at")
    fields = ("name", "key_prefix", "created_at", "last_used_at", "revoked_at")
    search_fields = ("name",)
    inlines = (GrantInline,)
    actions = ("revoke",)

    def save_model(self, request: HttpRequest, obj: ServiceToken, form: Any, change: bool) -> None:
        if not change:
            key = obj.set_new_key()
            messages.warning(request, f"Key for {obj.name} (shown only now): {key}")
        super().save_model(request, obj, form, change)

    @admin.action(description="Revoke the selected tokens (open connections are closed)")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ServiceToken]) -> None:
        for token in queryset.filter(revoked_at__isnull=True):
            token.revoke()
