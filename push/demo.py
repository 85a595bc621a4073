"""The live demo page at ``/``.

The page loads the JavaScript client and its own script and style from ``/static/push/``,
which every node serves through WhiteNoise (under daphne and uvicorn too, where Django's
staticfiles would serve nothing); ``collectstatic`` picks the same files up for a CDN.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path
from django.views.decorators.http import require_safe

DEFAULT_CHANNEL = "demo"


@require_safe
def demo_page(request: HttpRequest) -> HttpResponse:
    user = request.user
    context = {
        "channel": request.GET.get("channel", DEFAULT_CHANNEL),
        "username": user.get_username() if user.is_authenticated else "",
    }
    return render(request, "push/demo.html", context)


urlpatterns = [
    path("", demo_page, name="push-demo"),
]
