"""Manage the apps of the Pusher protocol (docs/pusher.md).

manage.py pusher_app create NAME [--client-events] [--webhook-url URL ...]
    prints the new app's id, key and secret, once: the secret is not shown again
    (the admin shows it to superusers, as any stored credential).
manage.py pusher_app list
    every app with its id, key and settings, never a secret.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from common.conf import webhook_url_problem
from push.models import PusherApp
from push.services.pusher_apps import app_cache, free_app_id, new_credentials


class Command(BaseCommand):
    help = "Create or list Pusher apps (id, key, secret for pusher-js and Pusher server libraries)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        create = actions.add_parser("create", help="create an app and print its credentials once")
        create.add_argument("name")
        create.add_argument(
            "--client-events",
            action="store_true",
            help="let its clients send client-* events on private and presence channels",
        )
        create.add_argument(
            "--webhook-url", action="append", default=[], help="where its webhooks go (repeatable)"
        )
        actions.add_parser("list", help="list the apps (no secrets)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "create":
            self._create(options)
        else:
            self._list()

    def _create(self, options: dict[str, Any]) -> None:
        name = options["name"].strip()
        if not name:
            raise CommandError("an app needs a name")
        for url in options["webhook_url"]:
            if problem := webhook_url_problem(url):
                raise CommandError(f"--webhook-url {problem}")
        key, secret = new_credentials()
        app = PusherApp.objects.create(
            name=name,
            app_id=free_app_id(),
            key=key,
            secret=secret,
            client_events=options["client_events"],
            webhook_urls="\n".join(options["webhook_url"]),
        )
        app_cache.forget()
        self.stdout.write(f"app_id={app.app_id}\nkey={app.key}\nsecret={app.secret}")

    def _list(self) -> None:
        for app in PusherApp.objects.order_by("name"):
            state = "enabled" if app.enabled else "disabled"
            events = "client events" if app.client_events else "no client events"
            self.stdout.write(f"{app.app_id}\t{app.key}\t{app.name}\t{state}, {events}")
