"""What changed in the stored vectors of one index since a sync last read them.

A sync of one model and modality reads, in a time that grows with the change and not
with the collection:

* the vectors **stored since its watermark**: embedding ids above ``ChangeCursor.embedding``,
  read as a range of a partial index (``embedding_image_by_id``, ``embedding_caption_by_id``),
  so rows of other models or of the other modality cost nothing;
* the keys **logged since** ``ChangeCursor.change`` in ``VectorChange`` (triggers log every key
  whose vector was deleted or rewritten): their current row is read again, and a key that
  has none is a removal.

Both come from one statement, one snapshot: a key removed and stored again (a caption
edited) comes out as its current row, whatever the order the two were logged in.

**Watermarks and transactions still open.** Ids are handed out as rows are inserted, but
transactions commit in any order: a row below the watermark that commits after the read
would be skipped for ever. So a sync first notes the highest ids handed out so far (the
sequences' last values), then waits until every transaction that was then writing to the
embedding table has ended (their row-exclusive locks in ``pg_locks``): every row up to
the noted ids is then committed or gone for good, and the watermark moves up to them. If
such a transaction is still open after ``INDEX_SYNC_WRITER_WAIT`` seconds (an admin
deleting thousands of assets in one go), the sync applies what it sees without moving its
watermark, and lists what it applied above it (``ChangeCursor.embedding_seen`` and
``change_seen``) so that the next sync skips it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings
from django.db import connection

from embeddings.models import Embedding, EmbeddingModel
from search.models import IndexBuild, VectorChange

DEFAULT_WRITER_WAIT = 2.0


@dataclass(frozen=True)
class ChangeCursor:
    """Where a sync is in the stored vectors: every embedding id up to ``embedding`` and every
    change id up to ``change`` has been read (and the ``*_seen`` ones above them).

    ``unsettled``: a build that read every stored vector while a writer was still open (rows
    it commits later may lie below the watermark): the next sync compares every id once.
    """

    embedding: int = 0
    change: int = 0
    embedding_seen: tuple[int, ...] = ()
    change_seen: tuple[int, ...] = ()
    unsettled: bool = False

    def as_json(self) -> dict:
        return {"embedding": self.embedding, "change": self.change, "unsettled": self.unsettled,
                "embedding_seen": list(self.embedding_seen), "change_seen": list(self.change_seen)}

    @classmethod
    def from_json(cls, data: dict | None) -> "ChangeCursor":
        data = data or {}
        return cls(int(data.get("embedding", 0)), int(data.get("change", 0)),
                   tuple(int(i) for i in data.get("embedding_seen", ())),
                   tuple(int(i) for i in data.get("change_seen", ())), bool(data.get("unsettled", False)))


@dataclass
class Changes:
    """Rows to add or replace (``keys``, ``vectors``), keys to remove, and the cursor after them."""

    keys: np.ndarray
    vectors: np.ndarray
    removed: np.ndarray
    cursor: ChangeCursor
    settled: bool = True
    read_ids: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(len(self.keys) or len(self.removed))


def _key_column(modality: str) -> str:
    field_name = "asset" if modality == IndexBuild.Modality.IMAGE else "caption"
    return Embedding._meta.get_field(field_name).column


def positions() -> tuple[int, int]:
    """The highest embedding id and change id handed out so far (0 before the first)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT COALESCE(pg_sequence_last_value(pg_get_serial_sequence(%s, 'id')::regclass), 0), "
            "COALESCE(pg_sequence_last_value(pg_get_serial_sequence(%s, 'id')::regclass), 0)",
            [Embedding._meta.db_table, VectorChange._meta.db_table])
        embedding, change = cursor.fetchone()
    return int(embedding), int(change)


_WRITERS = """
    SELECT DISTINCT virtualtransaction FROM pg_locks
    WHERE locktype = 'relation' AND mode = 'RowExclusiveLock' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND relation = %s::regclass AND pid <> pg_backend_pid()
"""


def open_writers() -> list[str]:
    """The transactions (other than this one) that are writing to the embedding table."""
    with connection.cursor() as cursor:
        cursor.execute(_WRITERS, [Embedding._meta.db_table])
        return [row[0] for row in cursor.fetchall()]


def wait_for_writers(timeout: float | None = None) -> bool:
    """Wait until the transactions writing to the embedding table now have ended; False if
    one is still open after ``timeout`` seconds (INDEX_SYNC_WRITER_WAIT)."""
    timeout = float(getattr(settings, "INDEX_SYNC_WRITER_WAIT", DEFAULT_WRITER_WAIT) if timeout is None else timeout)
    waiting = open_writers()
    deadline, pause = time.monotonic() + timeout, 0.002
    while waiting:
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
        with connection.cursor() as cursor:
            cursor.execute(_WRITERS + " AND virtualtransaction = ANY(%s)", [Embedding._meta.db_table, waiting])
            waiting = [row[0] for row in cursor.fetchall()]
    return True


def settled_position(timeout: float | None = None) -> ChangeCursor:
    """The cursor of a build that reads every vector stored now, once the open writers have
    ended (``unsettled`` if one had not)."""
    embedding, change = positions()
    return ChangeCursor(embedding, change, unsettled=not wait_for_writers(timeout))


def read_changes(model, modality: str, cursor: ChangeCursor, timeout: float | None = None) -> Changes:
    """What changed in ``model``'s ``modality`` vectors since ``cursor``."""
    top_embedding, top_change = positions()
    settled = wait_for_writers(timeout)
    key = _key_column(modality)
    with connection.cursor() as db:
        db.execute(
            f"SELECT id, {key} FROM {VectorChange._meta.db_table} "
            f"WHERE model_id = %s AND {key} IS NOT NULL AND id > %s AND id <= %s ORDER BY id",
            [model.pk, cursor.change, top_change])
        seen = set(cursor.change_seen)
        logged = [(i, k) for i, k in db.fetchall() if i not in seen]
        changed = sorted({k for _, k in logged})
        table = Embedding._meta.db_table
        model_column = Embedding._meta.get_field("model").column
        db.execute(
            f"SELECT {key}, id, vector FROM {table} WHERE {model_column} = %s AND {key} IS NOT NULL "
            f"AND id > %s AND id <= %s AND NOT (id = ANY(%s)) "
            f"UNION ALL SELECT {key}, id, vector FROM {table} WHERE {model_column} = %s AND {key} = ANY(%s)",
            [model.pk, cursor.embedding, top_embedding, list(cursor.embedding_seen), model.pk, changed])
        rows = db.fetchall()
    latest: dict[int, tuple[int, bytes]] = {}
    for row_key, embedding_id, blob in rows:
        latest[int(row_key)] = (int(embedding_id), blob)  # one vector per key and model
    keys = np.fromiter(latest, dtype=np.int64, count=len(latest))
    vectors = (np.stack([np.frombuffer(bytes(blob), dtype="<f4") for _, blob in latest.values()]).astype(np.float32)
               if latest else np.zeros((0, model.dimension), dtype=np.float32))
    removed = np.setdiff1d(np.asarray(changed, dtype=np.int64), keys)
    read_ids = sorted(i for i, _ in latest.values() if cursor.embedding < i <= top_embedding)
    if settled:
        following = ChangeCursor(top_embedding, top_change)
    else:  # keep the watermarks; remember what was applied above them
        following = ChangeCursor(cursor.embedding, cursor.change,
                           tuple(sorted(set(cursor.embedding_seen) | set(read_ids))),
                           tuple(sorted(set(cursor.change_seen) | {i for i, _ in logged})), cursor.unsettled)
    return Changes(keys, vectors, removed, following, settled, read_ids)


def prune_changes(model, modality: str, read_up_to: int) -> int:
    """Forget the logged changes of ``model``'s ``modality`` that every kept version has read."""
    key = _key_column(modality)
    return VectorChange.objects.filter(model_id=model.pk, **{f"{key}__isnull": False},
                                       id__lte=read_up_to).delete()[0]


def forget_deleted_models() -> int:
    """Drop the logged changes of models that no longer exist (their vectors went with them)."""
    return VectorChange.objects.exclude(model_id__in=EmbeddingModel.objects.values("pk")).delete()[0]
