"""A TCP forwarder to Redis in the test's own process, for tests of what a node does
when Redis breaks a connection or stops answering on it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator

from django.conf import settings
from django.test import override_settings
from redis.connection import parse_url

from common.redis_client import channel_layer_host


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
        # The connections made so far whose packets now vanish for good (``drop_open``).
        self._dropped: set[int] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        number = self.accepted
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, upstream_writer]
        await asyncio.gather(
            self._pipe(reader, upstream_writer, number),
            self._pipe(upstream_reader, writer, number, answers=True),
        )

    def drop_open(self) -> None:
        """The connections open now lose every packet from here on, without a reset (a
        NAT or firewall that forgot them while idle); new ones work."""
        self._dropped.update(range(1, self.accepted + 1))

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
        *,
        answers: bool = False,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                while self.frozen:
                    await asyncio.sleep(0.01)
                if (answers and self.answers_lost) or number in self._dropped:
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


@contextlib.asynccontextmanager
async def proxied_settings() -> AsyncIterator[Proxy]:
    """A proxy to the settings' Redis, with the settings a node reads (``REDIS_URL`` and
    the channel layer, built as the settings build it) pointing at it meanwhile."""
    target = parse_url(str(settings.REDIS_URL))
    proxy = Proxy((target.get("host", "127.0.0.1"), int(target.get("port", 6379))))
    url = f"redis://127.0.0.1:{await proxy.start()}/{target.get('db', 0)}"
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    layers["default"]["CONFIG"]["hosts"] = [channel_layer_host(url, [], "")]
    try:
        with override_settings(REDIS_URL=url, CHANNEL_LAYERS=layers):
            yield proxy
    finally:
        await proxy.stop()
