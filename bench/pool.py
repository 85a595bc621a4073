"""Orchestrator side of the client workers: spawn them, send commands, stop them.

Subscriber workers get the connections; one more worker publishes, so publishing
never waits behind a subscriber's frame parsing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from bench.worker import STOP_COMMAND, worker_main

SPAWN_TIMEOUT_SECS = 30.0
EXIT_TIMEOUT_SECS = 10.0


class WorkerError(Exception):
    """Raised when a worker answers a command with an error or not in time."""


class WorkerPool:
    """``subscribers`` subscriber workers plus one publisher worker."""

    def __init__(self, subscribers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._processes: list[Any] = []
        for _ in range(subscribers + 1):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            self._pipes.append(ours)
            self._processes.append(process)
        self.subscriber_count = subscribers
        self.call_all("ping", timeout_secs=SPAWN_TIMEOUT_SECS)

    @property
    def publisher(self) -> int:
        return self.subscriber_count

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def send(self, index: int, command: str, **kwargs: Any) -> None:
        self._pipes[index].send((command, kwargs))

    def answered(self, index: int, timeout_secs: float) -> bool:
        """Whether worker ``index`` has an answer waiting (after up to ``timeout_secs``)."""
        return self._pipes[index].poll(timeout_secs)

    def interrupt(self, index: int) -> None:
        """End worker ``index``'s publish phase now; its answer comes as usual."""
        self.send(index, STOP_COMMAND)

    def receive(self, index: int, timeout_secs: float) -> Any:
        pipe = self._pipes[index]
        if not pipe.poll(timeout_secs):
            raise WorkerError(f"worker {index} gave no answer in {timeout_secs:.0f} s")
        status, result = pipe.recv()
        if status != "ok":
            raise WorkerError(f"worker {index} failed:\n{result}")
        return result

    def call_each(
        self,
        command: str,
        kwargs_by_worker: dict[int, dict[str, Any]],
        timeout_secs: float,
    ) -> dict[int, Any]:
        """Send one command to several workers at once, then gather every answer."""
        for index, kwargs in kwargs_by_worker.items():
            self.send(index, command, **kwargs)
        deadline = time.monotonic() + timeout_secs
        return {
            index: self.receive(index, max(0.1, deadline - time.monotonic()))
            for index in kwargs_by_worker
        }

    def call_subscribers(self, command: str, timeout_secs: float, **kwargs: Any) -> list[Any]:
        indices = range(self.subscriber_count)
        answers = self.call_each(command, {i: kwargs for i in indices}, timeout_secs)
        return [answers[i] for i in indices]

    def call_all(self, command: str, timeout_secs: float, **kwargs: Any) -> list[Any]:
        indices = range(len(self._pipes))
        answers = self.call_each(command, {i: kwargs for i in indices}, timeout_secs)
        return [answers[i] for i in indices]

    def close(self) -> None:
        """Ask every worker to exit; kill by PID any that does not."""
        for pipe in self._pipes:
            try:
                pipe.send(("exit", {}))
            except (BrokenPipeError, OSError):
                continue
        deadline = time.monotonic() + EXIT_TIMEOUT_SECS
        for process in self._processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGKILL)
                process.join(1.0)
        for pipe in self._pipes:
            pipe.close()
