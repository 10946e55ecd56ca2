"""A segmented index version: a large base segment, small delta segments of recent
additions and the tombstones of removals, searched as one index.

Why: rewriting and reloading a whole index file after every upload costs time in
proportion to the collection, not to the upload. A version is instead a manifest
(``segment_files.Manifest``) naming immutable segment files: a sync after an upload
writes one small delta and a new manifest; a web process loads only the segments it does
not hold yet; a background merge folds the deltas into a new base now and then.

Rules that make base + deltas answer exactly as one index with the same rows would:

* segments are ordered, oldest first; a **delta's tombstones remove keys from the older
  segments** only, and its rows replace the same keys in the older segments: the newest
  segment that has a key holds its row (``SegmentKeys.resolve``);
* a search asks each segment for its best rows, drops those a newer segment hides
  (asking again for more when too many were hidden), and keeps the best ``k`` of all
  (``SegmentedIndex.search``). For an exact base (``faiss-flat``) the result is the exact
  top-k of the live rows; deltas are exact float32 scans whatever the base backend;
* each segment's ``live`` count (rows no newer segment hides) is kept in the manifest, so
  the version's count needs no scan, and merging knows what it drops.

Merging (``plan_merge``, ``fold_deltas``, ``fold_into``, ``replace_runs``): a run of
consecutive segments is folded into one; the manifest that gets it is the newest one, in
which the run must still stand where it stood (deltas written meanwhile follow it and
keep hiding what they hid). So a merge runs beside the syncs and takes only the moment of
its commit from them.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

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
    in_sorted,
)
from search.core.vector_index.registry import create_index, get_backend
from search.core.vector_index.segment_files import (
    DeltaFile,
    Manifest,
    SegmentRef,
    open_base,
    read_delta,
    read_keys,
)

__all__ = [
    "ExactRows",
    "HeldSegment",
    "MergeConflict",
    "MergePlan",
    "MergePolicy",
    "SegmentKeys",
    "SegmentedIndex",
    "append_delta",
    "fold_deltas",
    "fold_into",
    "index_delta",
    "load_segment",
    "plan_merge",
    "replace_runs",
]

_EMPTY = np.empty(0, dtype=np.int64)


class MergeConflict(VectorIndexError):
    """The segments a merge folded are no longer where it found them (a rebuild, another merge)."""


# --------------------------------------------------------------------------
# Serving: segments held in memory and searched together
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldSegment:
    """One segment loaded for searching: the base's own index, or for a delta an exact
    ``faiss-flat`` index of its rows with its sorted keys and tombstones."""

    ref: SegmentRef
    index: VectorIndex
    keys: np.ndarray = field(default_factory=lambda: _EMPTY)
    tombstones: np.ndarray = field(default_factory=lambda: _EMPTY)

    @property
    def name(self) -> tuple[str, str]:
        """What identifies the segment across versions: its file and checksum."""
        return self.ref.file, self.ref.sha256


def load_segment(directory: str | os.PathLike, ref: SegmentRef, *, mapped: bool = False) -> HeldSegment:
    """Load one segment of a manifest in ``directory``, its checksum verified (``mapped``:
    a base's storage, or a delta's graph, mapped from its file where the backend allows it).
    A delta without a graph is scored exactly, with one matrix product."""
    path = Path(directory) / ref.file
    if ref.kind == "base":
        return HeldSegment(ref, open_base(path, ref.sha256, mapped=mapped))
    delta = read_delta(path, ref.sha256, vectors=not ref.index_file)
    if ref.index_file:
        index = open_base(Path(directory) / ref.index_file, ref.index_sha256, mapped=mapped)
    else:
        index = ExactRows(delta.keys, delta.vectors)
    return HeldSegment(ref, index, np.sort(delta.keys), delta.tombstones)


# The small deltas' live rows of a version are joined into one matrix up to this many rows.
JOIN_ROWS_MAX = 4096
# A delta graph: few rows, so a shorter candidate list reaches the recall of the base's.
# (Its rows are a small share of any query's neighbours: on 1M rows with 1 % in a graph
# delta, ef_search 16 gave the same top-10 as 64, in 0.15 instead of 0.35 ms.)
DELTA_GRAPH_PARAMS = {"m": 32, "ef_construction": 40, "ef_search": 16}


def index_delta(delta: DeltaFile) -> VectorIndex:
    """An HNSW graph of a delta's rows (searched in its place, for an approximate backend)."""
    index = create_index("faiss-hnsw", delta.dim, **DELTA_GRAPH_PARAMS)
    if delta.rows:
        index.add(delta.keys, delta.vectors)
    return index


class ExactRows:
    """A few rows searched exactly by one matrix product: for a small delta, cheaper than an
    index's own checks and copies, which cost more than the scan itself below a few
    thousand rows."""

    exact = True
    backend = "faiss-flat"

    def __init__(self, keys: np.ndarray, vectors: np.ndarray):
        self.keys = np.ascontiguousarray(keys, dtype=np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # a copy: the file may go

    def count(self) -> int:
        return len(self.keys)

    def ids(self) -> np.ndarray:
        return np.sort(self.keys)

    def search(self, queries: np.ndarray, k: int, subset: Subset | None = None):
        if len(queries) == 1 and subset is None and 0 < k <= len(self.keys):  # the common case, in few steps
            scores = self.vectors @ queries[0]
            best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(k)
            best = best[np.argsort(-scores[best], kind="stable")]
            return self.keys[best][None, :], scores[best][None, :]
        out_ids, out_scores = empty_results(len(queries), k)
        scores = queries @ self.vectors.T
        if subset is not None:
            scores[:, ~in_sorted(subset.require_ids(self.backend), self.keys)] = -np.inf
        take = min(k, scores.shape[1])
        if take:
            part = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < scores.shape[1] else \
                np.broadcast_to(np.arange(take), scores.shape)
            best = np.take_along_axis(scores, part, axis=1)
            order = np.argsort(-best, axis=1, kind="stable")
            rows, best = np.take_along_axis(part, order, axis=1), np.take_along_axis(best, order, axis=1)
            out_ids[:, :take] = np.where(np.isfinite(best), self.keys[rows], -1)
            out_scores[:, :take] = best
        return out_ids, out_scores


class SegmentedIndex(VectorIndex):
    """The rows of one version: its base and deltas, with what newer segments hide dropped.

    Read-only (a version never changes; a writer appends a delta and a new manifest). The
    backend, parameters and exactness are the base's; ``count`` is the manifest's.
    """

    def __init__(self, manifest: Manifest, segments: list[HeldSegment]):
        super().__init__(manifest.dim, **manifest.params)
        if [s.name for s in segments] != [(r.file, r.sha256) for r in manifest.segments]:
            raise VectorIndexError("the segments given are not those the manifest names")
        self.manifest = manifest
        self.segments = [HeldSegment(ref, s.index, s.keys, s.tombstones) for ref, s in zip(manifest.segments, segments)]
        base = self.segments[0].index
        self.backend = manifest.backend
        self.exact = base.exact
        self.snapshot_files = base.snapshot_files
        self.sql_subsets = getattr(base, "sql_subsets", False)
        self.search_param_names = frozenset()
        # hidden[i]: the keys newer segments hold or remove, sorted.
        hidden, newer = [], _EMPTY
        for segment in reversed(self.segments):
            hidden.append(newer)
            if len(segment.keys) or len(segment.tombstones):
                newer = np.union1d(newer, np.union1d(segment.keys, segment.tombstones))
        self._hidden = hidden[::-1]
        self._parts = self._search_parts()

    def _search_parts(self) -> list["_Part"]:
        """What a search asks, oldest first: each segment with rows live, with the keys newer
        segments hide when it has any hidden; the small deltas' live rows joined into one
        matrix (one product instead of one per delta, nothing to hide)."""
        parts, keys, vectors, joined = [], [], [], 0
        for segment, hidden in zip(self.segments, self._hidden):
            ref, index = segment.ref, segment.index
            if ref.live <= 0:
                continue
            if isinstance(index, ExactRows) and joined + index.count() <= JOIN_ROWS_MAX:
                keep = ~in_sorted(hidden, index.keys) if ref.live < ref.rows else slice(None)
                keys.append(index.keys[keep])
                vectors.append(index.vectors[keep])
                joined += index.count()
                continue
            parts.append(_Part(index, hidden if ref.live < ref.rows else _EMPTY, ref.rows, ref.live,
                               ref.kind == "base"))
        if keys:
            rows = ExactRows(np.concatenate(keys), np.concatenate(vectors))
            parts.append(_Part(rows, _EMPTY, rows.count(), rows.count(), False))
        return parts

    @property
    def base_index(self) -> VectorIndex:
        return self.segments[0].index

    def add(self, ids, vectors) -> None:
        raise VectorIndexError("a segmented version is read-only: a writer appends a delta")

    def remove(self, ids) -> int:
        raise VectorIndexError("a segmented version is read-only: a writer appends a delta")

    def count(self) -> int:
        return int(self.manifest.count)

    def ids(self) -> np.ndarray:
        parts = []
        for segment, hidden in zip(self.segments, self._hidden):
            keys = segment.keys if segment.ref.kind == "delta" else segment.index.ids()
            parts.append(keys[~in_sorted(hidden, keys)] if len(hidden) else keys)
        return np.sort(np.concatenate(parts)) if parts else _EMPTY.copy()

    def search(self, queries, k: int, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = as_vectors(queries, self.dim, allow_single=True)
        k = as_k(k)
        subset = as_subset(subset)
        parts = self._parts
        pool = _pool() if sum(p.rows for p in parts if not p.base) >= PARALLEL_MIN_ROWS else None
        if pool is not None and len(parts) > 1 and parts[0].base:
            # The deltas on another thread while this one walks the base (FAISS and numpy
            # let go of the GIL), so large deltas add little to a search's time.
            deltas = pool.submit(lambda: [_search_live(p, queries, k, subset) for p in parts[1:]])
            found = [_search_live(parts[0], queries, k, subset)] + deltas.result()
        else:
            found = [_search_live(part, queries, k, subset) for part in parts]
        if len(found) == 1 and found[0][0].shape[1] == k:
            return found[0]
        out_ids, out_scores = empty_results(len(queries), k)
        if not found or not len(queries):
            return out_ids, out_scores
        ids = np.concatenate([f[0] for f in found], axis=1)
        scores = np.concatenate([f[1] for f in found], axis=1)
        if len(found) > 1:
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
        width = min(k, ids.shape[1])
        out_ids[:, :width], out_scores[:, :width] = ids[:, :width], scores[:, :width]
        return out_ids, out_scores

    def _serialize_payload(self):
        raise VectorIndexError("a segmented version is saved as its manifest and segment files")

    @classmethod
    def _deserialize_payload(cls, payload, *, dim: int, params: dict, count: int):
        raise VectorIndexError("a segmented version is opened from its manifest")


# Deltas holding at least this many rows together are searched beside the base, on a
# thread of their own ($VECTOR_INDEX_SEGMENT_THREADS threads per process; 0: never).
PARALLEL_MIN_ROWS = 2048
THREADS_ENV_VAR = "VECTOR_INDEX_SEGMENT_THREADS"
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor | None:
    """This process's threads for delta searches (made again in a forked child)."""
    try:
        threads = int(os.environ.get(THREADS_ENV_VAR, "2"))
    except ValueError:
        threads = 2
    if threads <= 0:
        return None
    pid = os.getpid()
    pool = _pools.get(pid)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(pid)
            if pool is None:
                pool = _pools[pid] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="segment-search")
    return pool


@dataclass(frozen=True)
class _Part:
    """One search of a version: an index, the keys newer segments hide in it, its rows, and
    how many of them are live."""

    index: object
    hidden: np.ndarray
    rows: int
    live: int
    base: bool


def _search_live(part: _Part, queries: np.ndarray, k: int, subset):
    """(ids, scores), (Q, ≤ k) each, best first: the part's best rows that no newer
    segment hides; -1 / -inf where it has no more."""
    index, hidden = part.index, part.hidden
    want = min(k, part.live)
    if not len(hidden):
        return index.search(queries, want, subset)
    # Ask for twice as many more as the share of hidden rows would hide among them (none
    # at 1 %: a row more costs an IVF-PQ index 32 re-ranked codes), and again for more when
    # a query still has fewer than ``want`` live ones.
    share = (part.rows - part.live) / max(part.rows, 1)
    fetch = min(part.rows, want + round(2 * want * share))
    while True:
        ids, scores = index.search(queries, fetch, subset)
        exhausted = ids[:, -1] < 0
        dead = (ids >= 0) & in_sorted(hidden, ids.ravel()).reshape(ids.shape)
        live = (ids >= 0) & ~dead
        if fetch >= part.rows or bool(np.all((live.sum(axis=1) >= want) | exhausted)):
            break
        fetch = min(part.rows, 2 * fetch)
    scores = np.where(live, scores, -np.inf).astype(np.float32)
    order = np.argsort(~live, axis=1, kind="stable")[:, :want]  # live rows first, in their order
    return (np.where(np.take_along_axis(live, order, axis=1), np.take_along_axis(ids, order, axis=1), -1),
            np.take_along_axis(scores, order, axis=1))


# --------------------------------------------------------------------------
# Writing: which keys a version holds, and a new delta on top of it
# --------------------------------------------------------------------------


class SegmentKeys:
    """The keys each segment of a version holds (and a delta's tombstones), read without
    any vector: what a writer needs to tell which rows an addition replaces, which
    removals remove something, and how the live counts change.

    The base's keys come from its ``.keys`` file (mapped: a lookup touches a few pages),
    or for a table-backed base from ``present(keys) -> bool mask``.
    """

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]],
                 present: Callable[[np.ndarray], np.ndarray] | None = None):
        self.layers = layers
        self.present = present

    @classmethod
    def read(cls, manifest: Manifest, directory: str | os.PathLike,
             present: Callable[[np.ndarray], np.ndarray] | None = None) -> "SegmentKeys":
        directory = Path(directory)
        base = manifest.base
        if base.table:
            if present is None:
                raise VectorIndexError("a table-backed base needs a way to tell which keys it holds")
            layers = [(_EMPTY, _EMPTY)]
        else:
            layers = [(read_keys(directory / base.keys_file, base.keys_sha256), _EMPTY)]
            present = None
        for ref in manifest.deltas:
            delta = read_delta(directory / ref.file, ref.sha256, vectors=False)
            layers.append((np.sort(delta.keys), delta.tombstones))
        return cls(layers, present)

    def resolve(self, keys) -> np.ndarray:
        """For each key, the segment holding its live row (-1: none does)."""
        keys = as_ids(keys)
        where = np.full(len(keys), -1, dtype=np.int64)
        open_ = np.ones(len(keys), dtype=bool)
        for i in range(len(self.layers) - 1, -1, -1):
            stored, removed = self.layers[i]
            if i == 0 and self.present is not None:
                hit = open_ & self.present(keys)
            else:
                hit = open_ & in_sorted(stored, keys)
            where[hit] = i
            open_ &= ~hit
            if len(removed):
                open_ &= ~in_sorted(removed, keys)
            if not open_.any():
                break
        return where

    def live_keys(self) -> np.ndarray:
        """Every live key, sorted (a scan of all keys: for checks, not for syncs)."""
        if self.present is not None:
            raise VectorIndexError("a table-backed base lists its keys itself")
        parts, newer = [], _EMPTY
        for stored, removed in reversed(self.layers):
            parts.append(stored[~in_sorted(newer, stored)] if len(newer) else stored)
            newer = np.union1d(newer, np.union1d(stored, removed))
        return np.sort(np.concatenate(parts)) if parts else _EMPTY.copy()


def append_delta(manifest: Manifest, keys_now: SegmentKeys, keys, vectors, removed,
                 write: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[str, str, int]],
                 source: dict) -> Manifest | None:
    """The manifest after one more delta: rows ``keys``/``vectors`` (added or replacing
    rows of older segments) and the keys ``removed`` (only those still live become
    tombstones). ``write(keys, vectors, tombstones)`` writes the delta file and returns
    (file name, sha256, bytes). None when nothing in the index would change (and nothing
    is written)."""
    keys = as_ids(keys)
    vectors = as_vectors(vectors, manifest.dim) if len(keys) else np.empty((0, manifest.dim), np.float32)
    if len(np.unique(keys)) != len(keys):
        raise VectorIndexError("a delta's keys must be unique")
    removed = np.setdiff1d(as_ids(removed), keys)
    held_removed = keys_now.resolve(removed)
    tombstones = removed[held_removed >= 0]
    if not len(keys) and not len(tombstones):
        return None
    hidden = np.concatenate([keys_now.resolve(keys), held_removed])
    lost = np.bincount(hidden[hidden >= 0], minlength=len(manifest.segments))
    segments = [_with_live(ref, ref.live - int(n)) for ref, n in zip(manifest.segments, lost)]
    name, sha256, size = write(keys, vectors, tombstones)
    segments.append(SegmentRef("delta", name, sha256, size, rows=len(keys), live=len(keys),
                               tombstones=len(tombstones)))
    return manifest.with_changes(segments=tuple(segments), count=sum(s.live for s in segments), source=source)


def _with_live(ref: SegmentRef, live: int) -> SegmentRef:
    if live < 0:
        raise VectorIndexError(f"segment {ref.file} would have {live} live rows")
    return replace(ref, live=live)


# --------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MergePolicy:
    """When a merge is due (the thresholds are settings of the portal).

    ``delta_fraction``: fold the deltas into a new base once they hold this share of the
    base's rows; ``tombstone_fraction``: once this share of the base's rows is hidden
    (removed or replaced); neither below ``min_rows`` rows. ``max_deltas``: fold small
    deltas together past this many. ``rebuild_growth``: a backend that learns from its
    rows (IVF-PQ's centroids and codebooks) is rebuilt from scratch, not merged into,
    once the version holds this many times the rows its base was built with.
    ``graph_rows``: for an approximate backend, a delta of this many rows is given an HNSW
    graph (on two cores a scan of ten thousand rows costs about what a search of a
    million-row graph does).
    """

    delta_fraction: float = 0.01
    tombstone_fraction: float = 0.02
    min_rows: int = 1000
    max_deltas: int = 8
    rebuild_growth: float = 4.0
    graph_rows: int = 4096  # a delta of an approximate backend this large gets a graph (0: never)


@dataclass(frozen=True)
class MergePlan:
    """``kind``: "rebuild" (a new base from the source of rows), "base" (everything folded
    into a new base) or "deltas" (each of ``runs``, consecutive deltas, folded into one)."""

    kind: str
    runs: tuple[tuple[int, int], ...]  # [start, stop) of the manifest's segments
    reason: str


def plan_merge(manifest: Manifest, policy: MergePolicy) -> MergePlan | None:
    """What merge the version is due for, if any."""
    base = manifest.base
    if base.table:
        return None  # table-backed: rows are written in place, there are no deltas
    everything = ((0, len(manifest.segments)),)
    learns = get_backend(manifest.backend).train is not VectorIndex.train
    if learns and base.built_rows and manifest.count >= max(policy.min_rows, policy.rebuild_growth * base.built_rows):
        return MergePlan("rebuild", everything,
                         f"{manifest.count} rows, {policy.rebuild_growth:g}× the {base.built_rows} it was built with")
    delta_rows = sum(ref.rows for ref in manifest.deltas)
    if manifest.deltas and delta_rows >= max(policy.min_rows, policy.delta_fraction * base.rows):
        return MergePlan("base", everything, f"{delta_rows} rows in deltas over {base.rows} in the base")
    hidden = base.rows - base.live
    if hidden and hidden >= max(policy.min_rows, policy.tombstone_fraction * base.rows):
        return MergePlan("base", everything, f"{hidden} of the base's {base.rows} rows removed or replaced")
    runs, reasons = [], []
    if len(manifest.deltas) > policy.max_deltas:
        runs = [(a + 1, b + 1) for a, b in _delta_runs([ref.rows for ref in manifest.deltas],
                                                        max(1, policy.max_deltas // 2))]
        reasons.append(f"{len(manifest.deltas)} deltas, more than {policy.max_deltas}")
    if policy.graph_rows and not get_backend(manifest.backend).exact:
        bare = [i for i, ref in enumerate(manifest.segments) if ref.kind == "delta" and not ref.index_file
                and ref.rows >= policy.graph_rows and not any(a <= i < b for a, b in runs)]
        if bare:
            runs = sorted(runs + [(i, i + 1) for i in bare])
            reasons.append(f"{len(bare)} delta(s) of {policy.graph_rows}+ rows to give a graph")
    if runs:
        return MergePlan("deltas", tuple(runs), "; ".join(reasons))
    return None


def _delta_runs(rows: list[int], target: int) -> list[tuple[int, int]]:
    """Runs of consecutive deltas to fold so that ``target`` remain: the adjacent pair with
    the fewest rows is joined first, so each row is rewritten about log(n) times."""
    groups = [[i, i + 1, r] for i, r in enumerate(rows)]
    while len(groups) > target:
        j = min(range(len(groups) - 1), key=lambda g: groups[g][2] + groups[g + 1][2])
        groups[j : j + 2] = [[groups[j][0], groups[j + 1][1], groups[j][2] + groups[j + 1][2]]]
    return [(a, b) for a, b, _ in groups if b - a > 1]


def fold_deltas(deltas: list[DeltaFile]) -> DeltaFile:
    """One delta equal to ``deltas`` applied in order (oldest first): the newest row of each
    key, rows a later delta removed dropped, and every tombstone (they still remove keys
    from the segments older than the run)."""
    if not deltas:
        raise VectorIndexError("nothing to fold")
    dim = deltas[0].dim
    keys = np.concatenate([d.keys for d in deltas]) if deltas else _EMPTY
    vectors = np.concatenate([d.vectors for d in deltas]) if deltas else np.empty((0, dim), np.float32)
    # Which delta each row is from, and the last delta that removes each row's key.
    origin = np.repeat(np.arange(len(deltas)), [d.rows for d in deltas])
    killed_after = np.full(len(keys), -1)
    for j, d in enumerate(deltas):
        if len(d.tombstones):
            killed_after[in_sorted(d.tombstones, keys)] = j
    alive = killed_after <= origin  # only a tombstone of a later delta removes the row
    newest = np.zeros(len(keys), dtype=bool)
    _, last = np.unique(keys[::-1], return_index=True)
    newest[len(keys) - 1 - last] = True
    keep = alive & newest
    tombstones = np.unique(np.concatenate([d.tombstones for d in deltas]))
    return DeltaFile(dim, keys[keep], tombstones, np.ascontiguousarray(vectors[keep]))


def fold_into(index: VectorIndex, deltas: list[DeltaFile]) -> None:
    """Apply ``deltas`` (oldest first) to ``index`` (a writable base) in place."""
    folded = fold_deltas(deltas)
    gone = np.union1d(folded.tombstones, folded.keys)
    if len(gone):
        index.remove(gone)
    if folded.rows:
        index.add(folded.keys, folded.vectors)


def replace_runs(snapshot: Manifest, current: Manifest, folded: dict[tuple[int, int], SegmentRef],
                 base_live: int | None = None) -> Manifest:
    """``current`` (the newest version) with each run of ``snapshot``'s segments replaced by
    the segment it was folded into. The run's live rows are the folded segment's, unless
    ``base_live`` says how many of a new base's rows are live (a rebuild from the source of
    rows, not a fold of the run).

    ``current`` must still begin with ``snapshot``'s segments (deltas written since follow
    them); else MergeConflict."""
    old = [(r.file, r.sha256) for r in snapshot.segments]
    if [(r.file, r.sha256) for r in current.segments[: len(old)]] != old:
        raise MergeConflict("the index was rewritten while the merge ran")
    segments, position = [], 0
    for (start, stop), ref in sorted(folded.items()):
        segments.extend(current.segments[position:start])
        live = base_live if start == 0 and base_live is not None else sum(r.live for r in current.segments[start:stop])
        segments.append(_with_live(ref, live))
        position = stop
    segments.extend(current.segments[position:])
    return current.with_changes(segments=tuple(segments), count=sum(s.live for s in segments))
