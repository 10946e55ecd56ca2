"""Answering well when something is wrong: oversized requests get 413 before their body is
read, an unreachable database or Valkey gets a fast 503 (never a 500 or a hang), and
``/health/`` tells load balancers and the fault tests whether both are reachable.
"""

from __future__ import annotations

import html
import logging
import sys

import redis.exceptions
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from django.views.defaults import server_error as default_server_error
from kombu.exceptions import OperationalError as BrokerError

from search.locking import conflict_kind

log = logging.getLogger(__name__)

# Errors that mean "a service is down or restarting", not "this request is wrong".
UNAVAILABLE = (
    OperationalError,
    InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    BrokerError,
)
RETRY_AFTER_SECONDS = 5


def _sqlstate(exc: BaseException) -> str:
    cause = exc
    while cause is not None:
        if getattr(cause, "sqlstate", None):
            return cause.sqlstate
        cause = cause.__cause__
    return ""


def unavailable_status(exc: BaseException) -> tuple[int, str, int]:
    """(status, reason, seconds to wait) for a request that failed on a service: the true
    reason, so "unavailable" is said only when the service did not answer."""
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return 503, "The task queue is unavailable; try again in a few seconds.", RETRY_AFTER_SECONDS
    kind = conflict_kind(exc)
    if kind is not None:
        return (409, f"Another change to the same item was being made at the same moment ({kind}); nothing was "
                "saved. Try again.", 1)
    state = _sqlstate(exc)
    if state == "55P03":
        return 503, "The database is busy: a lock could not be taken in time; try again in a few seconds.", 2
    if state == "57014":
        return 503, "The database took too long to answer; try again in a few seconds.", RETRY_AFTER_SECONDS
    if state.startswith("53"):
        return 503, f"The database is out of resources (SQLSTATE {state}); try again later.", RETRY_AFTER_SECONDS
    return 503, "The database is unavailable; try again in a few seconds.", RETRY_AFTER_SECONDS


def wants_json(request) -> bool:
    return request.path.startswith("/api/") or "application/json" in request.META.get("HTTP_ACCEPT", "")


def error_response(request, status: int, message: str, headers: dict | None = None) -> HttpResponse:
    """A JSON body {"detail": ...} for API clients, a small page for browsers; touches no service."""
    if wants_json(request):
        response = JsonResponse({"detail": message}, status=status)
    else:
        page = (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Visual search</title></head>"
            f"<body><h1>Visual search</h1><p role='alert'>{html.escape(message)}</p>"
            "<p><a href='/'>Back to search</a></p></body></html>"
        )
        response = HttpResponse(page, status=status, content_type="text/html; charset=utf-8")
    response["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def log_unavailable(request, exc: BaseException, status: int) -> None:
    state = _sqlstate(exc)
    log.warning("%s %s: %s, %s%s: %s", request.method, request.path, status, type(exc).__name__,
                f" (SQLSTATE {state})" if state else "", " ".join(str(exc).split())[:300])


def unavailable_response(request, exc: BaseException) -> HttpResponse:
    status, reason, wait = unavailable_status(exc)
    log_unavailable(request, exc, status)
    return error_response(request, status, reason, {"Retry-After": str(wait)})


class ServiceUnavailableMiddleware:
    """A view that fails because PostgreSQL or Valkey is down answers 503 with Retry-After."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, UNAVAILABLE):
            return unavailable_response(request, exception)
        return None


class RequestSizeLimitMiddleware:
    """Refuses a request whose declared body is over the limit before anything reads it.

    Multipart bodies (uploads) may be up to UPLOAD_MAX_REQUEST_BYTES in all, each file
    being capped again by the upload handler; other bodies up to DATA_UPLOAD_MAX_MEMORY_SIZE.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        declared = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(declared)
        except ValueError:
            return error_response(request, 400, "The Content-Length header is not a number.")
        multipart = request.META.get("CONTENT_TYPE", "").lower().startswith("multipart/")
        limit = settings.UPLOAD_MAX_REQUEST_BYTES if multipart else settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and length > limit:
            return error_response(
                request, 413, f"The request body is {length:,} bytes; the limit is {limit:,} bytes."
            )
        return self.get_response(request)


def bad_request(request, exception=None, *args, **kwargs):
    """handler400: refused requests (too many files or fields, a body over the limit) say why."""
    from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent

    if isinstance(exception, (TooManyFilesSent, TooManyFieldsSent, RequestDataTooBig)):
        return error_response(request, 400, f"The request was refused: {exception}")
    return error_response(request, 400, "The request was refused: it is malformed or not allowed.")


def server_error(request, *args, **kwargs):
    """handler500: a service outage anywhere (middleware included) is a 503; API errors are JSON."""
    exc = sys.exc_info()[1]
    if exc is not None and isinstance(exc, UNAVAILABLE):
        return unavailable_response(request, exc)
    if wants_json(request):
        return error_response(request, 500, "Internal server error; it has been logged.")
    return default_server_error(request, *args, **kwargs)


@never_cache
@require_safe
def health(request):
    """200 when PostgreSQL and Valkey answer, else 503 naming what is down."""
    from django.core.cache import cache

    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # any failure here means "not healthy", never a 500
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        cache.set("health-probe", 1, timeout=10)
        checks["cache"] = "ok"
    except Exception as exc:
        checks["cache"] = f"unavailable: {type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    response = JsonResponse({"status": "ok" if healthy else "unavailable", **checks}, status=200 if healthy else 503)
    if not healthy:
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
