"""Who may do what, and how often: API permissions and throttles.

Writes (upload, delete, re-index, benchmark launch) need a staff account, by session
or token. Search is public unless ``SEARCH_REQUIRES_LOGIN`` is set. Throttle rates
live in ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` and are read on every request;
the counters are kept in the default (Redis) cache.

A throttle is a sliding-window counter: Redis counts the requests of the current
and the previous fixed window, and the previous one weighs by how much of it still
lies within the last ``duration`` seconds. Counting, setting the expiry and reading
the previous count go in one pipelined round trip, and the count is atomic, so
concurrent requests of one client are all counted. (DRF's own throttle reads and
rewrites a list of timestamps: two round trips, and a list as long as the rate.)

Imported by the DRF settings, so this module must not import views.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from rest_framework import permissions
from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle

log = logging.getLogger(__name__)


class IsStaffOrReadOnly(permissions.BasePermission):
    """Anyone may read; only active staff may write."""

    message = "This needs a staff account."

    def has_permission(self, request, view):
        if request.method in permissions.SAFE_METHODS:
            return True
        user = request.user
        return bool(user and user.is_authenticated and user.is_active and user.is_staff)


class SearchAllowed(permissions.BasePermission):
    """Everyone, or only logged-in users when SEARCH_REQUIRES_LOGIN is on."""

    message = "Log in to search."

    def has_permission(self, request, view):
        if not settings.SEARCH_REQUIRES_LOGIN:
            return True
        return bool(request.user and request.user.is_authenticated)


def search_allowed(user) -> bool:
    return not settings.SEARCH_REQUIRES_LOGIN or bool(user and user.is_authenticated)


class _SettingsRateThrottle(SimpleRateThrottle):
    """A DRF throttle that reads its rate at each request, counts in Redis with a
    sliding-window counter (module docstring) and fails open when Redis is down."""

    def __init__(self):  # the rate is read in allow_request, not once per process
        pass

    def get_rate(self):
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)
        if isinstance(rate, str) and rate.strip().lower() in {"", "none", "off"}:
            return None
        return rate

    def allow_request(self, request, view):
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        try:
            backend = caches["default"]
            if not isinstance(backend, RedisCache) or self.rate is None:
                return super().allow_request(request, view)
            key = self.get_cache_key(request, view)
            return True if key is None else self._count(backend, key)
        except Exception as exc:  # Redis unreachable: serve rather than fail every request
            log.warning("throttle %s skipped: cache unavailable (%s)", self.scope, exc)
            return True

    def _count(self, cache: RedisCache, key: str) -> bool:
        now = self.timer()
        window = int(now // self.duration)
        self.elapsed = now - window * self.duration
        current_key = cache.make_and_validate_key(f"{key}:{window}")
        previous_key = cache.make_and_validate_key(f"{key}:{window - 1}")
        client = cache._cache.get_client(current_key, write=True)
        pipe = client.pipeline(transaction=False)
        pipe.incr(current_key)
        pipe.expire(current_key, 2 * self.duration)
        pipe.get(previous_key)
        self.current, _, previous = pipe.execute()
        self.previous = int(previous or 0)
        weight = 1.0 - self.elapsed / self.duration
        if self.previous * weight + self.current <= self.num_requests:
            return True
        client.decr(current_key)  # a refused request does not count against the client
        self.current -= 1
        return False

    def wait(self):
        """Seconds until one more request would be allowed."""
        if not hasattr(self, "current"):
            return super().wait()
        room = self.num_requests - 1 - self.current  # what the previous window may still weigh
        duration, elapsed = self.duration, self.elapsed
        if room >= 0 and self.previous:
            # Within this window, the previous one's weight falls until the request fits.
            until = duration * (1 - room / self.previous) - elapsed
            if until <= duration - elapsed:
                return max(until, 0.0)
        # In the next window this window's count is the one that weighs.
        after = duration * (1 - (self.num_requests - 1) / self.current) if self.current else 0.0
        return (duration - elapsed) + max(after, 0.0)

    def _user(self, request):
        user = getattr(request, "user", None)
        return user if user is not None and user.is_authenticated else None


class SearchAnonThrottle(_SettingsRateThrottle):
    """Searches by anonymous clients, counted per IP address."""

    scope = "search_anon"

    def get_cache_key(self, request, view):
        if self._user(request) is not None:
            return None
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class SearchUserThrottle(_SettingsRateThrottle):
    """Searches by logged-in users, counted per user."""

    scope = "search_user"

    def get_cache_key(self, request, view):
        user = self._user(request)
        if user is None:
            return None
        return self.cache_format % {"scope": self.scope, "ident": user.pk}


class UploadThrottle(_SettingsRateThrottle):
    """Uploads, counted per user (per IP for the anonymous, who are refused anyway)."""

    scope = "upload"

    def get_cache_key(self, request, view):
        user = self._user(request)
        ident = user.pk if user is not None else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


SEARCH_THROTTLES = [SearchAnonThrottle, SearchUserThrottle]


def check_throttles(request, classes) -> float | None:
    """For plain Django views: None when allowed, else the seconds to wait."""
    waits = []
    for cls in classes:
        throttle = cls()
        if not throttle.allow_request(request, None):
            waits.append(throttle.wait() or 1)
    return max(waits) if waits else None
