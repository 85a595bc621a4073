"""A TCP forwarder the fault tests put between the nodes and PostgreSQL.

    python tests/faults/tcp_proxy.py --listen-port 15432 --target-port 5432

Stopping this process is PostgreSQL becoming unreachable: every forwarded connection
is cut, and new ones are refused until a new forwarder listens on the same port. It
stops by itself after ``--lifetime-secs``, or when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os

BUFFER_BYTES = 65_536
PARENT_CHECK_SECS = 1.0


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(BUFFER_BYTES):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # One side is gone: the other learns it at once, as with a real network cut.
        writer.close()


async def forward(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))


async def run(listen: tuple[str, int], target: tuple[str, int], lifetime_secs: float) -> None:
    parent = os.getppid()
    server = await asyncio.start_server(
        lambda r, w: forward(r, w, target), *listen, reuse_address=True
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lifetime_secs
    async with server:
        while loop.time() < deadline and os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK_SECS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--lifetime-secs", type=float, default=900.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            run(
                (args.listen_host, args.listen_port),
                (args.target_host, args.target_port),
                args.lifetime_secs,
            )
        )


if __name__ == "__main__":
    main()
