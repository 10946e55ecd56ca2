"""Signed cursors for the next page of a search's results.

A cursor names the last hit a page showed (its score and id) and how many hits came before, for
one search (a digest of the model, the query and its threshold). The next page is the hits that
rank after that one (score descending, id ascending), so a picture added meanwhile never shows
twice and pages never overlap. Signed with the project's secret and timed
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
    score: float  # the last hit shown
    id: int

    def after(self, score: float, hit_id: int) -> bool:
        """Whether a hit ranks after the last one shown (score descending, then id ascending)."""
        return (-score, hit_id) > (-self.score, self.id)


def search_digest(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def encode(cursor: Cursor) -> str:
    return signing.dumps([cursor.search, cursor.seen, cursor.score, cursor.id], salt=SALT, compress=True)


def decode(token: str, search: str) -> Cursor:
    try:
        digest, seen, score, hit_id = signing.loads(token, salt=SALT, max_age=settings.SEARCH_CURSOR_MAX_AGE)
    except signing.SignatureExpired:
        raise InvalidCursor("The cursor has expired; run the search again.") from None
    except (signing.BadSignature, ValueError, TypeError):
        raise InvalidCursor("The cursor is not one this server gave, or it was altered.") from None
    if digest != search:
        raise InvalidCursor("The cursor belongs to another search (query, threshold or model).")
    return Cursor(digest, int(seen), float(score), int(hit_id))
