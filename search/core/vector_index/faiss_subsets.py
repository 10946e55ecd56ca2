"""What the FAISS backends need to search inside a ``Subset``: the storage rows of
its ids (``RowMap``), a bitmap selector over rows or ids, and an exact top-k
over a few rows read where they are stored.

Two ways to search a subset exactly, and when each wins (one query, 768-d
float32 rows, one core; ``manage.py bench_filters``): scoring the subset's rows
one by one where they lie (``top_k_in_rows``, FAISS
``knn_inner_products_by_idx``: no copy of the rows) costs time in proportion to
the subset, 0.06 ms for 310 rows, 1.9 ms for 10,000 rows of a million and 11 ms
for 30,000 (rows scattered over gigabytes read slower); scanning every row with
a bitmap selector costs the scan of the index, less the members' inner
products skipped. Gathering the rows into a new array first
(``vectors[rows]``) was four times slower than reading them in place.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["RowMap", "id_selector", "mask_selector", "row_selector", "top_k_in_rows"]

# Ids no sparser than this (largest id below DENSE_SPREAD × count + DENSE_SLACK)
# are looked up in a table indexed by id; sparser ones by binary search.
DENSE_SPREAD = 4
DENSE_SLACK = 1 << 20


def _dense(ids: np.ndarray) -> bool:
    return not len(ids) or int(ids.max()) < DENSE_SPREAD * len(ids) + DENSE_SLACK


class RowMap:
    """Where each live id is stored: its row of the FAISS storage (a flat index's
    row, an HNSW label). Made once after a change and kept until the next.

    Database keys span a range not much wider than their number, so they get a
    table indexed by id: mapping a 500,000-id subset onto a million rows then
    takes 1.7 ms, against 14 ms for a binary search of each id (used for sparse
    ids).
    """

    def __init__(self, ids_by_row: np.ndarray, live: np.ndarray | None = None):
        self.ids_by_row = ids_by_row
        self.total = len(ids_by_row)
        rows = np.arange(self.total, dtype=np.int64) if live is None else np.flatnonzero(live)
        ids = ids_by_row[rows]
        row_type = np.int32 if self.total < np.iinfo(np.int32).max else np.int64
        self._table = self._sorted_ids = self._sorted_rows = None
        if _dense(ids):
            self._table = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=row_type)
            self._table[ids] = rows
        else:
            order = np.argsort(ids, kind="stable")
            self._sorted_ids, self._sorted_rows = ids[order], rows[order].astype(row_type)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows (int64) of the stored ones among ``ids`` (sorted, unique)."""
        if self._table is not None:
            rows = self._table[ids[: np.searchsorted(ids, len(self._table))]]
            return rows[rows >= 0].astype(np.int64)
        if not len(self._sorted_ids):
            return np.empty(0, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos[pos == len(self._sorted_ids)] = 0
        return self._sorted_rows[pos[self._sorted_ids[pos] == ids]].astype(np.int64)


def mask_selector(mask: np.ndarray):
    """``(IDSelectorBitmap, its bitmap)`` keeping the positions where ``mask`` is
    true; the bitmap must stay referenced while the selector is used."""
    bitmap = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(bitmap.nbytes, faiss.swig_ptr(bitmap)), bitmap


def row_selector(rows: np.ndarray, total: int):
    """A bitmap selector (and its bitmap) of ``rows`` among ``total`` rows."""
    mask = np.zeros(total, dtype=bool)
    mask[rows] = True
    return mask_selector(mask)


def id_selector(ids: np.ndarray):
    """A selector of external ``ids`` (sorted, unique) and what it references:
    a bitmap over the id range when the ids are dense enough, else a hash set
    (``IDSelectorBatch``)."""
    if _dense(ids):
        mask = np.zeros(int(ids[-1]) + 1 if len(ids) else 0, dtype=bool)
        mask[ids] = True
        return mask_selector(mask)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    return faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)), ids


def top_k_in_rows(queries: np.ndarray, vectors_ptr, total: int, rows: np.ndarray, k: int):
    """``(scores, rows)``, (Q, k) each, best first: the exact inner-product top-k
    of each query among ``rows`` of a float32 row-major store of ``total`` rows
    at ``vectors_ptr`` (a SWIG float pointer), read in place. ``k`` must not
    exceed ``len(rows)``."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    found = np.empty((len(queries), k), dtype=np.int64)
    faiss.knn_inner_products_by_idx(
        faiss.swig_ptr(queries), vectors_ptr, faiss.swig_ptr(rows), queries.shape[1], len(queries), total,
        len(rows), k, faiss.swig_ptr(scores), faiss.swig_ptr(found), 0,
    )
    return scores, found
