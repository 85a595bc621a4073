"""The command line: ``subscribe`` prints every message as one JSON line on stdout;
``publish`` sends one JSON value and prints the ``published`` reply.

    python -m pushclient subscribe news chat --url ws://127.0.0.1:8000/ws/
    python -m pushclient subscribe private-orders-42 --subscription-token private-orders-42=TOKEN
    python -m pushclient publish news '{"headline": "hello"}' --token KEY

``--url`` and ``--token`` default to ``$PUSH_URL`` and ``$PUSH_TOKEN``; ``--token`` is
the connection's (and REST's) API token. ``--subscription-token CHANNEL=TOKEN``
(repeatable) gives one of the channels subscribed a signed subscription token, which
also reads back its gaps from the history. State changes, gaps and errors go to stderr,
so stdout stays one message per line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pushclient.client import PushClient
from pushclient.errors import PushError

DEFAULT_URL = "ws://127.0.0.1:8000/ws/"
# A publish is one request: fail fast instead of retrying forever like a subscriber.
PUBLISH_CONNECT_TIMEOUT_SECS = 10.0

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pushclient",
        description="Subscribe to channels of a push server, or publish to one.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("PUSH_URL", DEFAULT_URL))
    common.add_argument("--token", default=os.environ.get("PUSH_TOKEN"))
    common.add_argument("--format", choices=["json", "msgpack"], default="json")
    commands = parser.add_subparsers(dest="command", required=True)

    subscribe = commands.add_parser("subscribe", parents=[common], help="print messages")
    subscribe.add_argument("channels", nargs="+", metavar="CHANNEL")
    subscribe.add_argument("--since", type=int, help="resume every channel after this seq")
    subscribe.add_argument("--count", type=int, help="exit after this many messages")
    subscribe.add_argument(
        "--delta", action="store_true", help="ask for fossil deltas (printed as full data)"
    )
    subscribe.add_argument("--max-delay", type=float, default=30.0, help="backoff cap, seconds")
    subscribe.add_argument(
        "--subscription-token",
        action="append",
        type=_channel_token,
        default=[],
        metavar="CHANNEL=TOKEN",
        help="a signed subscription token for one of the CHANNELs (repeatable); it holds "
        "until its exp, when the server ends that subscription (an error on stderr)",
    )

    publish = commands.add_parser("publish", parents=[common], help="publish one message")
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("data", metavar="DATA", help="a JSON value")
    return parser


def _channel_token(text: str) -> tuple[str, str]:
    """``CHANNEL=TOKEN``: a channel name has no ``=``, nor has a token (base64url)."""
    channel, sep, token = text.partition("=")
    if not (channel and sep and token):
        raise argparse.ArgumentTypeError(f"{text!r} is not CHANNEL=TOKEN")
    return channel, token


def _subscription_tokens(args: argparse.Namespace) -> dict[str, str]:
    """Each ``--subscription-token``'s token by channel, once each, for channels that
    are subscribed: a typo must not leave a channel without its token."""
    tokens: dict[str, str] = {}
    for channel, token in args.subscription_token:
        if channel not in args.channels:
            raise ValueError(f"--subscription-token names {channel!r}, which is not a CHANNEL")
        if channel in tokens:
            raise ValueError(f"--subscription-token names {channel!r} twice")
        tokens[channel] = token
    return tokens


def _stderr(event: str, detail: dict[str, Any]) -> None:
    print(json.dumps({"event": event, **detail}, default=str), file=sys.stderr, flush=True)


async def _subscribe(args: argparse.Namespace) -> int:
    try:
        tokens = _subscription_tokens(args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    client = PushClient(
        args.url, token=args.token, format=args.format, max_delay_secs=args.max_delay
    )
    done = asyncio.Event()
    received = 0

    def print_message(message: dict[str, Any]) -> None:
        nonlocal received
        print(json.dumps(message, ensure_ascii=False), flush=True)
        received += 1
        if args.count is not None and received >= args.count:
            done.set()

    for event in ("state", "gap", "unrecovered", "error"):
        client.on(event, lambda detail, event=event: _stderr(event, detail))
    ended: list[dict[str, Any]] = []  # the close for good, if the server ended it

    def on_close(detail: dict[str, Any]) -> None:
        if not detail["will_reconnect"]:
            ended.append(detail)
            done.set()

    client.on("close", on_close)
    try:
        await client.connect()
        # Concurrently: one round trip for all channels. Each resumes after `since`.
        subscriptions = await asyncio.gather(
            *(
                client.subscribe(
                    channel,
                    print_message,
                    since=args.since,
                    delta=args.delta,
                    token=tokens.get(channel),
                )
                for channel in args.channels
            )
        )
        for sub in subscriptions:
            _stderr("subscribed", {"channel": sub.channel, "seq": sub.seq})
        await done.wait()
        if ended and ended[0]["code"] != 1000:
            # Closed for good (1008: a token revoked, a rate gone over; 1009) before
            # --count: a script watching this must not take it for done.
            return EXIT_ERROR
    except PushError as exc:
        _stderr("error", {"code": exc.code, "message": exc.message})
        return EXIT_ERROR
    finally:
        await client.close()
    return EXIT_OK


async def _publish(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        print(f"DATA must be JSON text: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.token:
        print("publishing needs --token (or $PUSH_TOKEN)", file=sys.stderr)
        return EXIT_USAGE
    client = PushClient(args.url, token=args.token, format=args.format)
    try:
        await asyncio.wait_for(client.connect(), PUBLISH_CONNECT_TIMEOUT_SECS)
        reply = await client.publish(args.channel, data)
    except (PushError, TimeoutError) as exc:
        print(f"publish failed: {exc or 'timed out'}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        await client.close()
    print(json.dumps(reply), flush=True)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = _subscribe if args.command == "subscribe" else _publish
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(command(args))
    return EXIT_OK
