"""What the benchmark measures: our server and the two references, ready to launch.

Our server needs a database, migrations and tokens for its publishers (a user's API
token, and a service token for the publish scenarios) before a node starts; the
references need nothing but Redis. Preparing ours runs Django's own management commands
as subprocesses, the way an operator would.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import replace

import psycopg
import redis

from bench.servers import (
    BARE_APP,
    CHANNELS_REF_APP,
    OURS_APP,
    RUNNODE_TEMPLATE,
    Target,
)
from devtools.processes import ROOT as REPO_ROOT
from devtools.processes import ProcessError, manage

TARGET_NAMES = ("ours", "channels_ref", "bare_ref")
BENCH_USERNAME = "bench"
BENCH_SERVICE_TOKEN = "bench-publisher"  # its key is shown once: made afresh each run
MANAGE_TIMEOUT_SECS = 300.0
TOKEN_PATTERN = re.compile(r"\b[0-9a-f]{40}\b")


class TargetSetupError(Exception):
    """Raised when our server cannot be prepared (no manage.py, a failed migrate, ...)."""


def ours_env(database_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DJANGO_SETTINGS_MODULE": "realtime_project.settings",
        # DEBUG stays off (it records every query); then the settings want a key.
        "SECRET_KEY": secrets.token_urlsafe(32),
        "REDIS_PREFIX": redis_prefix,  # apart from a developer's own data in db 0
        # Publishers here send far above the per-connection default (50/s): the rate
        # limit is part of the product, but what this measures is fan-out.
        # (Service tokens publish here either way, exempt from that limit or not.)
        "PUSH_RATE_BURST": "1000000",
        "PUSH_RATE_PER_SEC": "1000000",
        # The same for REST: 16 clients sharing one service token would otherwise meet
        # the per-credential budget (6,000/min) in a second.
        "PUSH_REST_RATE": "1000000000/s",
        # Every load generator connects from 127.0.0.1: the per-address budgets would
        # hold the whole benchmark to one client address's share.
        "PUSH_ADDRESS_HANDSHAKE_PER_SEC": "0",
        "PUSH_ADDRESS_FRAME_PER_SEC": "0",
        "PUSH_ADDRESS_SUBSCRIBE_PER_SEC": "0",
        "PUSH_ADDRESS_REST_PER_SEC": "0",
        "PUSH_MAX_ANONYMOUS_CONNECTIONS_PER_IP": "0",
        "PUSH_MAX_HTTP_CONNECTIONS_PER_IP": "0",
        # The benchmark drives the node to its limit on purpose, with anonymous
        # subscribers: shedding them while its loop lags would measure the shedding.
        "PUSH_OVERLOAD_LAG_MS": "0",
        # The load generator's clients send no heartbeats; connecting 100,000 of them
        # takes longer than the default 75 s after which a silent client is closed 4001.
        "PUSH_HEARTBEAT_TIMEOUT_SECS": "3600",
    }


def build_targets(
    names: list[str],
    *,
    database_url: str,
    redis_url: str,
    ours_command: str,
    redis_prefix: str = "pushbench",
) -> list[Target]:
    """The requested targets in order; ``ours`` is prepared (migrated, token made)."""
    ours_template = {"runnode": RUNNODE_TEMPLATE, "raw": ""}.get(ours_command, ours_command)
    catalogue = {
        "ours": Target(
            "ours",
            OURS_APP,
            ours_env(database_url, redis_url, redis_prefix),
            ours_template,
            serves_sse=True,
            bounds_send_queues=True,
            serves_pusher=True,
        ),
        "channels_ref": Target(
            "channels_ref",
            CHANNELS_REF_APP,
            {
                "REDIS_URL": redis_url,
                "DJANGO_SETTINGS_MODULE": "bench.references.channels_ref.settings",
            },
        ),
        "bare_ref": Target("bare_ref", BARE_APP, multi_node_env={"BARE_HUB_REDIS_URL": redis_url}),
    }
    targets = [catalogue[name] for name in names]
    if "ours" in names:
        forget_redis_keys(redis_url, redis_prefix)
    return [prepare_ours(t, database_url) if t.name == "ours" else t for t in targets]


def forget_redis_keys(redis_url: str, redis_prefix: str) -> int:
    """Delete what earlier runs of our nodes left in Redis under the bench's own prefix
    (recent-history streams, presence and registry keys): they piled up run after run
    (100 MB after a day's runs), and each run should start from the same Redis."""
    client = redis.Redis.from_url(redis_url)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{redis_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
        return deleted
    finally:
        client.close()


def _ensure_database(database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1].split("?", 1)[0]
    admin_url = database_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def _manage(env: dict[str, str], *args: str) -> str:
    try:
        return manage(
            {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)},
            *args,
            timeout_secs=MANAGE_TIMEOUT_SECS,
        )
    except ProcessError as exc:
        raise TargetSetupError(str(exc)) from exc


def prepare_database(env: dict[str, str], database_url: str) -> None:
    """Create the benchmark database if needed and migrate it."""
    if not (REPO_ROOT / "manage.py").exists():
        raise TargetSetupError("no manage.py yet: our server cannot be measured")
    _ensure_database(database_url)
    _manage(env, "migrate", "--noinput")


def prepare_ours(target: Target, database_url: str) -> Target:
    """Create the database, migrate, make the bench user, its token and a service
    token."""
    prepare_database(target.env, database_url)
    make_user = (
        "from django.contrib.auth import get_user_model; "
        f"get_user_model().objects.get_or_create(username={BENCH_USERNAME!r})"
    )
    _manage(target.env, "shell", "-c", make_user)
    # Publishing needs a grant; "*" covers every channel the scenarios use.
    grants = (
        "from accounts.models import ChannelGrant;"
        "from django.contrib.auth.models import User;"
        f"ChannelGrant.objects.get_or_create(user=User.objects.get(username={BENCH_USERNAME!r}),"
        " pattern='*', can_publish=True)"
    )
    _manage(target.env, "shell", "-c", grants)
    output = _manage(target.env, "drf_create_token", BENCH_USERNAME)
    match = TOKEN_PATTERN.search(output)
    if match is None:
        raise TargetSetupError(f"no token in drf_create_token output: {output!r}")
    return replace(target, token=match.group(0), service_token=_make_service_token(target.env))


def _make_service_token(env: dict[str, str]) -> str:
    """A fresh service token allowed to publish everywhere (the last run's is deleted:
    only its hash was stored)."""
    forget = (
        "from accounts.models import ServiceToken;"
        f"ServiceToken.objects.filter(name={BENCH_SERVICE_TOKEN!r}).delete()"
    )
    _manage(env, "shell", "-c", forget)
    output = _manage(env, "service_token", "create", BENCH_SERVICE_TOKEN, "--scope", "publish:*")
    words = output.split()
    if len(words) != 1:  # the command prints the key alone
        raise TargetSetupError(f"no key in service_token create output: {output!r}")
    return words[0]
