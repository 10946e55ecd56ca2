"""The one locking order of everything that writes an asset, and retries of what still collides.

Every writer of an asset, its file, its captions or its vectors takes its locks in this
order, so two writers can wait for each other but never in a circle:

1. the **content lock** of the image bytes (a PostgreSQL advisory lock on the sha256),
   only where a file is created or removed: an upload (new asset or re-upload), the file
   removal after a delete, the reconciler's orphan-file sweep. The stored file's name is
   made from the hash, so this lock is what makes "write the file, insert the row" and
   "no row refers to it, remove the file" exclusive;
2. the **asset rows**, ``SELECT … FOR UPDATE``, several always in ascending id: delete,
   embed (its storing transaction), caption additions and edits, bulk embedding, the
   reconciler's repairs. Captions and vectors are only written while their asset row is
   held, so a delete that holds the row sees every child it must remove;
3. the **index lock** of one model and modality (``search.index_sync``), taken by index
   writers only, which hold no asset row.

Advisory locks here are transaction-scoped: they end with the transaction, also when the
process holding them dies.

A deadlock or serialization failure should not happen by construction; if one still does
(a path written later without these rules, a trigger, an operator's SQL), ``retry_on_conflict``
runs the whole transaction again, at most ``CONFLICT_ATTEMPTS`` times with jittered backoff,
and then lets the error through, which the portal answers with 409 and a reason.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import re
import time

from django.db import OperationalError, connection

from search.models import ImageAsset

log = logging.getLogger(__name__)

# First key of the two-key advisory locks on image contents; index locks use one-key locks,
# which PostgreSQL keeps in a separate key space.
CONTENT_LOCK_SPACE = 0x5348  # "SH"
CONFLICT_ATTEMPTS = 4
CONFLICT_SQLSTATES = {"40P01": "deadlock", "40001": "serialization failure"}


def content_key(digest: str) -> int:
    """A signed 32-bit key from a sha256 hex digest (a collision only serialises two uploads)."""
    if not re.fullmatch(r"[0-9a-f]{64}", digest or ""):  # a file name that is not a hash
        digest = hashlib.sha256((digest or "").encode()).hexdigest()
    value = int(digest[:8], 16)
    return value - (1 << 32) if value >= (1 << 31) else value


def lock_content(digest: str) -> None:
    """Hold the content lock of these bytes until the transaction ends."""
    if not connection.in_atomic_block:
        raise RuntimeError("lock_content needs a transaction")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [CONTENT_LOCK_SPACE, content_key(digest)])


def lock_assets(ids) -> list[int]:
    """Lock these asset rows (ascending id) until the transaction ends; the ids still there."""

    if not connection.in_atomic_block:
        raise RuntimeError("lock_assets needs a transaction")
    ids = sorted({int(i) for i in ids})
    if not ids:
        return []
    return list(ImageAsset.objects.select_for_update().filter(pk__in=ids).order_by("pk").values_list("pk", flat=True))


def conflict_kind(exc: BaseException) -> str | None:
    """``"deadlock"`` or ``"serialization failure"`` when the database refused a transaction
    because of a concurrent one; ``None`` otherwise."""
    cause = exc
    while cause is not None:
        state = getattr(cause, "sqlstate", None)
        if state in CONFLICT_SQLSTATES:
            return CONFLICT_SQLSTATES[state]
        cause = cause.__cause__
    return None


def retry_on_conflict(func):
    """Run ``func`` (which opens its own transaction) again after a deadlock or serialization
    failure; nested in a caller's transaction it cannot, and the error goes up at once."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return func(*args, **kwargs)
            except OperationalError as exc:
                kind = conflict_kind(exc)
                if kind is None or connection.in_atomic_block or attempt == CONFLICT_ATTEMPTS:
                    raise
                pause = random.uniform(0.5, 1.0) * 0.05 * 2 ** attempt
                log.warning("%s: %s (attempt %s of %s), running it again in %.0f ms: %s", func.__qualname__, kind,
                            attempt, CONFLICT_ATTEMPTS, pause * 1000, str(exc).strip().splitlines()[0])
                time.sleep(pause)
        raise AssertionError("unreachable")

    return wrapper
