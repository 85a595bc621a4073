"""Admin for grants, service tokens and users' API tokens. A new service token's key
is shown once, in the message after saving; only its hash is stored. A user's API
token (DRF's ``authtoken``, stored as it is) is shown once too, when it is added, and
elsewhere by the first characters of its key only: DRF's own admin listed every key
in full to anyone allowed to view tokens, a superuser's among them.

A grant made here starts with no right ticked and must name at least one: the least
right is the default, and nobody gets ``subscribe`` on a pattern by overlooking a
checkbox. Revoking tokens takes the change permission, not only the view one."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from rest_framework.authtoken.admin import TokenAdmin
from rest_framework.authtoken.models import TokenProxy

from accounts.models import ChannelGrant, ServiceToken

# Characters of a user token's key the admin shows, as a service token's ``key_prefix``.
TOKEN_KEY_SHOWN = 8


class GrantForm(forms.ModelForm):
    # Declared here to start unticked: the model's default (subscribe) is for code
    # that creates grants, where the caller says what it means.
    can_subscribe = forms.BooleanField(required=False, initial=False)
    can_publish = forms.BooleanField(required=False, initial=False)
    can_presence = forms.BooleanField(
        required=False, initial=False, help_text="see presence member lists"
    )

    class Meta:
        model = ChannelGrant
        fields = "__all__"

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if not any(
            cleaned.get(right) for right in ("can_subscribe", "can_publish", "can_presence")
        ):
            raise ValidationError("Choose at least one right: subscribe, publish or presence.")
        return cleaned


@admin.register(ChannelGrant)
class ChannelGrantAdmin(admin.ModelAdmin):
    form = GrantForm
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
    form = GrantForm
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

    @admin.action(
        description="Revoke the selected tokens (open connections are closed)",
        permissions=["change"],
    )
    def revoke(self, request: HttpRequest, queryset: QuerySet[ServiceToken]) -> None:
        for token in queryset.filter(revoked_at__isnull=True):
            token.revoke()


def _token_name(token: TokenProxy) -> str:
    return f"{token.key[:TOKEN_KEY_SHOWN]}… ({token.user})"


# What the admin shows of a token wherever it names one (title, breadcrumbs, history,
# recent actions, deletion): DRF's ``__str__`` is the key. TokenProxy is DRF's model
# for its admin alone; the Token model itself is unchanged.
TokenProxy.__str__ = _token_name  # type: ignore[assignment,method-assign]  # see above

admin.site.unregister(TokenProxy)


@admin.register(TokenProxy)
class UserTokenAdmin(TokenAdmin):
    list_display = ("key_start", "user", "created")

    @admin.display(description="key")
    def key_start(self, obj: TokenProxy) -> str:
        return f"{obj.key[:TOKEN_KEY_SHOWN]}…"

    def save_model(self, request: HttpRequest, obj: TokenProxy, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            messages.warning(request, f"Key for {obj.user} (shown only now): {obj.key}")
