"""The live demo page at ``/`` and the JavaScript client it loads.

The client files are served by a view rather than by ``django.contrib.staticfiles``
because the latter serves nothing under daphne or uvicorn (only ``runserver`` with
DEBUG does), and the demo has to work wherever a node runs. The same files stay
under ``push/static/push/`` so ``collectstatic`` still picks them up for a CDN.
"""

from __future__ import annotations

from pathlib import Path

from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path
from django.views.decorators.http import require_safe

STATIC_DIR = Path(__file__).resolve().parent / "static" / "push"
# Only these files are served: the view never turns a URL into an arbitrary path.
CLIENT_FILES = frozenset({"pushclient.js", "msgpack.js", "demo.js", "demo.css"})
_CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
DEFAULT_CHANNEL = "demo"
# Short enough that a reloaded page picks up a new client within a minute of a deploy.
CLIENT_CACHE_SECS = 60


@require_safe
def demo_page(request: HttpRequest) -> HttpResponse:
    user = request.user
    context = {
        "channel": request.GET.get("channel", DEFAULT_CHANNEL),
        "username": user.get_username() if user.is_authenticated else "",
    }
    return render(request, "push/demo.html", context)


@require_safe
def client_file(request: HttpRequest, name: str) -> FileResponse:
    if name not in CLIENT_FILES:
        raise Http404(name)
    file_path = STATIC_DIR / name
    response = FileResponse(file_path.open("rb"), content_type=_CONTENT_TYPES[file_path.suffix])
    response["Cache-Control"] = f"public, max-age={CLIENT_CACHE_SECS}"
    return response


urlpatterns = [
    path("", demo_page, name="push-demo"),
    path("client/<str:name>", client_file, name="push-client-file"),
]
