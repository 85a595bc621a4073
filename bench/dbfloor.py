"""The publish scenarios' database floor: what PostgreSQL commits when each message is
its own transaction, measured with pgbench and no server at all.

pgbench runs the two statements of a publish that is alone in its batch
(``push/storage/write_batch.py``: the seq upsert of ``_allocate_seqs``, then the
messages' insert, each for one message) in one transaction per message, K clients
over C channels, against the benchmark database with its migrated schema (so the same
indexes and constraints). Its transactions/s is the rate a server that commits every
message alone cannot pass; a server that groups messages into fewer commits can.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from bench.options import Options
from bench.targets import TargetSetupError, ours_env, prepare_database

PGBENCH_SLACK_SECS = 60.0
PGBENCH_THREADS = 1  # one client thread is far from its limit here; the cores serve PostgreSQL
MISSING_PGBENCH = (
    "pgbench not found or not runnable: it comes with PostgreSQL "
    "(Debian: postgresql-client-common and postgresql-<version>)"
)
TPS_PATTERN = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
LATENCY_PATTERN = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
FAILED_PATTERN = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
PROCESSED_PATTERN = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)

# One message: the upsert takes the channel's next seq under its row lock, the insert
# stores the message; the commit releases the lock (as write_batch's statements do).
# Its id begins with the millisecond, as the node's do (push.fanout.message
# .new_message_ids): the 12 hex digits of the time, then a random UUID's last 20.
SCRIPT = """\\set ch random(1, {channels})
BEGIN;
INSERT INTO push_channel (name, last_seq, created_at) VALUES ('{prefix}' || :ch, 1, now()) \
ON CONFLICT (name) DO UPDATE SET last_seq = push_channel.last_seq + 1 RETURNING id, last_seq \\gset
INSERT INTO push_message (channel_id, seq, message_id, data, publisher_id, created_at) \
VALUES (:id, :last_seq, (lpad(to_hex((extract(epoch from clock_timestamp()) * 1000)::bigint), \
12, '0') || substr(gen_random_uuid()::text, 14))::uuid, '{data}', NULL, now());
COMMIT;
"""


def pgbench_path() -> str | None:
    """The pgbench command if it is installed and runs (Debian's wrapper needs a server
    version installed beside it)."""
    path = shutil.which("pgbench")
    if path is None:
        return None
    try:
        probe = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if probe.returncode == 0 else None


def pgbench_script(prefix: str, channels: int, payload_bytes: int) -> str:
    data = json.dumps({"t": 0.0, "p": "x" * payload_bytes}, separators=(",", ":"))
    return SCRIPT.format(prefix=prefix, channels=channels, data=data.replace("'", "''"))


def parse_pgbench(output: str) -> dict[str, Any]:
    """The figures of pgbench's summary (tps without connection time)."""
    figures: dict[str, Any] = {}
    for key, pattern, kind in (
        ("publish_per_s", TPS_PATTERN, float),
        ("ack_mean_ms", LATENCY_PATTERN, float),
        ("publish_failed", FAILED_PATTERN, int),
        ("published", PROCESSED_PATTERN, int),
    ):
        match = pattern.search(output)
        if match is not None:
            figures[key] = kind(match.group(1))
    if "publish_per_s" in figures:
        figures["publish_per_s"] = round(figures["publish_per_s"], 1)
    return figures


def _forget(database_url: str, prefix: str) -> None:
    # The floor's rows are of no use afterwards; left, they would grow the tables that
    # every later run measures.
    pattern = prefix.replace("_", r"\_") + "%"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM push_message WHERE channel_id IN "
            "(SELECT id FROM push_channel WHERE name LIKE %s)",
            (pattern,),
        )
        conn.execute("DELETE FROM push_channel WHERE name LIKE %s", (pattern,))


def run_db_floor(options: Options, prefix: str) -> dict[str, Any]:
    """Run pgbench for ``options.publish_secs``; its figures, or ``skipped``/``error``."""
    command = pgbench_path()
    if command is None:
        return {"skipped": MISSING_PGBENCH}
    env = ours_env(options.database_url, options.redis_url, options.redis_prefix)
    try:
        prepare_database(env, options.database_url)
    except TargetSetupError as exc:
        return {"error": str(exc).splitlines()[0]}
    clients = options.publish_connections
    script = pgbench_script(prefix, options.publish_channels, options.payload_bytes)
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as folder:
        path = Path(folder) / "publish.sql"
        path.write_text(script)
        args = [
            *(command, "--no-vacuum", "--protocol=prepared"),
            *(f"--client={clients}", f"--jobs={min(clients, PGBENCH_THREADS)}"),
            *(f"--time={max(1, round(options.publish_secs))}", f"--file={path}"),
            options.database_url,
        ]
        try:
            done = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=options.publish_secs + PGBENCH_SLACK_SECS,
                check=False,
            )
        finally:
            _forget(options.database_url, prefix)
    if done.returncode != 0:
        return {"error": f"pgbench exited {done.returncode}: {done.stderr.strip()[-300:]}"}
    figures = parse_pgbench(done.stdout)
    if "publish_per_s" not in figures:
        return {"error": f"no tps in pgbench output: {done.stdout[-300:]!r}"}
    return figures
