"""Grant a user rights on channels matching a pattern.

manage.py grant alice 'news*' --publish
manage.py grant alice 'presence-*' --subscribe --presence
"""

from __future__ import annotations

import argparse
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from accounts.models import PATTERN_MAX_CHARS, ChannelGrant


class Command(BaseCommand):
    help = "Grant a user subscribe/publish/presence rights on a channel pattern."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("username")
        parser.add_argument("pattern")
        parser.add_argument("--subscribe", action="store_true")
        parser.add_argument("--publish", action="store_true")
        parser.add_argument("--presence", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user {options['username']!r}")
        if not (options["subscribe"] or options["publish"] or options["presence"]):
            raise CommandError("give at least one of --subscribe, --publish, --presence")
        if len(options["pattern"]) > PATTERN_MAX_CHARS:
            raise CommandError(f"a pattern is at most {PATTERN_MAX_CHARS} characters")
        grant = ChannelGrant.objects.create(
            user=user,
            pattern=options["pattern"],
            can_subscribe=options["subscribe"],
            can_publish=options["publish"],
            can_presence=options["presence"],
        )
        self.stdout.write(str(grant))
