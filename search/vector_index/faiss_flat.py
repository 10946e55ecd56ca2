"""Exact search backend: FAISS flat inner product with external int64 ids.

Scores are plain inner products. Vectors are NOT normalised here: callers pass
unit vectors (SigLIP embeddings are L2-normalised before indexing and before
querying), which makes the score the cosine similarity.
"""

from __future__ import annotations

import faiss
import numpy as np

from .base import (
    VectorIndex,
    VectorIndexError,
    as_ids,
    as_k,
    as_vectors,
    empty_results,
    upsert_batch,
)

__all__ = ["FaissFlatIndex"]


class FaissFlatIndex(VectorIndex):
    """``IndexIDMap2(IndexFlatIP(dim))``: brute-force, exact, no parameters."""

    backend = "faiss-flat"

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        if self.params:
            raise VectorIndexError(
                f"the {self.backend!r} backend takes no parameters, got {sorted(self.params)}"
            )
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

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

    def remove(self, ids) -> int:
        ids = as_ids(ids)
        if len(ids) == 0 or self._index.ntotal == 0:
            return 0
        return int(self._index.remove_ids(ids))

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = as_vectors(queries, self.dim, allow_single=True)
        k = as_k(k)
        out_ids, out_scores = empty_results(len(queries), k)
        # Ask FAISS for at most as many rows as exist; the rest stays padded.
        k_found = min(k, self._index.ntotal)
        if k_found and len(queries):
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
