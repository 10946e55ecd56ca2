"""The filterable attributes of every image, as numpy columns, so that a filter becomes the set
of ids a vector search may return (``vector_index.Subset``) in a millisecond or two, even over a
million rows.

A ``FacetTable`` is immutable: ``merged`` returns a new table with changed and added rows, so a
search can keep using the table it started with while another thread refreshes. Text columns
(collection, format) are stored as codes into a small vocabulary.

Plain Python and numpy: no Django.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Conditions", "FacetTable", "ORIENTATIONS"]

ORIENTATIONS = ("landscape", "portrait", "square")
NO_UPLOADER = -1


def _among(column: np.ndarray, values, vocabulary_size: int | None = None) -> np.ndarray:
    """Per row, whether ``column`` holds one of ``values``. A few values: one comparison each
    (0.2–0.4 ms per million rows); more: a lookup table over a small vocabulary (about 1 ms),
    else ``np.isin``."""
    values = list(values)
    if len(values) <= 8:
        keep = np.zeros(len(column), dtype=bool)
        for value in values:
            keep |= column == value
        return keep
    if vocabulary_size is not None:
        wanted = np.zeros(vocabulary_size + 1, dtype=bool)
        wanted[values] = True
        return np.take(wanted, column)
    return np.isin(column, np.asarray(values, dtype=column.dtype))


@dataclass(frozen=True)
class Conditions:
    """What a filter asks; every field that is set must hold (an empty tuple or None sets nothing).

    ``collections``: the image is in one of these; ``excluded``: in none of these. ``uploaders``:
    user ids. ``created_from`` ≤ created < ``created_to`` in epoch seconds. ``formats``: upper-case
    names as stored ("JPEG", "PNG"). ``min_width``/``min_height`` in pixels. ``orientation``: one of
    ``ORIENTATIONS`` ("square" is width == height)."""

    collections: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    uploaders: tuple[int, ...] = ()
    created_from: float | None = None
    created_to: float | None = None
    formats: tuple[str, ...] = ()
    min_width: int | None = None
    min_height: int | None = None
    orientation: str = ""


@dataclass(frozen=True)
class FacetTable:
    ids: np.ndarray  # int64, sorted, unique
    collection: np.ndarray  # int32 codes into collections
    uploader: np.ndarray  # int64 user id, NO_UPLOADER for none
    created: np.ndarray  # float64 epoch seconds
    format: np.ndarray  # int32 codes into formats
    width: np.ndarray  # int32
    height: np.ndarray  # int32
    collections: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()

    @classmethod
    def from_rows(cls, rows) -> "FacetTable":
        """From ``(id, collection, uploader id or None, created epoch, format, width, height)`` rows."""
        return cls.empty().merged(rows)

    @classmethod
    def empty(cls) -> "FacetTable":
        return cls(np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.float64),
                   np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int32))

    def __len__(self) -> int:
        return len(self.ids)

    def merged(self, rows) -> "FacetTable":
        """A new table where these rows replace the ones with their ids and the others are added."""
        rows = list(rows)
        if not rows:
            return self
        collections, formats = list(self.collections), list(self.formats)
        codes = {("c", name): i for i, name in enumerate(collections)}
        codes.update({("f", name): i for i, name in enumerate(formats)})

        def code(kind: str, vocabulary: list, name: str) -> int:
            key = (kind, name or "")
            if key not in codes:
                codes[key] = len(vocabulary)
                vocabulary.append(name or "")
            return codes[key]

        new = (
            np.fromiter((r[0] for r in rows), np.int64, len(rows)),
            np.fromiter((code("c", collections, r[1]) for r in rows), np.int32, len(rows)),
            np.fromiter((NO_UPLOADER if r[2] is None else r[2] for r in rows), np.int64, len(rows)),
            np.fromiter((r[3] for r in rows), np.float64, len(rows)),
            np.fromiter((code("f", formats, (r[4] or "").upper()) for r in rows), np.int32, len(rows)),
            np.fromiter((r[5] for r in rows), np.int32, len(rows)),
            np.fromiter((r[6] for r in rows), np.int32, len(rows)),
        )
        old = (self.ids, self.collection, self.uploader, self.created, self.format, self.width, self.height)
        joined = [np.concatenate([a, b]) for a, b in zip(old, new)]
        # The last occurrence of an id wins: np.unique on the reversed ids gives first occurrences.
        _, first_reversed = np.unique(joined[0][::-1], return_index=True)
        keep = len(joined[0]) - 1 - first_reversed  # ascending ids, as np.unique sorts them
        return FacetTable(*(column[keep] for column in joined), tuple(collections), tuple(formats))

    @staticmethod
    def _among(codes: np.ndarray, vocabulary: tuple[str, ...], names) -> np.ndarray:
        """Per row, whether its code names one of ``names``."""
        names = set(names)
        return _among(codes, [i for i, name in enumerate(vocabulary) if name in names], len(vocabulary))

    def mask(self, conditions: Conditions) -> np.ndarray:
        """A boolean per row: whether it meets every condition."""
        keep = np.ones(len(self.ids), dtype=bool)
        if conditions.collections:
            keep &= self._among(self.collection, self.collections, conditions.collections)
        if conditions.excluded:
            keep &= ~self._among(self.collection, self.collections, conditions.excluded)
        if conditions.uploaders:
            keep &= _among(self.uploader, conditions.uploaders)
        if conditions.created_from is not None:
            keep &= self.created >= conditions.created_from
        if conditions.created_to is not None:
            keep &= self.created < conditions.created_to
        if conditions.formats:
            keep &= self._among(self.format, self.formats, [f.upper() for f in conditions.formats])
        if conditions.min_width:
            keep &= self.width >= conditions.min_width
        if conditions.min_height:
            keep &= self.height >= conditions.min_height
        if conditions.orientation == "landscape":
            keep &= self.width > self.height
        elif conditions.orientation == "portrait":
            keep &= self.width < self.height
        elif conditions.orientation == "square":
            keep &= self.width == self.height
        return keep

    def matching(self, conditions: Conditions) -> np.ndarray:
        """The ids (sorted int64) of the rows that meet every condition."""
        return self.ids[self.mask(conditions)]
