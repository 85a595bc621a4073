"""Apply history retention to every channel, once or every N seconds."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from django.core.management.base import BaseCommand
from django.db import DatabaseError, close_old_connections

from common.conf import push_settings
from push.cluster.registry import registry_trim_closed
from push.storage.retention import history_trim


def interval_secs(raw: str) -> float:
    """``--every``: a negative one failed after the first pass, and 0 trimmed in a loop
    as fast as PostgreSQL answered."""
    secs = float(raw)
    if not (secs > 0 and math.isfinite(secs)):
        raise argparse.ArgumentTypeError(f"{raw} is not a positive number of seconds")
    return secs


class Command(BaseCommand):
    help = (
        "Delete stored messages that the retention settings no longer keep, and the "
        "registry rows of connections closed longer ago than PUSH_REGISTRY_CLOSED_RETENTION."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--every", type=interval_secs, default=None, help="repeat every this many seconds"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        every = options["every"]
        if every is None:
            self._trim()  # once: a database error ends the command, with its one line
            return
        while True:
            try:
                self._trim()
            except DatabaseError as exc:
                # PostgreSQL away (restarting, failing over): the next pass tries again.
                # Exiting left retention undone for good wherever nothing restarts the
                # command, and the table growing.
                self.stderr.write(f"trim pass failed: {exc}".strip() + f"; next in {every:g} s")
            # Back to the pool between passes, and checked when taken again: kept for
            # the next pass, a connection PostgreSQL ended meanwhile (a restart) failed
            # that pass, and the command exited.
            close_old_connections()
            time.sleep(every)

    def _trim(self) -> None:
        trimmed = history_trim()
        total = sum(trimmed.values())
        self.stdout.write(f"trimmed {total} messages in {len(trimmed)} channels")
        closed = registry_trim_closed(push_settings.REGISTRY_CLOSED_RETENTION_SECS)
        self.stdout.write(f"deleted {closed} closed connections")
