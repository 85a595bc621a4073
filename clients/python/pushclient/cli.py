"""The command line: ``subscribe`` prints every message as one JSON line on stdout;
``publish`` sends one JSON value and prints the ``published`` reply.

    python -m pushclient subscribe news chat --url ws://127.0.0.1:8000/ws/
    python -m pushclient subscribe private-orders-42 --subscription-token private-orders-42=TOKEN
    python -m pushclient publish news '{"headline": "hello"}' --token KEY

``--url`` and ``--token`` default to ``$PUSH_URL`` and ``$PUSH_TOKEN``; ``--token`` is
the connection's (and REST's) API token. ``--subscription-token CHANNEL=TOKEN``
(repeatable) gives one of the channels subscribed a signed subscription token, which
also reads back its gaps from the history; ``--subscription-token-command CHANNEL=CMD``
runs a shell command that prints a fresh one for each subscribe and before each
``exp``. State changes, gaps, errors and the channels the server ended go to stderr,
so stdout stays one message per line; once every channel has ended for good, the
command exits with ``EXIT_ENDED``.
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
from pushclient.tokens import TokenProvider

DEFAULT_URL = "ws://127.0.0.1:8000/ws/"
# A publish is one request: fail fast instead of retrying forever like a subscriber.
PUBLISH_CONNECT_TIMEOUT_SECS = 10.0

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# Every channel subscribed was ended by the server for good (a string token's exp, a
# grant removed, a fresh token refused): a script can tell it from a failure and
# subscribe again with new tokens.
EXIT_ENDED = 3


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
        type=_channel_value,
        default=[],
        metavar="CHANNEL=TOKEN",
        help="a signed subscription token for one of the CHANNELs (repeatable); it holds "
        "until its exp, when the server ends that subscription (an 'ended' line on "
        f"stderr; once every channel has ended, the exit status is {EXIT_ENDED})",
    )
    subscribe.add_argument(
        "--subscription-token-command",
        action="append",
        type=_channel_value,
        default=[],
        metavar="CHANNEL=CMD",
        help="a shell command that prints a signed subscription token for one of the "
        "CHANNELs (repeatable; $PUSH_CHANNEL names it), run for each subscribe and again "
        "before the token's exp, so the subscription outlives its tokens",
    )

    publish = commands.add_parser("publish", parents=[common], help="publish one message")
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("data", metavar="DATA", help="a JSON value")
    return parser


def _channel_value(text: str) -> tuple[str, str]:
    """``CHANNEL=VALUE``: a channel name has no ``=`` (a command may have some)."""
    channel, sep, value = text.partition("=")
    if not (channel and sep and value):
        raise argparse.ArgumentTypeError(f"{text!r} is not CHANNEL=VALUE")
    return channel, value


def _subscription_tokens(args: argparse.Namespace) -> dict[str, str | TokenProvider]:
    """Each channel's token (``--subscription-token``) or provider
    (``--subscription-token-command``), once each, for channels that are subscribed: a
    typo must not leave a channel without its token."""
    tokens: dict[str, str | TokenProvider] = {}
    given = [(channel, token) for channel, token in args.subscription_token] + [
        (channel, _command_provider(command))
        for channel, command in args.subscription_token_command
    ]
    for channel, token in given:
        if channel not in args.channels:
            raise ValueError(f"a subscription token names {channel!r}, which is not a CHANNEL")
        if channel in tokens:
            raise ValueError(f"{channel!r} is given a subscription token twice")
        tokens[channel] = token
    return tokens


def _command_provider(command: str) -> TokenProvider:
    """A token provider that runs ``command`` in a shell (``$PUSH_CHANNEL`` set to the
    channel) and takes what it prints on stdout, stripped; its stderr is the CLI's."""

    async def provider(channel: str) -> str:
        process = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PUSH_CHANNEL": channel},
        )
        try:
            out, _ = await process.communicate()
        finally:
            # Given up (the client's request timeout): a hung command must not linger.
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            raise RuntimeError(f"the token command exited with status {process.returncode}")
        return out.decode().strip()

    return provider


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
    streaming = set(args.channels)
    gone: list[str] = []  # each channel the server ended, and why

    def on_ended(detail: dict[str, Any]) -> None:
        streaming.discard(detail["channel"])
        gone.append(f"{detail['channel']} ({detail['code']}: {detail['message']})")
        _stderr("ended", {**detail, "streaming": sorted(streaming)})
        if not streaming:
            done.set()

    client.on("ended", on_ended)
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
    except PushError as exc:
        _stderr("error", {"code": exc.code, "message": exc.message})
        return EXIT_ERROR
    finally:
        await client.close()
    if not streaming:
        # Nothing left to print, ever: a script watching this must hear it, on the
        # last line (after the close's state changes).
        message = "every channel ended: " + "; ".join(gone)
        _stderr("exit", {"status": EXIT_ENDED, "message": message})
        return EXIT_ENDED
    if ended and ended[0]["code"] != 1000:
        # Closed for good (1008: a token revoked, a rate gone over; 1009) before
        # --count: a script watching this must not take it for done.
        return EXIT_ERROR
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
