"""The principal behind a token key, kept in the process for a short time, so a
back-end publishing over REST is not looked up in PostgreSQL on every request.

Measured on one node (REST single publish, 16 keep-alive clients): looking up a
service token cost 3-4 queries and about a third of the node's CPU per request.

A kept principal is used only while both hold:

- the cache's *generation* (one value in the shared cache, Redis when configured) is
  the one read before the principal was looked up. Saving or deleting a token, a
  service token, a grant, a user or a group membership sets a new generation (at once
  and again when the transaction commits), so every node stops using what it kept:
  a token deleted or revoked through the ORM, the admin or ``manage.py service_token
  revoke`` is refused on the next request, as without the cache;
- it is younger than ``PUSH_REVOCATION_CHECK_SECS``: a change the signals do not see
  (``QuerySet.update``, SQL by hand) reaches REST within the interval in which live
  connections notice a revocation too.

The generation is read in the same round trip as the address's failed
authentications (``accounts.auth_failures``). While the shared cache cannot answer,
nothing is kept and every request is looked up, as before. Failures are never kept:
a token created a moment ago works at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache, RedisSerializer
from django.core.signals import setting_changed
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save
from redis.exceptions import RedisError

from accounts.auth_failures import (
    auth_failure_key,
    auth_failure_record,
    auth_failures_limit,
    too_many_failures,
)
from accounts.models import SERVICE_TOKEN_PREFIX, ChannelGrant, ServiceToken, hash_service_key
from accounts.principals import Principal, authenticate_key
from common.background import LoopLocal, spawn
from common.conf import push_settings
from common.db import db_call
from common.redis_client import HeldConnection, loop_client

logger = logging.getLogger(__name__)

GENERATION_KEY = "principals-generation"
# Connections of one event loop's client for ``kept_token_principal``: its checks are
# read together (``SharedReads``), one read at a time.
KEPT_CHECK_CONNECTIONS = 1
# Before a read is sent, it waits a loop pass for the checks of requests that arrive
# meanwhile, and another while more keep coming, up to this many passes (see
# ``SharedReads``).
KEPT_CHECK_GATHER_PASSES = 3
# Redis answers in well under a millisecond: past these the request goes the usual way
# (a Redis that stops answering must not hold a request, or a connection, for ever).
KEPT_CHECK_TIMEOUT_SECS = 1.0
# How Django's Redis cache stores a value (a pickle, an int as its digits).
_SERIALIZER = RedisSerializer()
# Tokens kept per process; past this the oldest is dropped.
MAX_ENTRIES = 10_000
# Keys whose digest is kept: a REST request of a kept token hashed its key three times
# (the address budget, the fast path, the check), ~0.6 us each. The last keys asked
# about stay in the process's memory with their digests (as the requests that sent
# them did); made-up ones only turn the oldest out.
DIGESTS_KEPT = 4096
# Only a key as long as one this server issues (DRF's 40 characters, a service token's
# 47) is kept with its digest: a longer one is never valid, and made-up keys of 60 KB
# (under the 64 KiB head bound) made a node hold 4096 of them, ~250 MB.
MAX_KEPT_KEY_CHARS = 64

# A generation that cannot match any value read from the shared cache.
_UNKNOWN = object()


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    generation: Any
    expires_at: float


_entries: dict[str, _Entry] = {}
_kept_digest = functools.lru_cache(maxsize=DIGESTS_KEPT)(hash_service_key)


def _digest(key: str) -> str:
    return _kept_digest(key) if len(key) <= MAX_KEPT_KEY_CHARS else hash_service_key(key)


def token_principal(key: str, address: str | None) -> Principal | None:
    """The principal of a user or service token key; None when it is not valid, which
    counts as a failure of ``address``. Raises ``PushError(RATE_LIMITED)`` when
    ``address`` failed too often this minute, without a look at the key."""
    generation = _read_generation_and_check(address)
    digest = _digest(key)
    entry = _entries.get(digest)
    if entry is not None and entry.generation == generation and time.monotonic() < entry.expires_at:
        return entry.principal
    principal = authenticate_key(key)
    if principal is None:
        _entries.pop(digest, None)
        auth_failure_record(address)
        return None
    if generation is not _UNKNOWN:
        _keep(digest, principal, generation)
    return principal


async def kept_token_principal(key: str, address: str | None) -> Principal | None:
    """``token_principal`` on the event loop, for a key this process kept: one async
    round trip for the generation and ``address``'s failures, no thread and no look-up.

    None whenever the usual way must decide: the key not kept (or expired, or kept
    under another generation), ``address`` at its failure budget (refused there),
    no shared Redis cache, or Redis not answering."""
    digest = _digest(key)
    entry = _entries.get(digest)
    if entry is None or time.monotonic() >= entry.expires_at or not _shared_cache_is_redis():
        return None
    limit = auth_failures_limit(address)
    generation_key = _cache_key(GENERATION_KEY)
    failures_key = _failures_cache_key(address) if limit else None
    keys = [generation_key] if failures_key is None else [generation_key, failures_key]
    try:
        values = await _shared_reads.get().read(keys)
    except (RedisError, OSError, RuntimeError):
        return None
    if failures_key is not None:
        failures = values[failures_key]
        if failures is not None and int(_SERIALIZER.loads(failures) or 0) >= limit:
            return None
    if entry.generation != _generation(values[generation_key]):
        return None
    _refresh_if_ending(key, digest, entry)
    return entry.principal


# A kept principal used in the last fifth of its time (``PUSH_REVOCATION_CHECK_SECS``)
# is looked up again in the background, while requests go on using it until it ends.
# Without that, every request of the token went the usual way (Django, DRF, a
# database thread, a few ms more each) from the moment it ended until one of them had
# kept it again: with 16 keep-alive clients of one service token, about 12 requests
# every 5 s (measured over 12 s on one node: 41 requests went through Django, 16 of
# them the clients' first; with this, those 16 alone).
REFRESH_AHEAD_FRACTION = 0.2
# Digest -> when a look-up of its key may start again (infinity while one runs): one
# at a time per key, and after a failed one none until the entry has ended (with the
# database away, every request of the token started one, and logged its failure).
_no_refresh_until: dict[str, float] = {}


def _refresh_if_ending(key: str, digest: str, entry: _Entry) -> None:
    now = time.monotonic()
    ahead = push_settings.REVOCATION_CHECK_SECS * REFRESH_AHEAD_FRACTION
    if entry.expires_at - now > ahead:
        return
    if now < _no_refresh_until.get(digest, 0.0):
        return
    if len(_no_refresh_until) >= MAX_ENTRIES:
        _no_refresh_until.clear()  # keys no longer kept among them: each has one look-up
    _no_refresh_until[digest] = math.inf
    spawn(_refresh(key, digest, entry), name="push-principal-refresh")


async def _refresh(key: str, digest: str, entry: _Entry) -> None:
    """Look ``key`` up again and keep what it is now, under ``entry``'s generation, which
    the check that started this read just before (as ``token_principal`` reads it
    before its look-up: a credential changed meanwhile set a new one, which the next
    check sees). A key no longer valid is dropped: its next request goes the usual
    way, which refuses it and counts the failure."""
    try:
        principal = await _authenticate_key(key)
    except Exception as exc:  # the database away: the entry ends, and the usual way decides
        _no_refresh_until[digest] = entry.expires_at
        logger.warning("looking a kept token up again failed: %s", exc)
        return
    except BaseException:  # cancelled: the loop is closing
        _no_refresh_until.pop(digest, None)
        raise
    _no_refresh_until.pop(digest, None)
    if principal is None:
        _entries.pop(digest, None)
    else:
        _keep(digest, principal, entry.generation)


_authenticate_key = db_call(authenticate_key)


# The generation as last read and its value: it changes only with a credential, and
# unpickling it (after Django's serializer tried it as an int) was ~1.5 us a request.
_generation_read: tuple[bytes, Any] | None = None


def _generation(raw: bytes | None) -> Any:
    """The generation Redis holds as ``raw`` (None: none was set yet)."""
    global _generation_read
    if raw is None:
        return None
    last = _generation_read
    if last is not None and last[0] == raw:
        return last[1]
    generation = _SERIALIZER.loads(raw)
    _generation_read = (raw, generation)
    return generation


# Asked for on every kept-token request, and the same few times over: whether the
# shared cache is Redis, and the names of its keys there (Django checks each name
# character by character for memcached; with the cache's look-up that was a fifth of
# the check's CPU). Bounded: addresses come from clients. Forgotten when the settings
# change the caches (tests).
_KEPT_LOOKUPS = 4096


@functools.lru_cache(maxsize=1)
def _shared_cache_is_redis() -> bool:
    # ``cache`` is a proxy of ``caches["default"]``, never a RedisCache itself.
    return isinstance(caches["default"], RedisCache)


@functools.lru_cache(maxsize=_KEPT_LOOKUPS)
def _cache_key(name: str) -> str:
    return caches["default"].make_and_validate_key(name)


@functools.lru_cache(maxsize=_KEPT_LOOKUPS)
def _failures_cache_key(address: str | None) -> str:
    return _cache_key(auth_failure_key(address))


def _caches_changed(setting: str, **kwargs: Any) -> None:
    if setting == "CACHES":
        _shared_cache_is_redis.cache_clear()
        _cache_key.cache_clear()
        _failures_cache_key.cache_clear()


class SharedReads:
    """The kept-token checks of one event loop, read together: every request waiting
    for a read joins the next one, which fetches the keys of all of them in one
    ``MGET`` once the read before it ended.

    A check must see what Redis holds after its request arrived (a revocation made
    before it is seen), so a request never joins a read already sent; it joins one
    not yet sent. The keys are taken in the step that sends them, and that step waits
    first for a loop pass, and for another while checks keep joining (at most
    ``KEPT_CHECK_GATHER_PASSES``; not after a read of a single check): clients
    answered together send their next requests together, and their checks go in one
    read, then their publishes in one write batch. Measured on one node (REST single
    publish, 16 keep-alive clients), a round trip per request cost the node's loop
    about a tenth of its CPU per request, and Redis more; sent as soon as the read
    before ended, a read had 4-5 checks, and with the passes 14-16 (of 16): the
    node's CPU per request fell by a third."""

    def __init__(self, mget: Callable[[list[str]], Awaitable[list[Any]]]) -> None:
        self._mget = mget  # one at a time: a read starts when the one before ended
        # The keys of the checks waiting for the next read, and a future for each.
        self._waiting: tuple[set[str], list[asyncio.Future[dict[str, Any]]]] | None = None
        self._under_way: asyncio.Task[None] | None = None
        # Made on the loop it serves (one per loop: ``_shared_reads``); asking asyncio
        # for the running loop costs a system call (common.background.loop_runs_here).
        self._loop = asyncio.get_running_loop()
        self._checks_last_read = 0

    async def read(self, keys: list[str]) -> dict[str, Any]:
        """The values of ``keys`` (None for a missing one), read after this call."""
        if self._waiting is None:
            self._waiting = (set(), [])
        wanted, waiters = self._waiting
        wanted.update(keys)
        # A future of its own: a request that leaves cancels it, not the read of the
        # others (asyncio.shield did that for one shared future at ~1.5 us a check,
        # and a loop pass more before each check went on).
        values: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        waiters.append(values)
        if self._under_way is None:
            self._under_way = self._loop.create_task(self._read())
        return await values

    async def _read(self) -> None:
        waiters: list[asyncio.Future[dict[str, Any]]] = []
        try:
            await self._gathered()
            # Taken here, in the step that sends them: every check until now goes with it.
            assert self._waiting is not None
            wanted, waiters = self._waiting
            self._waiting = None
            self._checks_last_read = len(waiters)
            keys = list(wanted)
            fetched = await self._mget(keys)
        except Exception as exc:
            for values in waiters:
                if not values.done():  # not left
                    values.set_exception(exc)
                    values.exception()  # retrieved here: its request may leave first
        else:
            read = dict(zip(keys, fetched, strict=True))
            for values in waiters:
                if not values.done():
                    values.set_result(read)
        finally:
            for values in waiters:
                if not values.done():  # the read was cancelled: the loop is closing
                    values.cancel()
            self._under_way = None
            if self._waiting is not None:
                self._under_way = self._loop.create_task(self._read())

    async def _gathered(self) -> None:
        """After a loop pass, and more while checks keep joining the waiting read; at
        once after a read of one check (requests one at a time: nobody to wait for)."""
        if self._checks_last_read <= 1:
            return
        for _ in range(KEPT_CHECK_GATHER_PASSES):
            assert self._waiting is not None
            joined = len(self._waiting[1])
            await asyncio.sleep(0)
            if len(self._waiting[1]) == joined:
                return


def _shared_reads_of_loop() -> SharedReads:
    # No socket timeout on this client: with one, redis-py sends each command from a
    # task of its own (asyncio.wait_for), a loop pass and a task more per read, and
    # arms a timer for the reply. One deadline per read instead, for both.
    client = loop_client(
        "auth",
        max_connections=KEPT_CHECK_CONNECTIONS,
        socket_connect_timeout=KEPT_CHECK_TIMEOUT_SECS,
    )
    held = HeldConnection(lambda: client.connection_pool)

    async def mget(keys: list[str]) -> list[Any]:
        # A read given up here is cancelled: its connection is closed (HeldConnection).
        async with asyncio.timeout(KEPT_CHECK_TIMEOUT_SECS):
            return list(await held.execute("MGET", *keys))

    return SharedReads(mget)


_shared_reads = LoopLocal(_shared_reads_of_loop)


def is_kept_key(key: str) -> bool:
    """Whether this process keeps a principal for ``key`` now (a user's or a service
    token's), before ``kept_token_principal`` asks Redis whether it still may use it:
    a dictionary look-up, so a made-up key costs nothing more."""
    entry = _entries.get(_digest(key))
    return entry is not None and time.monotonic() < entry.expires_at


def is_known_service_key(key: str) -> bool:
    """Whether ``key`` is a service token this process verified within the last
    ``PUSH_REVOCATION_CHECK_SECS``: no look-up and no round trip, so the REST budget of
    an address can leave back-ends alone before the request is authenticated. A key
    seen for the first time (or revoked meanwhile) is not known; authentication still
    decides about it as usual."""
    if not key.startswith(SERVICE_TOKEN_PREFIX):
        return False
    entry = _entries.get(_digest(key))
    return (
        entry is not None
        and entry.principal.kind == "service"
        and time.monotonic() < entry.expires_at
    )


def _read_generation_and_check(address: str | None) -> Any:
    """The current generation (``_UNKNOWN`` when the shared cache cannot say), after
    refusing an address past its failures, in one round trip."""
    limit = auth_failures_limit(address)
    keys = [GENERATION_KEY] + ([auth_failure_key(address)] if limit else [])
    try:
        values = cache.get_many(keys)
    except RedisError as exc:
        logger.warning("could not read the principal cache generation: %s", exc)
        return _UNKNOWN
    if limit and int(values.get(keys[-1]) or 0) >= limit:
        raise too_many_failures()
    return values.get(GENERATION_KEY)


def _keep(digest: str, principal: Principal, generation: Any) -> None:
    if len(_entries) >= MAX_ENTRIES:
        _entries.pop(next(iter(_entries)), None)
    ttl = push_settings.REVOCATION_CHECK_SECS
    _entries[digest] = _Entry(principal, generation, time.monotonic() + ttl)


def principals_changed() -> None:
    """Make every node stop using the principals it kept (a credential or grant
    changed): now, and again when the transaction commits, since a request between
    the two may have kept what the database still showed."""
    _new_generation()
    transaction.on_commit(_new_generation)


def _new_generation() -> None:
    _entries.clear()
    try:
        cache.set(GENERATION_KEY, uuid.uuid4().hex, timeout=None)
    except RedisError as exc:
        # Other nodes drop what they kept within PUSH_REVOCATION_CHECK_SECS.
        logger.warning("could not publish a new principal cache generation: %s", exc)


def _changed(sender: Any, **kwargs: Any) -> None:
    update_fields = kwargs.get("update_fields")
    if update_fields is not None and set(update_fields) <= _NOT_IN_A_PRINCIPAL:
        return
    principals_changed()


def _saved(sender: Any, created: bool = False, **kwargs: Any) -> None:
    # A new token or user changes no principal that could have been kept.
    if not created or sender is ChannelGrant:
        _changed(sender, **kwargs)


# Fields saved on their own that no principal holds (a sign-in, a service token's use).
_NOT_IN_A_PRINCIPAL = {"last_login", "last_used_at"}


def connect_signals() -> None:
    """Called from ``AccountsConfig.ready``."""
    from rest_framework.authtoken.models import Token

    for model in (Token, ServiceToken, ChannelGrant, get_user_model(), Group):
        post_save.connect(_saved, sender=model, dispatch_uid=f"principal-cache-{model}")
        post_delete.connect(_changed, sender=model, dispatch_uid=f"principal-cache-del-{model}")
    m2m_changed.connect(
        _changed, sender=get_user_model().groups.through, dispatch_uid="principal-cache-groups"
    )
    setting_changed.connect(_caches_changed, dispatch_uid="principal-cache-caches")
