"""Health (the process answers) and readiness (its dependencies answer)."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, JsonResponse

from monitoring.checks import dependency_failures, log_readiness_change
from push.services.runtime import node_draining


async def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok", "server_id": settings.NODE_ID})


async def ready(request: HttpRequest) -> JsonResponse:
    if node_draining():
        # Load balancers stop sending new clients here while it shuts down.
        return _not_ready({"status": "draining", "failing": ["node draining"]})
    failures = await dependency_failures(settings.REDIS_URL)
    log_readiness_change(failures)
    if failures:
        return _not_ready({"status": "unavailable", "failing": failures})
    return JsonResponse({"status": "ready", "server_id": settings.NODE_ID})


def _not_ready(body: dict[str, object]) -> JsonResponse:
    response = JsonResponse(body, status=503)
    # django.request logs every 5xx at ERROR unless the response says it was logged
    # (django.utils.log.log_response): a probe every second through an outage filled
    # the log with one ERROR each. The node logs the change itself, once (a drain at its
    # start, a dependency when it goes down and when it is back).
    response._has_been_logged = True  # type: ignore[attr-defined]  # read by log_response
    return response
