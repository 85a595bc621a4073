"""Print the HMAC key of one signing purpose, for the back-end that needs it.

manage.py push_secret subscription-token   # your back-end mints subscription tokens
manage.py push_secret webhook              # your webhook receiver checks signatures

Each is ``PUSH_SUBSCRIPTION_TOKEN_SECRET`` / ``PUSH_WEBHOOK_SECRET`` when set, else a
key derived from ``SECRET_KEY`` for that purpose alone, so handing one out gives away
neither the other nor ``SECRET_KEY``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand

from accounts.subscription_tokens import subscription_token_secret
from push.ops.webhooks import webhook_secret

SECRETS: dict[str, Callable[[], str]] = {
    "subscription-token": subscription_token_secret,
    "webhook": webhook_secret,
}


class Command(BaseCommand):
    help = "Print the key of subscription tokens or of webhook signatures."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("purpose", choices=sorted(SECRETS))

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(SECRETS[options["purpose"]]())
