"""Approximate search backend for ten million vectors and more: FAISS IVF-PQ
with a re-ranking store.

Rows are grouped into ``nlist`` inverted lists around coarse centroids, and
each row is kept as a product-quantizer code of ``pq_m`` bytes (``pq_nbits``
bits per sub-vector) instead of its ``4 * dim`` float bytes; an optional OPQ
rotation, learnt with the codebooks, lowers the quantization error (its
training is slow on 768-d vectors, so it is off by default). A search visits
the ``nprobe`` nearest lists. With ``refine`` set, the best ``k * k_factor``
candidates are re-scored against a second, finer code of each row (``sq8``,
``sq6``, ``sq4``: 1, 0.75, 0.5 bytes per dimension; ``fp16``; ``flat``: exact
float32).

The scalar-quantizer codes (and ``fp16``) encode a row's difference from the
centroid of its list (``refine_residual``, on by default) rather than the row:
the differences span a much smaller range than the rows, so the same bits give
finer steps; their ranges span four standard deviations either side of the
mean, so a few outliers do not stretch them. Measured on 1M clustered 768-d
vectors (``bench_index --refine-study 16``: nlist 4096, the same 160 candidates
re-ranked each way): recall@10 0.959 with residual ``sq6`` (the default)
against 0.940 for plain ``sq6``, 0.974 for plain ``sq8``, 0.980 for residual
``sq8`` and 0.996 exact; PQ codes alone reach 0.515.

Memory per row: ``pq_m`` bytes of PQ code and 8 of id in the inverted lists,
the re-ranking code (576 bytes for ``sq6`` at 768 dimensions), 4 for its list
number and 16 for the id → code-row map: about 700 bytes with the defaults, so
10M rows of 768 dimensions fit in 8 GB. The re-ranking codes are positional
rows; a removed row's code stays until a quarter of the codes are dead, then
they are compacted.

Training: the centroids (and the OPQ rotation), the codebooks and the
re-ranking code ranges are learnt from data. Call ``train(vectors)`` with a
representative sample, or just add rows: the first ``train_size`` rows are
kept exactly (and searched exactly) until there are that many, then the index
trains itself on them and encodes them. ``nlist`` is lowered at training time
when the sample is too small for it (at least 39 training rows per list);
``params`` then records the value used. For 10M rows use ``nlist`` 16384 and a
training sample of at least 640k rows.

Removal and replacement work directly on the inverted lists (FAISS
``remove_ids``, a scan of the lists: batch them).

Filtered searches (a ``Subset``): rows still buffered are searched exactly
among the subset's. Once trained, a subset of at most ``exact_subset_max``
stored rows, and at most 1/200 of them, is scored whole from its re-ranking
codes (the candidates are the subset itself; without re-ranking codes every
list is probed instead): decoding one code costs about as much as probing 200
PQ codes (on 100k 768-d rows, 1,000 of them scored whole took 20 ms, all 256
lists probed with a selector 1.7 ms), so this pays only on large indexes. A
larger one is searched through the inverted lists with a selector of its ids
(a bitmap over the id range for database keys, a hash set for sparse ids),
visiting ``nprobe / (the subset's share of the rows)`` lists (at most all of
them) so as many of its rows are met as an unfiltered search meets; the
re-ranking then only sees the subset's rows.

Parameters (all optional):

``nlist`` (4096), ``nprobe`` (32)
    inverted lists, and lists visited per query (search parameter).
``pq_m`` (0: ``dim / 8``), ``pq_nbits`` (8)
    product-quantizer sub-vectors and bits per sub-vector code.
``opq`` (false)
    learn an OPQ rotation before the product quantizer.
``refine`` ("sq6"), ``refine_residual`` (true), ``k_factor`` (32)
    re-ranking code ("none", "sq4", "sq6", "sq8", "fp16", "flat"), whether it
    encodes the difference from the list centroid, and how many candidates per
    wanted result are re-scored (search parameter; at 10M rows recall@10 was
    0.918 with 16 and 0.945 with 32).
``quantizer`` ("hnsw")
    coarse quantizer: "hnsw" (fast assignment for large ``nlist``; also used
    to assign rows during k-means) or "flat".
``train_size`` (200000)
    rows buffered before automatic training.
``exact_subset_max`` (5000)
    subsets of at most this many rows (and 1/200 of the index) are scored
    whole (search parameter).
"""

from __future__ import annotations

import struct

import faiss
import numpy as np

from search.core.vector_index.base import (
    Subset,
    VectorIndex,
    VectorIndexError,
    _is_int,
    as_ids,
    as_k,
    as_subset,
    as_vectors,
    empty_results,
    in_sorted,
    upsert_batch,
)
from search.core.vector_index.faiss_hnsw import faiss_part
from search.core.vector_index.faiss_subsets import id_selector, top_k_in_rows

__all__ = ["FaissIVFPQIndex"]

DEFAULTS = {
    "nlist": 4096,
    "nprobe": 32,
    "pq_m": 0,
    "pq_nbits": 8,
    "opq": False,
    "refine": "sq6",
    "refine_residual": True,
    "k_factor": 32,
    "quantizer": "hnsw",
    "train_size": 200_000,
    "exact_subset_max": 5_000,
}
REFINE_TYPES = {
    "none": None,
    "flat": None,
    "fp16": "QT_fp16",
    "sq8": "QT_8bit",
    "sq6": "QT_6bit",
    "sq4": "QT_4bit",
}
# Residual code ranges: mean ± 4 standard deviations per dimension (minimum and
# maximum waste steps on rare outliers; on 250k clustered 768-d rows residual sq6
# re-ranked to recall@10 0.976 this way against 0.961 with min-max).
RESIDUAL_RANGE = ("RS_meanstd", 4.0)
MIN_POINTS_PER_LIST = 39
KMEANS_ITERATIONS = 10
QUANTIZER_M = 32
COMPACT_FRACTION = 0.25  # dead re-ranking rows that trigger a compaction
ONE_THREAD_ROWS = 4096  # re-ranking codes decoded on the calling thread alone (see _OneThread)
# Decoding a re-ranking code (sq6, 768-d: ~3 µs) costs about as much as probing this many
# PQ codes with a selector (~16 ns each): a subset is scored whole from its codes only
# when it holds at most 1 / DECODE_COST_RATIO of the rows.
DECODE_COST_RATIO = 200
PAYLOAD_VERSION = b"IVR2"
# version, ivf bytes, codec bytes, code rows, code size, buffered rows, stored ids
_PARTS = struct.Struct("<4sQQQQQQ")


def _auto_pq_m(dim: int) -> int:
    """``dim / 8`` sub-vectors when that divides, else the nearest divisor below."""
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def _top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row, best first; -1 ids sort last."""
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def train_rerank_codec(kind: str, vectors: np.ndarray, centroids: np.ndarray | None = None):
    """A trained codec for re-ranking codes of ``kind`` (``None`` for "flat": the
    float32 bytes themselves). With ``centroids`` (each vector's list centroid) it
    codes the differences, with ranges of mean ± 4 standard deviations."""
    qtype = REFINE_TYPES[kind]
    if qtype is None:
        return None
    dim = vectors.shape[1]
    codec = faiss.IndexScalarQuantizer(dim, getattr(faiss.ScalarQuantizer, qtype), faiss.METRIC_INNER_PRODUCT)
    if centroids is not None:
        vectors = vectors - centroids
        codec.sq.rangestat = getattr(faiss.ScalarQuantizer, RESIDUAL_RANGE[0])
        codec.sq.rangestat_arg = RESIDUAL_RANGE[1]
    codec.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return codec


def encode_rerank(codec, vectors: np.ndarray, centroids: np.ndarray | None = None) -> np.ndarray:
    """(n, code size) uint8 codes of ``vectors`` (of their differences from
    ``centroids`` when given)."""
    if codec is None:
        return np.ascontiguousarray(vectors, dtype=np.float32).view(np.uint8).reshape(len(vectors), -1)
    if centroids is not None:
        vectors = vectors - centroids
    return codec.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))


def decode_rerank(codec, codes: np.ndarray, dim: int, centroids: np.ndarray | None = None) -> np.ndarray:
    if codec is None:
        return np.ascontiguousarray(codes).view(np.float32).reshape(len(codes), dim)
    vectors = codec.sa_decode(np.ascontiguousarray(codes))
    if centroids is not None:
        vectors += centroids
    return vectors


class _OneThread:
    """Run FAISS on the calling thread only. A few hundred rows decode in
    microseconds, while starting OpenMP threads for them costs milliseconds (much
    more on a busy machine); the OpenMP thread count is per calling thread."""

    def __enter__(self):
        self._threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)

    def __exit__(self, *exc):
        faiss.omp_set_num_threads(self._threads)


class FaissIVFPQIndex(VectorIndex):
    """IVF-PQ (optionally OPQ-rotated) over inner products, ids stored in the
    inverted lists, plus an optional positional re-ranking store."""

    backend = "faiss-ivfpq"
    exact = False
    search_param_names = frozenset({"nprobe", "k_factor", "exact_subset_max"})

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        self.params = {**DEFAULTS, **self.params}
        self._check_params(self.params)
        self._index = None  # IndexIVFPQ, or IndexPreTransform(OPQ, IndexIVFPQ); None until trained
        self._buffer_ids = np.empty(0, dtype=np.int64)
        self._buffer_vectors = np.empty((0, self.dim), dtype=np.float32)
        self._sorted_ids = np.empty(0, dtype=np.int64)  # every stored id, ascending
        # Re-ranking store (trained index, refine set): row r of _codes is the code of
        # one stored vector or of a removed one not yet compacted away, _lists[r] its
        # inverted list; _sorted_rows[i] is the row of _sorted_ids[i].
        self._codec = None  # faiss.IndexScalarQuantizer (trained, empty) for the sq / fp16 codes
        self._codes = np.empty((0, 0), dtype=np.uint8)
        self._lists = np.empty(0, dtype=np.int32)
        self._sorted_rows = np.empty(0, dtype=np.int64)

    def _check_params(self, params: dict) -> None:
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise VectorIndexError(
                f"unknown {self.backend!r} parameters {unknown}; known: {sorted(DEFAULTS)}"
            )
        for name, low, high in (
            ("nlist", 1, 1 << 24),
            ("nprobe", 1, 1 << 24),
            ("pq_m", 0, self.dim),
            ("pq_nbits", 1, 16),
            ("k_factor", 1, 1 << 12),
            ("train_size", 1, 1 << 40),
            ("exact_subset_max", 0, 1 << 40),
        ):
            value = params[name]
            if not _is_int(value) or not low <= value <= high:
                raise VectorIndexError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        pq_m = params["pq_m"] or _auto_pq_m(self.dim)
        if self.dim % pq_m:
            raise VectorIndexError(f"pq_m {pq_m} does not divide the dimension {self.dim}")
        if params["refine"] not in REFINE_TYPES:
            raise VectorIndexError(f"refine must be one of {sorted(REFINE_TYPES)}, got {params['refine']!r}")
        if params["quantizer"] not in ("hnsw", "flat"):
            raise VectorIndexError(f"quantizer must be 'hnsw' or 'flat', got {params['quantizer']!r}")
        for name in ("opq", "refine_residual"):
            if not isinstance(params[name], bool):
                raise VectorIndexError(f"{name} must be true or false, got {params[name]!r}")

    # -- the re-ranking code -------------------------------------------------------

    @property
    def _refining(self) -> bool:
        return self.params["refine"] != "none"

    @property
    def _residual(self) -> bool:
        """Codes of the difference from the list centroid (not for exact floats)."""
        return self.params["refine_residual"] and self.params["refine"] not in ("none", "flat")

    @property
    def _code_size(self) -> int:
        return 4 * self.dim if self._codec is None else int(self._codec.sa_code_size())

    def _ivf(self):
        return faiss.downcast_index(faiss.extract_index_ivf(self._index))

    def _ivf_space(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the inverted lists see them (rotated by OPQ when there is one;
        the rotation is orthogonal, so inner products are unchanged)."""
        if not isinstance(self._index, faiss.IndexPreTransform):
            return vectors
        for i in range(self._index.chain.size()):
            vectors = self._index.chain.at(i).apply(vectors)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _centroids(self, lists: np.ndarray) -> np.ndarray:
        return self._ivf().quantizer.reconstruct_batch(lists.astype(np.int64))

    def _encode_rows(self, vectors: np.ndarray, lists: np.ndarray, centroids: np.ndarray | None = None) -> np.ndarray:
        """Re-ranking codes of ``vectors`` (``centroids``: their lists', when already at hand)."""
        if self._residual and centroids is None:
            centroids = self._centroids(lists)
        return encode_rerank(self._codec, vectors, centroids if self._residual else None)

    def _decode_rows(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) <= ONE_THREAD_ROWS:
            with _OneThread():
                return self._decode_rows_here(rows)
        return self._decode_rows_here(rows)

    def _decode_rows_here(self, rows: np.ndarray) -> np.ndarray:
        centroids = self._centroids(self._lists[rows]) if self._residual else None
        return decode_rerank(self._codec, self._codes[rows], self.dim, centroids)

    def _append_rows(self, codes: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """Store codes in new rows; returns their row numbers."""
        n, need = len(self._codes), len(self._codes) + len(codes)
        # Grown to exactly the rows needed: numpy zero-fills spare capacity, which would
        # then be resident memory for nothing.
        if self._codes.flags.owndata and self._codes.flags.writeable and self._codes.shape[1:] == codes.shape[1:]:
            # realloc: a large array grows by remapping its pages, not by copying them
            self._codes.resize((need, codes.shape[1]), refcheck=False)
            self._lists.resize(need, refcheck=False)
        else:  # first rows, or rows still mapped from a loaded file
            grown = np.empty((need, codes.shape[1]), dtype=np.uint8)
            grown[:n] = self._codes
            lists_grown = np.empty(need, dtype=np.int32)
            lists_grown[:n] = self._lists
            self._codes, self._lists = grown, lists_grown
        self._codes[n:] = codes
        self._lists[n:] = lists
        return np.arange(n, need, dtype=np.int64)

    def _compact(self) -> None:
        """Drop the codes of removed rows."""
        keep = np.sort(self._sorted_rows)
        self._codes = self._codes[keep]
        self._lists = self._lists[keep]
        self._sorted_rows = np.searchsorted(keep, self._sorted_rows).astype(np.int64)

    # -- training --------------------------------------------------------------

    @property
    def is_trained(self) -> bool:
        return self._index is not None

    def _build_untrained(self, nlist: int):
        d, p = self.dim, self.params
        pq_m = p["pq_m"] or _auto_pq_m(d)
        if p["quantizer"] == "hnsw":
            quantizer = faiss.IndexHNSWFlat(d, QUANTIZER_M, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efConstruction = 80
            quantizer.hnsw.efSearch = 64  # used when assigning rows to lists
        else:
            quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, p["pq_nbits"], faiss.METRIC_INNER_PRODUCT)
        quantizer.this.disown()
        ivf.own_fields = True
        if not p["opq"]:
            return ivf
        opq = faiss.OPQMatrix(d, pq_m)
        index = faiss.IndexPreTransform(opq, ivf)
        opq.this.disown()
        ivf.this.disown()
        index.own_fields = True
        return index

    def train(self, vectors) -> None:
        """Learn centroids, rotation, codebooks and re-ranking code ranges from
        ``vectors``; rows added before are then encoded. Training again is
        refused: build a new index."""
        self._train(as_vectors(vectors, self.dim), buffer_is_training=False)

    def _train(self, vectors: np.ndarray, buffer_is_training: bool) -> None:
        if self._index is not None:
            raise VectorIndexError("this index is already trained; build a new one to retrain")
        if len(vectors) == 0:
            raise VectorIndexError("cannot train on zero vectors")
        pq_m = self.params["pq_m"] or _auto_pq_m(self.dim)
        if len(vectors) < (1 << self.params["pq_nbits"]):
            raise VectorIndexError(
                f"training needs at least {1 << self.params['pq_nbits']} vectors for "
                f"{self.params['pq_nbits']}-bit codes, got {len(vectors)}"
            )
        nlist = max(1, min(self.params["nlist"], len(vectors) // MIN_POINTS_PER_LIST))
        index = self._build_untrained(nlist)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.niter = KMEANS_ITERATIONS
        assign = None
        if self.params["quantizer"] == "hnsw" and nlist >= 1024:
            # k-means assigns every training row to its nearest centroid at each
            # iteration: through an HNSW graph rather than by brute force.
            assign = faiss.IndexHNSWFlat(self.dim, QUANTIZER_M, faiss.METRIC_INNER_PRODUCT)
            ivf.clustering_index = assign
        try:
            index.train(vectors)
        finally:
            ivf.clustering_index = None
            del assign
        self.params = {**self.params, "nlist": int(nlist), "pq_m": int(pq_m)}
        self._index = index
        # (vectors in the lists' space, their lists, those lists' centroids), when computed already
        assigned = None
        if self._refining:
            in_ivf = self._ivf_space(vectors)
            lists = self._assign(in_ivf) if self._residual or buffer_is_training else None
            centroids = self._centroids(lists) if self._residual else None
            self._codec = train_rerank_codec(self.params["refine"], in_ivf, centroids)
            self._codes = np.empty((0, self._code_size), dtype=np.uint8)
            if buffer_is_training:
                assigned = (np.ascontiguousarray(in_ivf, dtype=np.float32), lists, centroids)
            del centroids
        ids, buffered = self._buffer_ids, self._buffer_vectors
        self._buffer_ids = np.empty(0, dtype=np.int64)
        self._buffer_vectors = np.empty((0, self.dim), dtype=np.float32)
        # Trained on the buffer itself: its rows are assigned to their lists (and their
        # centroids looked up) once, not twice.
        rows = self._encode(ids, buffered, assigned) if len(ids) else None
        if rows is not None:  # every stored id was buffered until now
            self._sorted_rows = np.empty(len(self._sorted_ids), dtype=np.int64)
            self._sorted_rows[np.searchsorted(self._sorted_ids, ids)] = rows

    # -- data --------------------------------------------------------------------

    def _assign(self, in_ivf: np.ndarray) -> np.ndarray:
        """Inverted list of each vector (already in the lists' space)."""
        _, lists = self._ivf().quantizer.search(in_ivf, 1)
        return lists[:, 0]

    def _encode(self, ids: np.ndarray, vectors: np.ndarray, assigned=None) -> np.ndarray | None:
        """Put rows into the inverted lists (and their codes into the re-ranking
        store: their row numbers are returned). ``assigned``: the rows already in
        the lists' space and assigned, ``(in_ivf, lists, centroids or None)``."""
        ivf = self._ivf()
        if assigned is None:
            in_ivf = np.ascontiguousarray(self._ivf_space(vectors), dtype=np.float32)
            lists, centroids = self._assign(in_ivf), None
        else:
            in_ivf, lists, centroids = assigned
        # One assignment serves both the inverted lists and the re-ranking code.
        ivf.add_core(len(ids), faiss.swig_ptr(in_ivf), faiss.swig_ptr(np.ascontiguousarray(ids, dtype=np.int64)),
                     faiss.swig_ptr(np.ascontiguousarray(lists, dtype=np.int64)))
        self._index.ntotal = ivf.ntotal  # a pre-transform wrapper does not see add_core
        if not self._refining:
            return None
        return self._append_rows(self._encode_rows(in_ivf, lists, centroids), lists.astype(np.int32))

    def add(self, ids, vectors) -> None:
        ids, vectors = upsert_batch(ids, vectors, self.dim)
        if len(ids) == 0:
            return
        existing = in_sorted(self._sorted_ids, ids)
        if existing.any():
            self._drop(ids[existing])
        rows = self._encode(ids, vectors) if self._index is not None else None
        merged = np.concatenate([self._sorted_ids, ids])
        order = np.argsort(merged, kind="stable")  # a sorted run and a new batch
        self._sorted_ids = merged[order]
        if rows is not None:
            self._sorted_rows = np.concatenate([self._sorted_rows, rows])[order]
        if self._index is not None:
            return
        self._buffer_ids = np.concatenate([self._buffer_ids, ids])
        self._buffer_vectors = np.concatenate([self._buffer_vectors, vectors])
        if len(self._buffer_ids) >= self.params["train_size"]:
            self._train(self._buffer_vectors, buffer_is_training=True)

    def _drop(self, ids: np.ndarray) -> None:
        """Remove rows known to be stored."""
        keep = ~np.isin(self._sorted_ids, ids)
        if self._index is not None:
            self._index.remove_ids(ids)
            if self._refining:
                self._sorted_rows = self._sorted_rows[keep]
        else:
            buffered = ~np.isin(self._buffer_ids, ids)
            self._buffer_ids = self._buffer_ids[buffered]
            self._buffer_vectors = self._buffer_vectors[buffered]
        self._sorted_ids = self._sorted_ids[keep]
        if self._refining and self._index is not None:
            dead = len(self._codes) - len(self._sorted_rows)
            if dead > COMPACT_FRACTION * len(self._codes):
                self._compact()

    def remove(self, ids) -> int:
        ids = np.unique(as_ids(ids))
        present = ids[in_sorted(self._sorted_ids, ids)]
        if len(present):
            self._drop(present)
        return int(len(present))

    # -- search ------------------------------------------------------------------

    def _search_params(self, nprobe: int | None = None, selector=None):
        """Search parameters (and the objects they reference); ``nprobe`` and
        ``selector`` for filtered searches."""
        ivf_params = faiss.SearchParametersIVF()
        ivf_params.nprobe = int(nprobe or self.params["nprobe"])
        if selector is not None:
            ivf_params.sel = selector
        keep = [ivf_params]
        if self.params["quantizer"] == "hnsw":
            quantizer_params = faiss.SearchParametersHNSW()
            quantizer_params.efSearch = max(64, 2 * ivf_params.nprobe)
            ivf_params.quantizer_params = quantizer_params
            keep.append(quantizer_params)
        if not isinstance(self._index, faiss.IndexPreTransform):
            return ivf_params, keep
        params = faiss.SearchParametersPreTransform()
        params.index_params = ivf_params
        return params, keep

    def _search_buffer(self, queries: np.ndarray, k: int):
        scores = queries @ self._buffer_vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return self._buffer_ids[order], np.take_along_axis(scores, order, axis=1)

    def search(self, queries, k: int, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = as_vectors(queries, self.dim, allow_single=True)
        k = as_k(k)
        subset = as_subset(subset)
        out_ids, out_scores = empty_results(len(queries), k)
        members = None
        if subset is not None:
            wanted = subset.require_ids(self.backend)
            members = wanted[in_sorted(self._sorted_ids, wanted)]
        n = self.count()
        k_found = min(k, n if members is None else len(members))
        if not k_found or not len(queries):
            return out_ids, out_scores
        if members is not None:
            ids, scores = self._search_subset(queries, k_found, members)
        elif self._index is None:
            ids, scores = self._search_buffer(queries, k_found)
        else:
            fetch = min(n, k_found * (self.params["k_factor"] if self._refining else 1))
            params, _keep = self._search_params()
            scores, ids = self._index.search(queries, fetch, params=params)
            if self._refining:
                scores = self._rescore(queries, ids)
            ids, scores = _top_k(ids, scores, k_found)
        out_ids[:, :k_found] = ids
        out_scores[:, :k_found] = np.where(ids >= 0, scores, -np.inf)
        return out_ids, out_scores

    def _search_subset(self, queries: np.ndarray, k: int, members: np.ndarray):
        """(ids, scores) of the top ``k`` among ``members``, stored ids (``k <= len(members)``)."""
        if self._index is None:
            rows = np.flatnonzero(np.isin(self._buffer_ids, members))
            scores, found = top_k_in_rows(queries, faiss.swig_ptr(self._buffer_vectors), len(self._buffer_ids),
                                          rows, k)
            return self._buffer_ids[found], scores
        small = len(members) <= min(self.params["exact_subset_max"], self.count() / DECODE_COST_RATIO)
        if small and self._refining:
            return self._score_members(queries, members, k)
        nlist = int(self.params["nlist"])
        nprobe = nlist if small else int(np.ceil(self.params["nprobe"] * self.count() / len(members)))
        ids, scores = self._probe(queries, k, members, min(nlist, nprobe))
        short = np.flatnonzero(ids[:, -1] < 0)
        if len(short):  # the lists visited held fewer than k of the subset's rows
            ids[short], scores[short] = (self._score_members(queries[short], members, k) if self._refining
                                         else self._probe(queries[short], k, members, nlist))
        return ids, scores

    def _probe(self, queries: np.ndarray, k: int, members: np.ndarray, nprobe: int):
        """(ids, scores): the top ``k`` of the subset's rows in the ``nprobe`` nearest lists."""
        selector, _referenced = id_selector(members)
        params, _keep = self._search_params(nprobe, selector)
        fetch = min(len(members), k * (self.params["k_factor"] if self._refining else 1))
        scores, ids = self._index.search(queries, fetch, params=params)
        if self._refining:
            scores = self._rescore(queries, ids)
        return _top_k(ids, scores, k)

    def _score_members(self, queries: np.ndarray, members: np.ndarray, k: int, chunk: int = 1 << 16):
        """(ids, scores): the top ``k`` of ``members`` (stored ids, sorted), every one
        scored from its re-ranking code, a chunk of rows at a time."""
        in_ivf = self._ivf_space(queries)
        best_ids, best_scores = empty_results(len(queries), k)
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            vectors = self._decode_rows(self._sorted_rows[np.searchsorted(self._sorted_ids, part)])
            scores = in_ivf @ vectors.T
            best_ids, best_scores = _top_k(np.hstack([best_ids, np.broadcast_to(part, scores.shape)]),
                                           np.hstack([best_scores, scores]), k)
        return best_ids, best_scores

    def _rescore(self, queries: np.ndarray, ids: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Inner products of each query with its candidates' re-ranking vectors."""
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        in_ivf = self._ivf_space(queries)
        for start in range(0, len(queries), chunk):
            block = ids[start : start + chunk]
            valid = block >= 0
            unique = np.unique(block[valid])
            if not len(unique):
                continue
            rows = self._sorted_rows[np.searchsorted(self._sorted_ids, unique)]
            vectors = self._decode_rows(rows)
            gathered = vectors[np.searchsorted(unique, np.where(valid, block, unique[0]))]  # (chunk, fetch, dim)
            block_scores = np.einsum("qkd,qd->qk", gathered, in_ivf[start : start + chunk])
            scores[start : start + chunk] = np.where(valid, block_scores, -np.inf)
        return scores

    def candidates(self, queries, n: int) -> np.ndarray:
        """Ids of the ``n`` best PQ candidates per query, before any re-ranking
        (trained index only; for studying re-ranking codes)."""
        if self._index is None:
            raise VectorIndexError("the index is not trained yet")
        queries = as_vectors(queries, self.dim, allow_single=True)
        params, _keep = self._search_params()
        return self._index.search(queries, int(n), params=params)[1]

    def list_centroids(self, vectors) -> np.ndarray:
        """The centroid of the inverted list each vector falls into, in the lists'
        space (what residual re-ranking codes are taken from)."""
        if self._index is None:
            raise VectorIndexError("the index is not trained yet")
        in_ivf = self._ivf_space(as_vectors(vectors, self.dim))
        return self._centroids(self._assign(in_ivf))

    def count(self) -> int:
        return int(len(self._sorted_ids))

    def ids(self) -> np.ndarray:
        return self._sorted_ids.copy()

    # -- persistence -------------------------------------------------------------

    def _serialize_payload(self):
        nothing = (0, lambda fh: None)
        index_size, write_index = faiss_part(self._index) if self._index is not None else nothing
        codec_size, write_codec = faiss_part(self._codec) if self._codec is not None else nothing
        rows = len(self._codes) if self._refining and self._index is not None else 0
        code_size = self._codes.shape[1] if rows else 0
        return [
            _PARTS.pack(PAYLOAD_VERSION, index_size, codec_size, rows, code_size,
                        len(self._buffer_ids), len(self._sorted_ids)),
            write_index,
            write_codec,
            self._codes,
            self._lists.astype("<i4", copy=False),
            self._buffer_ids.astype("<i8", copy=False),
            self._buffer_vectors.astype("<f4", copy=False),
            self._sorted_ids.astype("<i8", copy=False),
            self._sorted_rows.astype("<i8", copy=False) if rows else b"",
        ]

    @classmethod
    def _deserialize_payload(cls, payload, *, dim: int, params: dict, count: int):
        obj = cls(dim, **params)
        try:
            version, index_len, codec_len, rows, code_size, n_buffered, n_ids = _PARTS.unpack_from(payload, 0)
            if version != PAYLOAD_VERSION:
                raise ValueError(f"payload format {version!r}, expected {PAYLOAD_VERSION!r}: rebuild the index")
            offset = _PARTS.size
            expected = (offset + index_len + codec_len + rows * (code_size + 4) + n_buffered * (8 + 4 * dim)
                        + 8 * n_ids + (8 * n_ids if rows else 0))
            if expected != len(payload):
                raise ValueError("payload length does not match its parts")

            def take(nbytes):
                nonlocal offset
                part = np.frombuffer(payload, dtype=np.uint8, count=nbytes, offset=offset)
                offset += nbytes
                return part

            index = faiss.deserialize_index(take(index_len)) if index_len else None
            codec = faiss.deserialize_index(take(codec_len)) if codec_len else None
            # The codes stay mapped from the file (read only): no second copy in memory.
            codes = take(rows * code_size).reshape(rows, code_size)
            lists = take(4 * rows).view("<i4").astype(np.int32)
            buffer_ids = take(8 * n_buffered).view("<i8").astype(np.int64)
            buffer_vectors = take(4 * dim * n_buffered).view("<f4").astype(np.float32).reshape(-1, dim)
            sorted_ids = take(8 * n_ids).view("<i8").astype(np.int64)
            sorted_rows = take(8 * n_ids).view("<i8").astype(np.int64) if rows else np.empty(0, np.int64)
        except Exception as exc:
            raise VectorIndexError(f"corrupt {cls.backend!r} payload: {exc}") from exc
        stored = 0
        if index is not None:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            if not isinstance(ivf, faiss.IndexIVFPQ) or index.d != dim:
                raise VectorIndexError(f"payload is not a {cls.backend!r} index")
            stored = index.ntotal
            if obj._refining and (len(sorted_rows) != stored or (len(sorted_rows) and sorted_rows.max() >= rows)):
                raise VectorIndexError("re-ranking store does not match the index")
        if stored + n_buffered != n_ids or (index is not None and n_buffered):
            raise VectorIndexError("payload does not match the file header")
        obj._index, obj._codec = index, codec
        obj._codes, obj._lists, obj._sorted_rows = codes, lists, sorted_rows
        obj._buffer_ids, obj._buffer_vectors = buffer_ids, buffer_vectors
        obj._sorted_ids = sorted_ids
        return obj
