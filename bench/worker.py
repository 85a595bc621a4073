"""Client worker process: one uvloop event loop that obeys the orchestrator's commands.

The orchestrator talks to each worker over a multiprocessing pipe: a command is a
``(name, kwargs)`` tuple and every command gets exactly one reply, ``("ok", result)``
or ``("error", traceback text)``; only ``stop`` acts at once, while another command
runs (it ends a publish phase early), and gets none. Connections live in the worker
between commands, so a scenario can connect, publish, collect and close as separate
steps.
"""

from __future__ import annotations

import asyncio
import traceback
from multiprocessing.connection import Connection
from typing import Any

from bench.procinfo import raise_fd_limit
from bench.publisher import PublishSpec, run_publish
from bench.subscriber import SubscriberSet, SubscribeSpec

STOP_COMMAND = "stop"  # out of band: ends the publish phase in progress, gets no reply


class Worker:
    """The commands a worker understands; each returns something picklable."""

    def __init__(self) -> None:
        self.subscribers = SubscriberSet()
        self.stalled = SubscriberSet()  # counted apart: they are expected to lose
        # Set by an out-of-band "stop" (see _serve): ends a running publish phase early.
        self.stop_publish = asyncio.Event()

    async def cmd_subscribe(self, spec: SubscribeSpec) -> dict[str, Any]:
        return await (self.stalled if spec.stall else self.subscribers).open(spec)

    async def cmd_unstall(self, final_seq: dict[str, int], drain_secs: float) -> Any:
        """Let the stalled connections read again, count what they got, drop them."""
        self.stalled.resume_reading()
        stats = await self.stalled.collect(final_seq, drain_secs)
        await self.stalled.close_all()
        return stats

    async def cmd_reset(self, base_seqs: dict[str, int] | None = None) -> None:
        self.subscribers.reset_counts(base_seqs)

    async def cmd_collect(self, final_seq: dict[str, int], drain_secs: float) -> Any:
        return await self.subscribers.collect(final_seq, drain_secs)

    async def cmd_close(self) -> int:
        return await self.subscribers.close_all() + await self.stalled.close_all()

    async def cmd_publish(self, spec: PublishSpec) -> Any:
        self.stop_publish.clear()
        return await run_publish(spec, self.stop_publish)

    async def cmd_ping(self) -> str:
        return "pong"


async def _serve(pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    worker = Worker()

    def on_readable() -> None:
        try:
            command = pipe.recv()
        except EOFError:  # the orchestrator died: stop rather than spin
            command = ("exit", {})
        if command[0] == STOP_COMMAND:  # while a command runs: no queueing, no reply
            worker.stop_publish.set()
        else:
            inbox.put_nowait(command)

    loop.add_reader(pipe.fileno(), on_readable)
    try:
        while True:
            name, kwargs = await inbox.get()
            if name == "exit":
                await worker.cmd_close()
                return
            pipe.send(await _run_command(worker, name, kwargs))
    finally:
        loop.remove_reader(pipe.fileno())


async def _run_command(worker: Worker, name: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
    try:
        handler = getattr(worker, f"cmd_{name}")
        return "ok", await handler(**kwargs)
    except Exception:
        return "error", traceback.format_exc()


def worker_main(pipe: Connection) -> None:
    """Process entry point (spawned): raise the file limit, run the loop."""
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio still works, only slower
        pass
    asyncio.run(_serve(pipe))
