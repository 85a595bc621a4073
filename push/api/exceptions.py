"""The one place a REST error becomes a reply: the contract's error envelope.

``PushError`` keeps its code and status; DRF's own exceptions are mapped onto the
closest contract code, keeping DRF's per-field messages under ``errors``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.defaults import page_not_found
from redis.exceptions import RedisError
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler

from common.errors import ErrorCode, PushError

logger = logging.getLogger(__name__)


def _first_field_message(detail: Any, prefix: str = "") -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            return _first_field_message(value, f"{prefix}{name}: " if name else prefix)
    if isinstance(detail, list) and detail:
        return _first_field_message(detail[0], prefix)
    return f"{prefix}{detail}"


def _body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def _envelope(code: str, message: str, status: int, **extra: Any) -> Response:
    return Response(_body(code, message, **extra), status=status)


def error_envelope(exc: PushError | DatabaseError | RedisError) -> tuple[int, dict[str, Any]]:
    """The status and envelope of a refusal of ours or a dependency that is down."""
    if isinstance(exc, PushError):
        extra: dict[str, Any] = {"field": exc.field} if exc.field else {}
        if exc.index is not None:
            extra["index"] = exc.index
        return exc.http_status, _body(exc.code.value, exc.message, **extra)
    if isinstance(exc, DatabaseError):
        logger.warning("database error answering a REST request: %s", exc)
        return 503, _body(ErrorCode.UNAVAILABLE.value, "database unavailable; retry later")
    # The REST throttle's counters live in Redis: while it restarts, the request is
    # refused as the contract says for a dependency that is down, not as a crash.
    logger.warning("Redis error answering a REST request: %s", exc)
    return 503, _body(ErrorCode.UNAVAILABLE.value, "Redis unavailable; retry later")


def _suspicious_request(exc: SuspiciousOperation) -> Response:
    """Django's refusals of a request it will not read, such as more query parameters
    than ``DATA_UPLOAD_MAX_NUMBER_FIELDS``. DRF leaves them uncaught: its content
    negotiation reads the query string first, so the request was answered 500 (with
    ``DEBUG`` on, after seconds of CPU rendering the error page)."""
    if isinstance(exc, RequestDataTooBig):
        return _envelope(ErrorCode.MESSAGE_TOO_LARGE.value, str(exc), 413)
    return _envelope(ErrorCode.INVALID_MESSAGE.value, str(exc), 400)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, (PushError, DatabaseError, RedisError)):
        status, body = error_envelope(exc)
        return Response(body, status=status)
    if isinstance(exc, exceptions.ParseError):
        return _envelope(ErrorCode.INVALID_JSON.value, str(exc.detail), 400)
    if isinstance(exc, SuspiciousOperation):
        return _suspicious_request(exc)
    if isinstance(exc, exceptions.ValidationError):
        return _envelope(
            ErrorCode.INVALID_MESSAGE.value,
            _first_field_message(exc.detail),
            400,
            errors=exc.detail,
        )
    # Django's own 404 and 403 (an unknown ?format= raises Http404 in DRF's content
    # negotiation) become DRF's, as DRF's handler makes them, so they get the envelope.
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    response = exception_handler(exc, context)
    if response is not None and isinstance(exc, exceptions.APIException):
        code = {
            403: ErrorCode.FORBIDDEN.value,
            404: ErrorCode.NOT_FOUND.value,
            429: ErrorCode.RATE_LIMITED.value,
        }.get(response.status_code, str(exc.default_code).upper())
        response.data = {"type": "error", "code": code, "message": str(exc.detail)}
    return response


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 404 for a path no view serves: the error envelope under ``/api/``."""
    if request.path.startswith("/api/"):
        body = _body(ErrorCode.NOT_FOUND.value, f"no API endpoint at {request.path}")
        return JsonResponse(body, status=404)
    return page_not_found(request, exception)
