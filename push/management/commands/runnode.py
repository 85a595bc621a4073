"""Run this project as one node under daphne (production) or uvicorn, with the
server options the push server needs, so no one has to remember them."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from push.conf import push_settings

APPLICATION = "realtime_project.asgi:application"
LISTEN_BACKLOG = 4096


def server_max_message_bytes() -> int:
    # Above our own limit, so a frame over it still reaches the consumer and gets the
    # contract's MESSAGE_TOO_LARGE envelope before the 1009 close; beyond this the
    # server itself closes with 1009.
    return push_settings.MAX_FRAME_BYTES * 4 + 65_536


class Command(BaseCommand):
    help = "Run one push server node (daphne or uvicorn)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--server", choices=["daphne", "uvicorn"], default="daphne")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--access-log", action="store_true", help="log every HTTP request (off by default)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["server"] == "uvicorn":
            self._run_uvicorn(options)
        else:
            self._run_daphne(options)

    def _run_uvicorn(self, options: dict[str, Any]) -> None:
        import uvicorn

        uvicorn.run(
            APPLICATION,
            host=options["host"],
            port=options["port"],
            loop="uvloop",
            http="httptools",
            ws="websockets",
            ws_per_message_deflate=False,
            ws_max_size=server_max_message_bytes(),
            # The push protocol has its own heartbeat; the server's ping only has to
            # notice dead TCP peers.
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            lifespan="off",
            access_log=options["access_log"],
            log_level="warning",
            backlog=LISTEN_BACKLOG,
        )

    def _run_daphne(self, options: dict[str, Any]) -> None:
        from daphne.cli import CommandLineInterface

        # An endpoint string, not --bind/--port: Twisted's default listen backlog of 50
        # drops connections when thousands of clients reconnect at once.
        host = options["host"].replace(":", "\\:")
        argv = [
            "--endpoint",
            f"tcp:port={options['port']}:interface={host}:backlog={LISTEN_BACKLOG}",
            "--websocket-max-message-size",
            str(server_max_message_bytes()),
            "--websocket-max-frame-size",
            str(server_max_message_bytes()),
            # Verbosity 0: no access log on stdout (every WebSocket and request would
            # be a line, at tens of thousands per second); --access-log turns it on.
            "--verbosity",
            "0",
            APPLICATION,
        ]
        if options["access_log"]:
            argv[:0] = ["--access-log", "-"]
        CommandLineInterface().run(argv)
