"""Exact search backend: FAISS flat inner product with external int64 ids.

Scores are plain inner products. Vectors are NOT normalised here: callers pass
unit vectors (SigLIP embeddings are L2-normalised before indexing and before
querying), which makes the score the cosine similarity.

On a CUDA host the scan runs on the GPU: the first search copies the vectors
(float32, unchanged, so the search stays exact) into device memory with torch,
and a query is one matrix product and a top-k there. A single query over
31,000 vectors reads 95 MB, about 10 ms for one CPU core and well under a
millisecond for a GPU. ``$VECTOR_INDEX_DEVICE`` chooses: ``auto`` (default:
CUDA when torch sees one), ``cpu``, or a torch device such as ``cuda:1``.
The copy is dropped on every change and made again by the next search.

On the CPU a single query (fewer than FAISS's BLAS threshold of queries at once)
first scans a float16 copy of the vectors (FAISS ``IndexScalarQuantizer`` fp16:
half the bytes to read, 2.5 instead of 5.5 ms for 31,000 vectors on one core),
then re-scores its best ``FP16_REFINE_FACTOR`` × k rows exactly from the float32
vectors (``IndexRefine``), so the scores returned are the float32 ones and the
ranking differs from a full float32 scan only if a row of the true top k fell
below 4 × k in the fp16 pass — which takes score gaps under fp16's rounding
(~1e-4). Batches of queries keep the float32 matrix product. The copy costs half
the float32 vectors' memory again; ``$VECTOR_INDEX_FLAT_SCAN=float32`` turns it
off (``fp16`` is the default).

A search inside a ``Subset`` stays exact. Its ids are turned into rows of the
flat store (``faiss_subsets.RowMap``, kept until the next change like the
copies above); a subset of at most ``gather_max_fraction`` (10 %) of the rows
is scored row by row where the rows lie, a larger one by the usual scan (the
fp16 one for single queries) with a bitmap selector of its rows, which skips
the others' inner products. On 31,000 rows (``manage.py bench_filters``) the
two cost the same at 10 % (0.6 ms); at 1 % rows take 0.06 ms against 0.14 ms
for the scan, at 50 % 2.7 against 1.9 ms (the unfiltered scan: 3.4 ms). On
CUDA the product over all rows is masked before the top-k.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import faiss
import numpy as np

from search.core.vector_index.base import (
    Subset,
    VectorIndex,
    VectorIndexError,
    as_ids,
    as_k,
    as_subset,
    as_vectors,
    empty_results,
    upsert_batch,
)
from search.core.vector_index.faiss_subsets import RowMap, row_selector, top_k_in_rows

log = logging.getLogger(__name__)

__all__ = ["DEVICE_ENV_VAR", "FLAT_SCAN_ENV_VAR", "FaissFlatIndex", "fp16_scan", "search_device"]

DEVICE_ENV_VAR = "VECTOR_INDEX_DEVICE"
FLAT_SCAN_ENV_VAR = "VECTOR_INDEX_FLAT_SCAN"
FP16_REFINE_FACTOR = 4


def fp16_scan() -> bool:
    """Whether single CPU queries scan a float16 copy first (see the module docstring)."""
    return _scan_choice(os.environ.get(FLAT_SCAN_ENV_VAR, "fp16").strip().lower() or "fp16") == "fp16"


@functools.lru_cache(maxsize=8)
def _scan_choice(value: str) -> str:
    if value not in {"fp16", "float32"}:
        # A speed setting: a typo costs a warning (once), not the searches.
        log.warning("%s must be fp16 or float32, not %r; using fp16", FLAT_SCAN_ENV_VAR, value)
        return "fp16"
    return value


def search_device() -> str | None:
    """The torch device exact searches run on, or None for FAISS on the CPU."""
    choice = os.environ.get(DEVICE_ENV_VAR, "auto").strip().lower() or "auto"
    if choice == "cpu":
        return None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the project
        return None
    if not torch.cuda.is_available():
        return None
    return "cuda" if choice == "auto" else choice


class FaissFlatIndex(VectorIndex):
    """``IndexIDMap2(IndexFlatIP(dim))``: brute-force, exact, no parameters."""

    backend = "faiss-flat"
    #: Subsets of at most this fraction of the rows are scored row by row in
    #: place; larger ones are scanned with a selector (see the module docstring).
    gather_max_fraction: float = 0.1

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        if self.params:
            raise VectorIndexError(
                f"the {self.backend!r} backend takes no parameters, got {sorted(self.params)}"
            )
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._mirror = None  # (device, ids, vectors) as torch tensors, see search_device()
        self._half = None  # (IndexRefine, its fp16 base, ids by row), see fp16_scan()
        self._rows = None  # RowMap: id -> row, for subsets
        self._mirror_lock = threading.Lock()

    def _stored_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def add(self, ids, vectors) -> None:
        ids, vectors = upsert_batch(ids, vectors, self.dim)
        if len(ids) == 0:
            return
        # FAISS keeps duplicate ids as separate rows, so ids already stored are
        # removed first (remove_ids compacts the whole flat store, so skip it
        # when nothing is being replaced).
        if self._index.ntotal and np.isin(ids, self._stored_ids()).any():
            self._index.remove_ids(ids)
        self._index.add_with_ids(vectors, ids)
        self._mirror = self._half = self._rows = None

    def remove(self, ids) -> int:
        ids = as_ids(ids)
        if len(ids) == 0 or self._index.ntotal == 0:
            return 0
        removed = int(self._index.remove_ids(ids))
        self._mirror = self._half = self._rows = None
        return removed

    def _device_copy(self, device: str):
        """(ids, vectors) in ``device`` memory, made on first use after a change."""
        import torch

        mirror = self._mirror
        if mirror is not None and mirror[0] == device:
            return mirror[1], mirror[2]
        with self._mirror_lock:
            mirror = self._mirror
            if mirror is None or mirror[0] != device:
                mirror = (device, torch.from_numpy(self._stored_ids().copy()).to(device),
                          torch.from_numpy(self._flat_vectors().copy()).to(device))
                self._mirror = mirror
        return mirror[1], mirror[2]

    def _flat_vectors(self) -> np.ndarray:
        """The float32 rows, in FAISS's own memory (no copy)."""
        n = self._index.ntotal
        flat = faiss.downcast_index(self._index.index)
        return faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def _fp16_refine(self):
        """(IndexRefine over an fp16 copy and the float32 rows, ids by row), made on first use
        after a change."""
        half = self._half
        if half is not None:
            return half
        with self._mirror_lock:
            if self._half is None:
                base = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_INNER_PRODUCT)
                base.add(self._flat_vectors())
                refine = faiss.IndexRefine(base, faiss.downcast_index(self._index.index))
                refine.k_factor = FP16_REFINE_FACTOR
                # IndexRefine does not own the two indices: keep them alive with it.
                self._half = (refine, base, self._stored_ids().copy())
        return self._half

    def _row_map(self) -> RowMap:
        """Row of each stored id, made on first use after a change."""
        rows = self._rows
        if rows is None:
            with self._mirror_lock:
                if self._rows is None:
                    self._rows = RowMap(self._stored_ids().copy())
                rows = self._rows
        return rows

    def _single_fp16(self, queries: np.ndarray) -> bool:
        return len(queries) < faiss.cvar.distance_compute_blas_threshold and fp16_scan()

    def _search_fp16(self, queries: np.ndarray, k: int, params=None):
        refine, _, ids_by_row = self._fp16_refine()
        scores, rows = refine.search(queries, k, params=params)
        return np.where(rows >= 0, ids_by_row[np.maximum(rows, 0)], -1), scores

    def _search_on_device(self, device: str, queries: np.ndarray, k: int, rows: np.ndarray | None = None):
        import torch

        ids, vectors = self._device_copy(device)
        with torch.inference_mode():
            scores = torch.from_numpy(queries).to(device) @ vectors.T
            if rows is not None:  # only the subset's rows may win (k <= len(rows))
                keep = torch.zeros(scores.shape[1], dtype=torch.bool, device=device)
                keep[torch.from_numpy(rows).to(device)] = True
                scores.masked_fill_(~keep, float("-inf"))
            top_scores, top_rows = torch.topk(scores, k, dim=1)
            return ids[top_rows].cpu().numpy(), top_scores.cpu().numpy()

    def _search_rows(self, queries: np.ndarray, k: int, rows: np.ndarray):
        """Exact top-k among the stored ``rows`` on the CPU (``k <= len(rows)``)."""
        total, flat = self._index.ntotal, faiss.downcast_index(self._index.index)
        ids_by_row = self._row_map().ids_by_row
        if len(rows) <= self.gather_max_fraction * total:
            scores, found = top_k_in_rows(queries, flat.get_xb(), total, np.sort(rows), k)
            return ids_by_row[found], scores
        selector, _bitmap = row_selector(rows, total)  # the bitmap lives as long as the call
        if self._single_fp16(queries):
            base_params = faiss.SearchParameters()
            base_params.sel = selector
            params = faiss.IndexRefineSearchParameters()
            params.k_factor = FP16_REFINE_FACTOR
            params.base_index_params = base_params
            return self._search_fp16(queries, k, params)
        params = faiss.SearchParameters()
        params.sel = selector
        scores, found = flat.search(queries, k, params=params)
        return np.where(found >= 0, ids_by_row[np.maximum(found, 0)], -1), scores

    def search(self, queries, k: int, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = as_vectors(queries, self.dim, allow_single=True)
        k = as_k(k)
        subset = as_subset(subset)
        out_ids, out_scores = empty_results(len(queries), k)
        rows = None if subset is None else self._row_map().rows_of(subset.require_ids(self.backend))
        # Ask FAISS for at most as many rows as exist; the rest stays padded.
        k_found = min(k, self._index.ntotal if rows is None else len(rows))
        if k_found and len(queries):
            device = search_device()
            if device is not None:
                ids, scores = self._search_on_device(device, queries, k_found, rows)
            elif rows is not None:
                ids, scores = self._search_rows(queries, k_found, rows)
            elif self._single_fp16(queries):
                ids, scores = self._search_fp16(queries, k_found)
            else:
                scores, ids = self._index.search(queries, k_found)
            out_ids[:, :k_found] = ids
            out_scores[:, :k_found] = np.where(ids >= 0, scores, -np.inf)
        return out_ids, out_scores

    def count(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        return np.sort(self._stored_ids())

    def _serialize_payload(self):
        return faiss.serialize_index(self._index)

    @classmethod
    def _deserialize_payload(cls, payload, *, dim: int, params: dict, count: int):
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except Exception as exc:
            raise VectorIndexError(f"corrupt {cls.backend!r} payload: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap2) or not isinstance(
            faiss.downcast_index(index.index), faiss.IndexFlatIP
        ):
            raise VectorIndexError(f"payload is not a {cls.backend!r} index")
        if index.d != dim or index.ntotal != count:
            raise VectorIndexError("payload does not match the file header")
        obj = cls(dim, **params)
        obj._index = index
        return obj
