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
"""

from __future__ import annotations

import os
import threading

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

__all__ = ["DEVICE_ENV_VAR", "FaissFlatIndex", "search_device"]

DEVICE_ENV_VAR = "VECTOR_INDEX_DEVICE"


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

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        if self.params:
            raise VectorIndexError(
                f"the {self.backend!r} backend takes no parameters, got {sorted(self.params)}"
            )
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._mirror = None  # (device, ids, vectors) as torch tensors, see search_device()
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
        self._mirror = None

    def remove(self, ids) -> int:
        ids = as_ids(ids)
        if len(ids) == 0 or self._index.ntotal == 0:
            return 0
        removed = int(self._index.remove_ids(ids))
        self._mirror = None
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
                n = self._index.ntotal
                flat = faiss.downcast_index(self._index.index)
                vectors = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)
                mirror = (device, torch.from_numpy(self._stored_ids().copy()).to(device),
                          torch.from_numpy(vectors.copy()).to(device))
                self._mirror = mirror
        return mirror[1], mirror[2]

    def _search_on_device(self, device: str, queries: np.ndarray, k: int):
        import torch

        ids, vectors = self._device_copy(device)
        with torch.inference_mode():
            scores = torch.from_numpy(queries).to(device) @ vectors.T
            top_scores, top_rows = torch.topk(scores, k, dim=1)
            return ids[top_rows].cpu().numpy(), top_scores.cpu().numpy()

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = as_vectors(queries, self.dim, allow_single=True)
        k = as_k(k)
        out_ids, out_scores = empty_results(len(queries), k)
        # Ask FAISS for at most as many rows as exist; the rest stays padded.
        k_found = min(k, self._index.ntotal)
        if k_found and len(queries):
            device = search_device()
            if device is not None:
                ids, scores = self._search_on_device(device, queries, k_found)
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
