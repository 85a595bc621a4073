"""A TCP forwarder to Redis in the test's own process, for tests of what a node does
when Redis breaks a connection or stops answering on it."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """A TCP forwarder to Redis in this process that can cut its connections (a reset),
    freeze them (packets that vanish: nothing forwarded, nothing closed), or lose
    Redis' answers only (what the client sends still runs)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = False
        self.answers_lost = False
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, upstream_writer]
        await asyncio.gather(
            self._pipe(reader, upstream_writer),
            self._pipe(upstream_reader, writer, answers=True),
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, answers: bool = False
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                while self.frozen:
                    await asyncio.sleep(0.01)
                if answers and self.answers_lost:
                    continue
                writer.write(chunk)
                await writer.drain()
        writer.close()

    def cut(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def stop(self) -> None:
        self.frozen = False
        self.cut()
        if self._server is not None:
            self._server.close()
