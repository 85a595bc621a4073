"""Who may do what on which channels: grants, and credentials for back-end services.

Users are Django's own and log in with a session or a DRF ``authtoken``. Services
(back-ends that publish tickers, say) get a ``ServiceToken`` instead: not a person,
scoped by its own grants, revocable, with its last use recorded.
"""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

SERVICE_TOKEN_PREFIX = "svc_"  # noqa: S105 - a visible prefix, not a secret


def hash_service_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ServiceToken(models.Model):
    name = models.CharField(max_length=100, unique=True)
    # Only the hash is stored: the key is shown once, when the token is created.
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    key_prefix = models.CharField(max_length=12, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def set_new_key(self) -> str:
        """Give the token a fresh key; returns the key, which is not stored anywhere."""
        key = SERVICE_TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.key_hash = hash_service_key(key)
        self.key_prefix = key[:12]
        return key

    @classmethod
    def issue(cls, name: str) -> tuple[ServiceToken, str]:
        token = cls(name=name)
        key = token.set_new_key()
        token.save()
        return token, key

    def revoke(self) -> None:
        self.revoked_at = timezone.now()
        self.save(update_fields=["revoked_at"])


# The longest grant pattern stored (the column's length).
PATTERN_MAX_CHARS = 100


class ChannelGrant(models.Model):
    """Rights on the channels whose names match ``pattern`` (shell-style: ``ticker:*``),
    for one user, one group or one service token."""

    pattern = models.CharField(
        max_length=PATTERN_MAX_CHARS, help_text="channel name or pattern: news, ticker:*"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="channel_grants",
    )
    group = models.ForeignKey(
        Group, null=True, blank=True, on_delete=models.CASCADE, related_name="channel_grants"
    )
    service_token = models.ForeignKey(
        ServiceToken, null=True, blank=True, on_delete=models.CASCADE, related_name="grants"
    )
    can_subscribe = models.BooleanField(default=True)
    can_publish = models.BooleanField(default=False)
    can_presence = models.BooleanField(default=False, help_text="see presence member lists")

    class Meta:
        ordering = ["pattern"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(user__isnull=False, group__isnull=True, service_token__isnull=True)
                    | models.Q(user__isnull=True, group__isnull=False, service_token__isnull=True)
                    | models.Q(user__isnull=True, group__isnull=True, service_token__isnull=False)
                ),
                name="grant_has_exactly_one_holder",
            )
        ]

    def __str__(self) -> str:
        holder = self.user or self.group or self.service_token
        rights = [
            right
            for right, allowed in (
                ("subscribe", self.can_subscribe),
                ("publish", self.can_publish),
                ("presence", self.can_presence),
            )
            if allowed
        ]
        return f"{holder}: {'/'.join(rights) or 'nothing'} on {self.pattern}"

    def clean(self) -> None:
        holders = [h for h in (self.user_id, self.group_id, self.service_token_id) if h]
        if len(holders) != 1:
            raise ValidationError("A grant belongs to exactly one user, group or service token.")
