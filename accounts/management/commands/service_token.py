"""Manage service tokens: create (with scopes), list, revoke.

manage.py service_token create ticker-feed --scope publish:ticker:*
manage.py service_token list
manage.py service_token revoke ticker-feed
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from accounts.models import PATTERN_MAX_CHARS, ChannelGrant, ServiceToken

RIGHTS = {"subscribe", "publish", "presence"}


def parse_scope(scope: str) -> tuple[set[str], str]:
    """``publish:ticker:*`` or ``subscribe,publish:news`` -> ({rights}, pattern)."""
    rights_text, _, pattern = scope.partition(":")
    rights = {r.strip() for r in rights_text.split(",") if r.strip()}
    if not pattern or not rights or not rights <= RIGHTS:
        raise CommandError(f"scope {scope!r} must be RIGHTS:PATTERN, rights among {sorted(RIGHTS)}")
    if len(pattern) > PATTERN_MAX_CHARS:
        raise CommandError(f"a pattern is at most {PATTERN_MAX_CHARS} characters")
    return rights, pattern


class Command(BaseCommand):
    help = "Create, list or revoke service tokens for back-end publishers."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create")
        create.add_argument("name")
        create.add_argument("--scope", action="append", default=[], help="RIGHTS:PATTERN")
        sub.add_parser("list")
        revoke = sub.add_parser("revoke")
        revoke.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"_{options['action']}")(options)

    @transaction.atomic
    def _create(self, options: dict[str, Any]) -> None:
        scopes = [parse_scope(s) for s in options["scope"]]
        name_max = ServiceToken._meta.get_field("name").max_length
        if len(options["name"]) > name_max:  # type: ignore[operator]  # a CharField's is set
            raise CommandError(f"a name is at most {name_max} characters")
        if ServiceToken.objects.filter(name=options["name"]).exists():
            raise CommandError(f"a service token named {options['name']!r} exists")
        token, key = ServiceToken.issue(options["name"])
        for rights, pattern in scopes:
            ChannelGrant.objects.create(
                service_token=token,
                pattern=pattern,
                can_subscribe="subscribe" in rights,
                can_publish="publish" in rights,
                can_presence="presence" in rights,
            )
        self.stdout.write(key)

    def _list(self, options: dict[str, Any]) -> None:
        for token in ServiceToken.objects.prefetch_related("grants"):
            state = "revoked" if token.revoked_at else "active"
            grants = ", ".join(str(g).split(": ", 1)[1] for g in token.grants.all())
            used = token.last_used_at.isoformat() if token.last_used_at else "never"
            self.stdout.write(f"{token.name}\t{token.key_prefix}…\t{state}\tused {used}\t{grants}")

    def _revoke(self, options: dict[str, Any]) -> None:
        token = ServiceToken.objects.filter(name=options["name"]).first()
        if token is None:
            raise CommandError(f"no service token named {options['name']!r}")
        token.revoke()
        self.stdout.write(f"revoked {token.name}")
