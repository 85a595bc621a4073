"""The principal kept per token key (``accounts.principal_cache``): used while nothing
changed, dropped at once on a change the signals see, within the revocation
interval on one they do not, never kept for an invalid key or without the cache."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.contrib.auth.models import Group, User
from django.core.cache import cache
from django.db import OperationalError, connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError
from rest_framework.authtoken.models import Token

from accounts import principal_cache
from accounts.auth_failures import auth_failure_key
from accounts.models import ChannelGrant, ServiceToken
from accounts.principal_cache import (
    GENERATION_KEY,
    SharedReads,
    kept_token_principal,
    token_principal,
)
from common.db import db_call
from push.tests.redis_proxy import Proxy, proxied_settings

pytestmark = pytest.mark.django_db

ADDRESS = "192.0.2.7"


def _queries(key: str) -> tuple[Any, int]:
    with CaptureQueriesContext(connection) as captured:
        principal = token_principal(key, ADDRESS)
    return principal, len(captured)


def _service(pattern: str = "ticker:*") -> tuple[ServiceToken, str]:
    token, key = ServiceToken.issue("feed")
    ChannelGrant.objects.create(service_token=token, pattern=pattern, can_publish=True)
    return token, key


def test_a_kept_principal_costs_no_query() -> None:
    _token, key = _service()
    first, looked_up = _queries(key)
    again, kept = _queries(key)
    assert looked_up > 0 and kept == 0
    assert again == first and [g.pattern for g in again.grants] == ["ticker:*"]


def test_a_service_token_with_many_grants_is_read_in_a_few_queries() -> None:
    token, key = _service()
    for index in range(5):
        ChannelGrant.objects.create(service_token=token, pattern=f"room-{index}")
    _principal, count = _queries(key)
    assert count == 4  # no such user token, the service token, last_used_at, its grants


def test_a_revoked_service_token_and_a_removed_grant_are_seen_at_once() -> None:
    token, key = _service()
    token_principal(key, ADDRESS)
    ChannelGrant.objects.filter(service_token=token).delete()
    assert token_principal(key, ADDRESS).grants == ()
    token.revoke()
    assert token_principal(key, ADDRESS) is None


def test_a_user_s_changes_are_seen_at_once() -> None:
    user = User.objects.create_user("ann", password="x")
    key = Token.objects.create(user=user).key
    assert token_principal(key, ADDRESS).grants == ()
    group = Group.objects.create(name="editors")
    ChannelGrant.objects.create(group=group, pattern="news", can_publish=True)
    user.groups.add(group)
    assert [g.pattern for g in token_principal(key, ADDRESS).grants] == ["news"]
    user.is_active = False
    user.save()
    assert token_principal(key, ADDRESS) is None


def test_a_sign_in_does_not_drop_what_is_kept() -> None:
    user = User.objects.create_user("bob", password="x")
    key = Token.objects.create(user=user).key
    token_principal(key, ADDRESS)
    user.last_login = timezone.now()
    user.save(update_fields=["last_login"])
    assert _queries(key)[1] == 0


def test_a_new_token_or_user_does_not_drop_what_is_kept() -> None:
    _token, key = _service()
    token_principal(key, ADDRESS)
    carol = User.objects.create_user("carol", password="x")
    Token.objects.create(user=carol)
    ServiceToken.issue("another-feed")
    assert _queries(key)[1] == 0


def test_a_change_on_another_node_is_seen_through_the_shared_generation() -> None:
    _token, key = _service()
    token_principal(key, ADDRESS)
    cache.set(GENERATION_KEY, "another node changed a grant", timeout=None)
    assert _queries(key)[1] > 0


@override_settings(PUSH={"REVOCATION_CHECK_SECS": 0.2})
def test_a_change_the_signals_miss_is_seen_within_the_revocation_interval() -> None:
    token, key = _service()
    token_principal(key, ADDRESS)
    ServiceToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())  # no signal
    assert token_principal(key, ADDRESS) is not None
    time.sleep(0.3)
    assert token_principal(key, ADDRESS) is None


def test_an_invalid_key_is_never_kept_and_counts_as_a_failure() -> None:
    cache.delete(auth_failure_key(ADDRESS))
    assert token_principal("no-such-key", ADDRESS) is None
    assert _queries("no-such-key") == (None, 2)
    assert cache.get(auth_failure_key(ADDRESS)) == 2


def test_nothing_is_kept_while_the_cache_cannot_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    _token, key = _service()

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise RedisError("down")

    monkeypatch.setattr(principal_cache.cache, "get_many", unreachable)
    assert token_principal(key, ADDRESS) is not None
    assert _queries(key)[1] > 0


@pytest.mark.django_db(transaction=True)
async def test_a_kept_principal_is_checked_on_the_event_loop_as_on_a_thread() -> None:
    """``kept_token_principal`` answers only what ``token_principal`` would answer from
    what it kept, and leaves every other case to it (None)."""
    _token, key = await sync_to_async(_service)()
    assert await kept_token_principal(key, ADDRESS) is None  # not kept yet
    kept = await sync_to_async(token_principal)(key, ADDRESS)
    assert await kept_token_principal(key, ADDRESS) == kept
    # Another node changed a credential: a new generation in the shared cache.
    await sync_to_async(cache.set)(GENERATION_KEY, "changed-elsewhere", timeout=None)
    assert await kept_token_principal(key, ADDRESS) is None
    assert await sync_to_async(token_principal)(key, ADDRESS) == kept  # kept again
    assert await kept_token_principal(key, ADDRESS) == kept
    # An address at its failure budget is refused by the usual way, not served here.
    with override_settings(PUSH={"AUTH_FAILURES_PER_MIN": 3}):
        await sync_to_async(cache.set)(auth_failure_key(ADDRESS), 3, timeout=60)
        assert await kept_token_principal(key, ADDRESS) is None
        assert await kept_token_principal(key, "192.0.2.8") == kept


@pytest.mark.django_db(transaction=True)
async def test_a_redis_that_stops_answering_leaves_the_check_to_the_usual_way() -> None:
    _token, key = await sync_to_async(_service)()
    kept = await sync_to_async(token_principal)(key, ADDRESS)
    # Through a proxy of its own: a CLIENT PAUSE would stop the Redis server that the
    # other test process shares for 2.5 s, and fail its tests.
    async with proxied_settings() as proxy:
        assert await kept_token_principal(key, ADDRESS) == kept
        proxy.frozen = True  # Redis stopped answering
        started = time.monotonic()
        assert await kept_token_principal(key, ADDRESS) is None
        assert time.monotonic() - started < 2.0  # given up after its timeout, not held


@pytest.mark.django_db(transaction=True)
async def test_a_redis_that_stops_answering_does_not_hold_a_token_look_up() -> None:
    """The look-up's generation and failure count (the shared cache) from a Redis that
    stopped answering: the request, and the database thread it holds, waited for ever."""
    _token, key = await sync_to_async(_service)()
    target = parse_url(str(django_settings.REDIS_URL))
    proxy = Proxy((target.get("host", "127.0.0.1"), target.get("port", 6379)))
    port = await proxy.start()
    location = f"redis://127.0.0.1:{port}/{target.get('db', 0)}"
    try:
        with override_settings(
            CACHES={"default": {**django_settings.CACHES["default"], "LOCATION": location}}
        ):
            proxy.frozen = True
            look_up = asyncio.ensure_future(db_call(token_principal)(key, ADDRESS))
            done, _ = await asyncio.wait([look_up], timeout=15)
            proxy.frozen = False  # lets a held look-up end, so the test does not hang
            principal = await look_up
        assert done, "the look-up waited for Redis"
        assert principal is not None and principal.kind == "service"
    finally:
        await proxy.stop()


async def _kept_for(key: str, secs: float) -> list[tuple[float, Any]]:
    """What ``kept_token_principal`` answers for ``key``, asked every 20 ms for ``secs``,
    with when (seconds after the first)."""
    answers = []
    started = time.monotonic()
    while (now := time.monotonic()) < started + secs:
        answers.append((now - started, await kept_token_principal(key, ADDRESS)))
        await asyncio.sleep(0.02)
    return answers


@pytest.mark.django_db(transaction=True)
@override_settings(PUSH={"REVOCATION_CHECK_SECS": 1.0})  # 0.2 s for the look-up again
async def test_a_principal_in_use_is_looked_up_again_before_it_ends() -> None:
    """A token in use goes on being served from what is kept, interval after interval:
    when it ended, every request of the token went the usual way (Django, a database
    thread) until one of them had kept it again."""
    _token, key = await sync_to_async(_service)()
    kept = await sync_to_async(token_principal)(key, ADDRESS)
    answers = await _kept_for(key, 2.5)
    assert [at for at, answer in answers if answer != kept] == []


@pytest.mark.django_db(transaction=True)
@override_settings(PUSH={"REVOCATION_CHECK_SECS": 0.5})
async def test_a_revocation_the_signals_miss_still_ends_a_principal_in_use_in_time() -> None:
    """Looked up again ahead of its end, a key revoked behind the signals' back (an
    UPDATE by hand) is still refused within the revocation interval, and from then on."""
    token, key = await sync_to_async(_service)()
    await sync_to_async(token_principal)(key, ADDRESS)
    await sync_to_async(ServiceToken.objects.filter(pk=token.pk).update)(
        revoked_at=timezone.now()
    )  # no signal: no new generation
    answers = await _kept_for(key, 1.0)
    refused = [at for at, answer in answers if answer is None]
    assert refused, "the revoked key was still served"
    # Within the interval (the key was kept just before this began; a check may come
    # late on a busy machine), and from then on.
    assert refused[0] <= 0.5 + 0.2, refused[0]
    assert [at for at, answer in answers if at > refused[0] and answer is not None] == []
    assert await sync_to_async(token_principal)(key, ADDRESS) is None


@pytest.mark.django_db(transaction=True)
@override_settings(PUSH={"REVOCATION_CHECK_SECS": 0.5})
async def test_a_look_up_again_that_fails_is_not_tried_again_for_every_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the database away, the kept principal is served until it ends, then the
    usual way decides; its key is looked up in the background once, not once per
    request (each of which logged the failure)."""
    _token, key = await sync_to_async(_service)()
    kept = await sync_to_async(token_principal)(key, ADDRESS)
    look_ups = 0

    async def database_away(key: str) -> Any:
        nonlocal look_ups
        look_ups += 1
        raise OperationalError("the database is away")

    monkeypatch.setattr(principal_cache, "_authenticate_key", database_away)
    answers = await _kept_for(key, 1.0)
    assert look_ups == 1
    served = [at for at, answer in answers if answer == kept]
    refused = [at for at, answer in answers if answer is None]
    assert served and refused and max(served) < min(refused) <= 0.5 + 0.2


class _SlowRedis:
    """An ``MGET`` that answers only when the test lets it, from a dict the test sets."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.reads: list[list[str]] = []
        self.answer = asyncio.Event()
        self.fail: Exception | None = None

    async def mget(self, keys: list[str]) -> list[Any]:
        self.reads.append(sorted(keys))
        snapshot = dict(self.values)  # what Redis held when the read arrived
        await self.answer.wait()
        self.answer.clear()
        if self.fail is not None:
            raise self.fail
        return [snapshot.get(key) for key in keys]

    async def under_way(self, count: int) -> None:
        """Until ``count`` reads have reached Redis."""
        while len(self.reads) < count:
            await asyncio.sleep(0)


async def test_checks_that_wait_together_share_the_next_read_never_one_under_way() -> None:
    redis = _SlowRedis()
    reads = SharedReads(redis.mget)
    redis.values = {"generation": "g1"}
    first = asyncio.ensure_future(reads.read(["generation"]))
    await redis.under_way(1)
    redis.values = {"generation": "g2", "failures:a": 3}  # changed after that read began
    waiting = [
        asyncio.ensure_future(reads.read(["generation", "failures:a"])),
        asyncio.ensure_future(reads.read(["generation"])),
    ]
    left = asyncio.ensure_future(reads.read(["generation", "failures:b"]))
    await asyncio.sleep(0)
    left.cancel()  # a request that leaves does not end the read of the others
    redis.answer.set()
    assert await first == {"generation": "g1"}
    await redis.under_way(2)
    redis.answer.set()
    assert await waiting[0] == {"generation": "g2", "failures:a": 3, "failures:b": None}
    assert (await waiting[1])["generation"] == "g2"
    assert redis.reads == [["generation"], ["failures:a", "failures:b", "generation"]]


async def test_a_failed_shared_read_fails_each_of_its_checks_and_the_next_reads_again() -> None:
    redis = _SlowRedis()
    reads = SharedReads(redis.mget)
    redis.fail = RedisError("down")
    first = asyncio.ensure_future(reads.read(["generation"]))
    await redis.under_way(1)
    together = [asyncio.ensure_future(reads.read(["generation"])) for _ in range(3)]
    for count, check in enumerate([first, *together], start=1):
        await redis.under_way(min(count, 2))
        redis.answer.set()
        with pytest.raises(RedisError):
            await check
    assert len(redis.reads) == 2
    redis.fail = None
    redis.answer.set()
    assert await reads.read(["generation"]) == {"generation": None}


async def test_checks_made_before_the_read_is_sent_go_with_it() -> None:
    """The second check comes after the first made the read, before the read's task
    sent it (the same loop pass): one ``MGET`` for both, not a round trip each."""
    redis = _SlowRedis()
    reads = SharedReads(redis.mget)
    redis.values = {"generation": "g1", "failures:a": 2}
    checks = [
        asyncio.ensure_future(reads.read(["generation"])),
        asyncio.ensure_future(reads.read(["generation", "failures:a"])),
    ]
    await redis.under_way(1)
    redis.answer.set()
    for check in checks:
        assert await check == {"generation": "g1", "failures:a": 2}
    assert redis.reads == [["failures:a", "generation"]]


async def _read_of_two_checks(redis: _SlowRedis, reads: SharedReads) -> None:
    """A first read, of two checks made at once (as concurrent requests do)."""
    together = [asyncio.ensure_future(reads.read(["generation"])) for _ in range(2)]
    await redis.under_way(len(redis.reads) + 1)
    redis.answer.set()
    await asyncio.gather(*together)


async def test_a_read_waits_for_checks_that_keep_coming_a_few_passes_at_most() -> None:
    """After a read of several checks, the next waits a loop pass before it is sent,
    and more while checks keep joining it, never more than ``KEPT_CHECK_GATHER_PASSES``."""
    redis = _SlowRedis()
    reads = SharedReads(redis.mget)
    redis.values = {"generation": "g1"}
    await _read_of_two_checks(redis, reads)
    checks = []
    while len(redis.reads) < 2:  # one more check each loop pass, for as long as it waits
        checks.append(asyncio.ensure_future(reads.read(["generation"])))
        await asyncio.sleep(0)
    redis.answer.set()
    await checks[0]
    in_the_read = [check for check in checks if check.done()]
    assert len(in_the_read) == principal_cache.KEPT_CHECK_GATHER_PASSES + 1
    assert all(check.result() == {"generation": "g1"} for check in in_the_read)
    for check in checks:
        check.cancel()


async def test_after_a_read_of_one_check_the_next_is_sent_at_once() -> None:
    """Requests one at a time: nobody to wait for."""
    redis = _SlowRedis()
    reads = SharedReads(redis.mget)
    await _read_of_two_checks(redis, reads)
    first = asyncio.ensure_future(reads.read(["generation"]))
    await redis.under_way(2)
    redis.answer.set()
    await first
    reads_before = len(redis.reads)
    check = asyncio.ensure_future(reads.read(["generation"]))
    for _ in range(2):  # the check, then the read sent in its first step
        await asyncio.sleep(0)
    assert len(redis.reads) == reads_before + 1
    redis.answer.set()
    assert await check == {"generation": None}
