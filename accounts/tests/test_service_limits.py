"""A service token's own limits: unbounded by default, bound by its own settings when
they are set, never by the client limits that bind users and anonymous clients."""

from __future__ import annotations

import pytest
from django.conf import settings as django_settings
from django.core.cache import cache
from django.core.management import call_command
from django.test import override_settings
from rest_framework.test import APIClient

from accounts.principals import ANONYMOUS, Principal
from push.transport.connection import frame_rate_limiter
from push.transport.limits import NO_LIMIT, TokenBucket

SERVICE = Principal(kind="service", id=1, name="feed")
USER = Principal(kind="user", id=1, name="alice")


def test_service_tokens_have_no_frame_rate_by_default() -> None:
    assert frame_rate_limiter(SERVICE) is NO_LIMIT
    for principal in (USER, ANONYMOUS):
        bucket = frame_rate_limiter(principal)
        assert isinstance(bucket, TokenBucket)
        assert (bucket.burst, bucket.rate_per_sec) == (100, 50.0)


@override_settings(PUSH={"SERVICE_RATE_BURST": 3, "SERVICE_RATE_PER_SEC": 1000})
def test_a_service_frame_rate_when_set() -> None:
    bucket = frame_rate_limiter(SERVICE)
    assert isinstance(bucket, TokenBucket)
    assert (bucket.burst, bucket.rate_per_sec) == (3, 1000)
    assert frame_rate_limiter(USER).rate_per_sec == 50.0  # type: ignore[union-attr]  # a user's is a TokenBucket


class _Sink:
    last = ""

    def write(self, text: str) -> None:
        if text.strip():
            _Sink.last = text.strip()

    def flush(self) -> None:
        pass


def _publish(api: APIClient, n: int) -> int:
    return api.post("/api/v1/channels/feed/messages", {"data": n}, format="json").status_code


@pytest.mark.django_db(transaction=True)
@override_settings(
    REST_FRAMEWORK={
        **django_settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"principal": "1/min", "anonymous": "1/min", "service": "3/min"},
    }
)
def test_a_service_rest_rate_when_set() -> None:
    cache.clear()
    call_command("service_token", "create", "feed", "--scope", "publish:*", stdout=_Sink())
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {_Sink.last}")
    assert [_publish(api, n) for n in range(4)] == [201, 201, 201, 429]


def test_concurrent_requests_all_count_against_the_rest_budget() -> None:
    """Requests that arrive together each count: DRF's own throttle read its history,
    appended and wrote it back, so concurrent requests overwrote each other's counts and
    a client with many connections got past its budget."""
    import threading
    import uuid

    from accounts.throttling import PrincipalRateThrottle

    budget, callers = 10, 40
    key = f"throttle_test_{uuid.uuid4().hex}"
    barrier = threading.Barrier(callers)
    allowed: list[bool] = []

    def call() -> None:
        throttle = PrincipalRateThrottle()
        throttle.num_requests, throttle.duration = budget, 60
        barrier.wait()
        allowed.append(throttle._count_in_window(key))

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert allowed.count(True) == budget
