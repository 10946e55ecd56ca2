"""Signed cursors for the next page of a search's results.

A cursor names the last hit a page showed (its place in the order: score descending then id, or
the date or name the results are sorted by, then id) and how many hits came before, for one
search (a digest of the model, the query, its threshold, filters and sort). The next page is the
hits that come after that one, so a picture added meanwhile never shows twice and pages never
overlap. Signed with the project's secret and timed
(``SEARCH_CURSOR_MAX_AGE``): a forged, altered, stale or borrowed cursor is refused with a reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from django.conf import settings
from django.core import signing

SALT = "search.cursors"


class InvalidCursor(ValueError):
    """A cursor the caller must drop; the message says why."""


@dataclass(frozen=True)
class Cursor:
    search: str  # digest of what was searched
    seen: int  # hits on the pages before
    key: tuple  # the last hit shown: its sort key, which ascends along the pages

    def after(self, key: tuple) -> bool:
        """Whether a hit with this sort key comes after the last one shown."""
        return tuple(key) > self.key


def relevance_key(score: float, hit_id: int) -> tuple:
    """The sort key of a hit in relevance order: score descending, then id ascending."""
    return (-float(score), int(hit_id))


def search_digest(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def encode(cursor: Cursor) -> str:
    return signing.dumps([cursor.search, cursor.seen, list(cursor.key)], salt=SALT, compress=True)


def decode(token: str, search: str) -> Cursor:
    try:
        digest, seen, key = signing.loads(token, salt=SALT, max_age=settings.SEARCH_CURSOR_MAX_AGE)
    except signing.SignatureExpired:
        raise InvalidCursor("The cursor has expired; run the search again.") from None
    except (signing.BadSignature, ValueError, TypeError):
        raise InvalidCursor("The cursor is not one this server gave, or it was altered.") from None
    if digest != search:
        raise InvalidCursor("The cursor belongs to another search (query, threshold, filters, sort or model).")
    try:
        return Cursor(digest, int(seen), tuple(key))
    except (TypeError, ValueError):
        raise InvalidCursor("The cursor is not one this server gave, or it was altered.") from None
