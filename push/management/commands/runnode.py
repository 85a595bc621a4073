"""Run this project as one node under uvicorn (the default) or daphne, with the server
options the push server needs and a graceful drain on SIGTERM.

Why uvicorn by default: on the same machine and code it delivers more messages per CPU
second at high fan-out, accepts new connections faster (bench/README.md), and under the
abuse suite's fifty attackers it kept honest subscribers' p99 latency at about 100 ms
where daphne's was about 160 ms (docs/operations.md). daphne stays supported and tested.

Drain: the node stops accepting WebSockets, tells every client to go (1001: reconnect
to another node and resume with ``since``), lets queued frames go out, marks its
connections closed in the registry, and exits within ``PUSH_DRAIN_DEADLINE_SECS``.
A second SIGTERM or SIGINT stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

import uvicorn
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from common.conf import push_settings
from common.errors import CloseCode
from push.cluster.admission import open_connection_capacity, raise_open_file_limit
from push.services.runtime import drain_running_node
from push.transport.server_adapters import (
    MAX_INCOMPLETE_HEADS_PER_PEER,
    MAX_UNFINISHED_BODY_BYTES_PER_PEER,
    MAX_UNSENT_RESPONSE_BYTES_PER_PEER,
    bound_daphne_connections_per_peer,
    bound_daphne_request_bodies,
    bound_daphne_request_heads,
    bound_daphne_unsent_responses,
    bounded_head_httptools_protocol,
    defer_autobahn_config_dump,
    leave_daphne_requests_unparsed,
)

APPLICATION = "realtime_project.asgi:application"
# Under daphne, which reads a request's whole body before it calls the application: the
# application's answer to a request over its address's REST budget, given before that.
OVER_REST_BUDGET_BEFORE_BODY = "realtime_project.asgi.over_rest_budget_before_body"
LISTEN_BACKLOG = 4096
DEFAULT_SERVER = "uvicorn"
PORT_MAX = 65_535

logger = logging.getLogger(__name__)


def server_max_message_bytes() -> int:
    # Above our own limit, so a frame over it still reaches the consumer and gets the
    # contract's MESSAGE_TOO_LARGE envelope before the 1009 close; beyond this the
    # server itself closes with 1009.
    return push_settings.MAX_FRAME_BYTES * 4 + 65_536


async def _drain() -> None:
    try:
        await drain_running_node(
            code=CloseCode.GOING_AWAY, deadline_secs=push_settings.DRAIN_DEADLINE_SECS
        )
    except Exception:
        logger.exception("drain failed; stopping anyway")


def port_number(raw: str) -> int:
    """``--port``: uvicorn took 99999 as 34463 (modulo 65,536) and served there."""
    port = int(raw)
    if not 1 <= port <= PORT_MAX:
        raise argparse.ArgumentTypeError(f"{raw} is not a port (1 to {PORT_MAX})")
    return port


class Command(BaseCommand):
    help = "Run one push server node (uvicorn or daphne)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--server", choices=["uvicorn", "daphne"], default=DEFAULT_SERVER)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=port_number, default=8000)
        parser.add_argument(
            "--access-log", action="store_true", help="log every HTTP request (off by default)"
        )
        parser.add_argument(
            "--proxy-headers",
            action="store_true",
            help="one proxy in front (nginx): PUSH_TRUSTED_PROXIES=1 unless it is set higher",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["proxy_headers"] and push_settings.TRUSTED_PROXIES == 0:
            # The application resolves forwarded addresses itself (realtime_project.asgi):
            # the servers' own options would believe what the client put in the header.
            settings.PUSH = {**settings.PUSH, "TRUSTED_PROXIES": 1}
            push_settings.reload()
        if options["server"] == "uvicorn":
            self._run_uvicorn(options)
        else:
            self._run_daphne(options)

    def _run_uvicorn(self, options: dict[str, Any]) -> None:
        behind_proxy = bool(push_settings.TRUSTED_PROXIES)
        config = uvicorn.Config(
            APPLICATION,
            host=options["host"],
            port=options["port"],
            loop="uvloop",
            # httptools, with bounds on a request's line and headers, which it lacks.
            # Behind a proxy every connection has the proxy's address, and the proxy
            # reads the heads and bodies: unfinished ones are then not counted per peer.
            http=bounded_head_httptools_protocol(
                deadline_secs=push_settings.REQUEST_HEAD_DEADLINE_SECS,
                max_incomplete_per_peer=0 if behind_proxy else MAX_INCOMPLETE_HEADS_PER_PEER,
                max_unfinished_body_bytes_per_peer=0
                if behind_proxy
                else MAX_UNFINISHED_BODY_BYTES_PER_PEER,
                max_open_connections=open_connection_capacity(raise_open_file_limit()),
                max_connections_per_peer=0
                if behind_proxy
                else push_settings.MAX_HTTP_CONNECTIONS_PER_IP,
                max_unsent_response_bytes_per_peer=0
                if behind_proxy
                else MAX_UNSENT_RESPONSE_BYTES_PER_PEER,
            ),
            # The sans-I/O implementation: ~30% less CPU per frame than the legacy one
            # in the fan-out benchmark, with the same flow control.
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            ws_max_size=server_max_message_bytes(),
            # The push protocol has its own heartbeat; the server's ping only has to
            # notice dead TCP peers.
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            lifespan="off",
            access_log=options["access_log"],
            # The application applies PUSH_TRUSTED_PROXIES (realtime_project.asgi).
            proxy_headers=False,
            log_level="warning",
            # Django's LOGGING (realtime_project/settings.py) keeps uvicorn's loggers:
            # its own config would give them handlers without the token redaction.
            log_config=None,
            backlog=LISTEN_BACKLOG,
        )
        if options["access_log"]:
            # log_level above silences uvicorn's INFO lines, the access log's among them.
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        DrainingUvicornServer(config).run()

    def _run_daphne(self, options: dict[str, Any]) -> None:
        from daphne.server import Server
        from django.utils.module_loading import import_string

        application = import_string(APPLICATION.replace(":", "."))
        # An endpoint string, not host/port: Twisted's default listen backlog of 50
        # drops connections when thousands of clients reconnect at once.
        host = options["host"].replace(":", "\\:")
        server = Server(
            application=application,
            endpoints=[f"tcp:port={options['port']}:interface={host}:backlog={LISTEN_BACKLOG}"],
            signal_handlers=False,
            action_logger=RedactingAccessLog() if options["access_log"] else None,
            websocket_max_message_size=server_max_message_bytes(),
            websocket_max_frame_size=server_max_message_bytes(),
            # daphne's default closes every WebSocket after 24 hours.
            websocket_timeout=-1,
            verbosity=0,
        )
        _install_daphne_drain()
        leave_daphne_requests_unparsed()
        # Behind a proxy every connection has the proxy's address, and the proxy reads
        # the bodies: they are then not counted per peer.
        behind_proxy = bool(push_settings.TRUSTED_PROXIES)
        bound_daphne_request_bodies(
            settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
            max_unfinished_body_bytes_per_peer=0
            if behind_proxy
            else MAX_UNFINISHED_BODY_BYTES_PER_PEER,
            refused_before_body=import_string(OVER_REST_BUDGET_BEFORE_BODY),
        )
        if not behind_proxy:
            bound_daphne_connections_per_peer(push_settings.MAX_HTTP_CONNECTIONS_PER_IP)
            bound_daphne_unsent_responses(MAX_UNSENT_RESPONSE_BYTES_PER_PEER)
        # Last, so a connection refused for its address's unfinished heads is not built.
        bound_daphne_request_heads(
            deadline_secs=push_settings.REQUEST_HEAD_DEADLINE_SECS,
            max_incomplete_per_peer=0 if behind_proxy else MAX_INCOMPLETE_HEADS_PER_PEER,
        )
        defer_autobahn_config_dump()
        server.run()
        if not server.listening_addresses:
            # daphne logged why (its "Listen failure" line) and stopped, returning as
            # from a clean shutdown: exit status 0 told a supervisor all was well.
            raise CommandError(f"daphne could not listen on {options['host']}:{options['port']}")


def _install_daphne_drain() -> None:
    from twisted.internet import reactor

    state = {"draining": False}
    # ``# type: ignore[misc]`` on ``reactor.stop``: Twisted declares the reactor module's
    # ``stop`` as a plain callable attribute, which mypy reads as a method missing ``self``.

    def stop(signum: int, frame: Any) -> None:
        if state["draining"]:
            reactor.callFromThread(reactor.stop)  # type: ignore[misc]  # see above
            return
        state["draining"] = True
        reactor.callFromThread(_drain_then_stop)

    def _drain_then_stop() -> None:
        task = asyncio.get_event_loop().create_task(_drain())
        task.add_done_callback(lambda _: reactor.stop())  # type: ignore[misc]  # see above

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


class DrainingUvicornServer(uvicorn.Server):
    """uvicorn's Server with our drain before its own shutdown."""

    draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True
        loop = asyncio.get_event_loop()

        def start() -> None:
            task = loop.create_task(_drain())
            task.add_done_callback(
                lambda _: super(DrainingUvicornServer, self).handle_exit(sig, frame)
            )

        loop.call_soon_threadsafe(start)


class RedactingAccessLog:
    """daphne's access log with ``token=...`` removed from logged paths."""

    def __init__(self) -> None:
        import sys

        from daphne.access import AccessLogGenerator

        self._inner = AccessLogGenerator(sys.stdout)

    def __call__(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        from push.ops.logs import redact

        if "path" in details:
            details = dict(details, path=redact(str(details["path"])))
        self._inner(protocol, action, details)
