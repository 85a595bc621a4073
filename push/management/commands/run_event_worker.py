"""Process lifecycle events (``push.ops.event_worker``); run as many as you like."""

from __future__ import annotations

import argparse
import signal
import socket
import uuid
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from common.conf import push_settings
from common.redis_client import redis_prefix, redis_sync
from push.ops.event_worker import DEFAULT_GROUP, EventWorker, configured_handlers
from push.ops.worker_metrics import serve_worker_metrics


class Command(BaseCommand):
    help = "Run the lifecycle-event handlers (webhooks and your own) from the event stream."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--group", default=DEFAULT_GROUP)
        parser.add_argument("--consumer", default=f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError("lifecycle events need REDIS_URL")
        client = redis_sync(socket_timeout=10)
        handlers = configured_handlers()
        worker = EventWorker(
            client,
            stream=f"{redis_prefix()}:events",
            group=options["group"],
            consumer=options["consumer"],
            handlers=handlers,
            max_attempts=push_settings.EVENT_MAX_ATTEMPTS,
            retry_idle_ms=int(push_settings.EVENT_RETRY_SECS * 1000),
            retry_total_ms=int(push_settings.EVENT_RETRY_TOTAL_SECS * 1000),
            concurrency=push_settings.EVENT_CONCURRENCY,
        )
        if push_settings.EVENT_WORKER_METRICS_PORT:
            self._serve_metrics(client, worker)
        stopping = {"now": False}

        def stop(signum: int, frame: Any) -> None:
            stopping["now"] = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write(f"event worker {options['consumer']} in group {options['group']}")
        self.stdout.flush()  # a pipe or a file buffers it; operators want it at start
        worker.run(stop=lambda: stopping["now"])

    def _serve_metrics(self, client: Any, worker: EventWorker) -> None:
        host = push_settings.EVENT_WORKER_METRICS_HOST
        port = push_settings.EVENT_WORKER_METRICS_PORT
        try:
            serve_worker_metrics(
                client, stream=worker.stream, group=worker.group, host=host, port=port
            )
        except OSError as exc:  # the port taken, the host no address of this machine
            raise CommandError(
                f"cannot serve metrics on {host}:{port} (PUSH_EVENT_WORKER_METRICS_HOST, "
                f"PUSH_EVENT_WORKER_METRICS_PORT): {exc}"
            ) from exc
