"""Health (the process answers) and readiness (its dependencies answer)."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, JsonResponse

from monitoring.checks import dependency_failures
from push.services.runtime import node_draining


async def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok", "server_id": settings.NODE_ID})


async def ready(request: HttpRequest) -> JsonResponse:
    if node_draining():
        # Load balancers stop sending new clients here while it shuts down.
        return JsonResponse({"status": "draining", "failing": ["node draining"]}, status=503)
    failures = await dependency_failures(settings.REDIS_URL)
    if failures:
        return JsonResponse({"status": "unavailable", "failing": failures}, status=503)
    return JsonResponse({"status": "ready", "server_id": settings.NODE_ID})
