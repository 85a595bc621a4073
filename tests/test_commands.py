"""The management commands as an operator meets them: a setting that cannot be read,
PostgreSQL or Redis unreachable, or a wrong argument ends a command at once with one
line that says what is wrong and a non-zero exit status, never a traceback or a wait."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from devtools.processes import ROOT, free_port

pytestmark = pytest.mark.e2e

# Each command below gives up within this: the database pool's 3 s wait for a
# connection, and Python and Django starting.
GIVE_UP_WITHIN_SECS = 20.0


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``manage.py args`` run to its end with ``env`` over this process's environment."""
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, "DEBUG": "1", **env},
        capture_output=True,
        text=True,
        timeout=GIVE_UP_WITHIN_SECS * 2,
    )
    assert time.monotonic() - started < GIVE_UP_WITHIN_SECS, finished
    return finished


def last_line(finished: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in finished.stderr, finished.stderr
    return finished.stderr.strip().splitlines()[-1]


def closed_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PUSH_RATE_BURST": "0"}, "PUSH_RATE_BURST='0'"),
        # Read by DRF only at the first request, which it answered 500, as every other.
        ({"PUSH_REST_ANON_RATE": "5/fortnight"}, "PUSH_REST_ANON_RATE='5/fortnight'"),
        ({"PUSH_GAP_WAIT_SECS": "inf"}, "PUSH_GAP_WAIT_SECS='inf'"),
        ({"PUSH_DROP_OLDEST_CHANNELS": "ticker:* chat:*"}, "PUSH_DROP_OLDEST_CHANNELS"),
        # Checked against another option when first read, which was after start-up.
        ({"PUSH_NODE_DEAD_AFTER_SECS": "1"}, "PUSH_NODE_DEAD_AFTER_SECS"),
        ({"PUSHER_APP_ENCRYPTION_MASTER_KEY": "c2hvcnQ="}, "PUSHER_APP_ENCRYPTION_MASTER_KEY"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD'"),
        ({"REDIS_SENTINELS": "sentinel"}, "REDIS_SENTINELS='sentinel'"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"DEBUG": "0", "SECRET_KEY": ""}, "SECRET_KEY"),
    ],
)
def test_a_malformed_setting_stops_a_command_with_one_line_naming_it(
    env: dict[str, str], named: str
) -> None:
    finished = manage("check", **env)
    assert finished.returncode == 1
    line = last_line(finished)
    assert line.startswith("configuration error: ") and named in line, line


def test_a_malformed_database_url_is_named_without_its_password() -> None:
    finished = manage("check", DATABASE_URL="postgres://push:hunter2@db:port/push")
    assert finished.returncode == 1
    assert last_line(finished).startswith("configuration error: DATABASE_URL is not valid")
    assert "hunter2" not in finished.stderr


def test_a_command_without_postgresql_says_so_in_its_last_line() -> None:
    address = closed_address()
    finished = manage("pusher_app", "list", DATABASE_URL=f"postgres://postgres@{address}/push")
    assert finished.returncode == 1
    assert last_line(finished).startswith(f"database error (PostgreSQL {address}): ")


def test_the_event_worker_without_redis_says_so() -> None:
    address = closed_address()
    finished = manage("run_event_worker", REDIS_URL=f"redis://{address}/0")
    assert finished.returncode == 1
    line = last_line(finished)
    assert line.startswith("Redis unreachable: ") and address in line, line


def test_traceback_still_shows_the_traceback() -> None:
    finished = manage("check", "--traceback", PUSH_RATE_BURST="0")
    assert finished.returncode == 1
    assert "Traceback" in finished.stderr


def test_an_event_handler_that_cannot_be_imported_is_named() -> None:
    finished = manage("run_event_worker", PUSH_EVENT_HANDLERS="myapp.events.nowhere")
    assert finished.returncode == 1
    assert last_line(finished).startswith(
        "configuration error: PUSH_EVENT_HANDLERS: 'myapp.events.nowhere'"
    )


def test_the_event_worker_says_when_its_metrics_port_is_taken(taken_port: int) -> None:
    finished = manage("run_event_worker", PUSH_EVENT_WORKER_METRICS_PORT=str(taken_port))
    assert finished.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{taken_port}" in last_line(finished)


def test_runnode_refuses_a_port_out_of_range() -> None:
    """uvicorn served ``--port 99999`` on 34463, without a word."""
    finished = manage("runnode", "--port", "99999")
    assert finished.returncode == 2
    assert "argument --port: 99999 is not a port" in last_line(finished)


def test_daphne_that_cannot_listen_exits_non_zero(taken_port: int) -> None:
    finished = manage("runnode", "--server", "daphne", "--port", str(taken_port))
    assert finished.returncode == 1
    assert f"daphne could not listen on 127.0.0.1:{taken_port}" in last_line(finished)


@pytest.mark.parametrize("every", ["0", "-5", "inf"])
def test_trim_history_refuses_an_interval_that_is_not_positive(every: str) -> None:
    finished = manage("trim_history", "--every", every)
    assert finished.returncode == 2
    assert f"argument --every: {every} is not a positive number of seconds" in last_line(finished)


def test_pusher_app_refuses_a_webhook_url_it_could_never_post_to() -> None:
    finished = manage("pusher_app", "create", "shop", "--webhook-url", "hooks.example.com/pusher")
    assert finished.returncode == 1
    assert "is not an http:// or https:// URL" in last_line(finished)
