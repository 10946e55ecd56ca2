"""Merging an index's segments, in a worker, beside the syncs and off the serving path.

What is due comes from ``segments.plan_merge`` (thresholds in the settings:
INDEX_MERGE_DELTA_FRACTION, INDEX_MERGE_TOMBSTONE_FRACTION, INDEX_MERGE_MIN_ROWS,
INDEX_MERGE_MAX_DELTAS, INDEX_REBUILD_GROWTH): fold small deltas together, fold every delta
into a new base (dropping what tombstones and replacements hid), or, for a backend that
learns from its rows (IVF-PQ), rebuild the base from Postgres.

``merge_index``:

1. takes the index's merge lock (a session advisory lock: one merge at a time, released
   with the connection if the process dies) and removes what a killed merge left;
2. reads the newest version, the snapshot, and plans;
3. with no lock a sync waits for, loads what it folds, folds it and writes the new segment
   files (named ``merge-…``: syncs and prunes leave those alone while a merge may run);
4. takes the index's writer lock for a moment: the newest version is now the snapshot plus
   the deltas synced meanwhile, which stay on top; the folded run is replaced in it, the
   manifest written and its ``IndexBuild`` committed.

Searches go on answering from the versions before it until web processes have opened the
new one. A merge killed at any step leaves the last committed version served; its files
are removed by the next merge (or, an hour later, by the reconciler).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from django.db import connection, transaction

from embeddings.models import EmbeddingModel
from search import index_sync
from search.core.vector_index.base import in_sorted
from search.core.vector_index.registry import get_backend
from search.core.vector_index.segment_files import Manifest, SegmentRef, open_base, read_delta, read_keys, write_delta
from search.core.vector_index.segments import (
    MergeConflict,
    MergePlan,
    fold_deltas,
    fold_into,
    index_delta,
    plan_merge,
    replace_runs,
)
from search.models import IndexBuild

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    modality: str
    kind: str = ""  # what was done: "deltas", "base", "rebuild" ("" when nothing)
    reason: str = ""
    version: int | None = None  # the version it committed
    rows: int = 0  # rows of the segments it wrote
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: str = ""  # why nothing was done
    merge_due: str = ""  # what a next merge would do

    def as_dict(self) -> dict:
        return asdict(self)


def merge_index(model: EmbeddingModel, modality: str, *, plan: MergePlan | None = None) -> MergeResult:
    """Run the merge the newest version of the index is due for (or ``plan``)."""
    started = time.perf_counter()
    key = index_sync.merge_lock_key(model, modality)
    if not _session_lock(key):
        return MergeResult(modality, skipped="another merge of this index is running")
    written: list[Path] = []
    try:
        _remove_leftovers(model, modality)
        version = index_sync.latest_version(model, modality)
        if version is None or version.manifest is None:
            return MergeResult(modality, skipped="no segmented version to merge")
        plan = plan or plan_merge(version.manifest, index_sync.merge_policy())
        if plan is None:
            return MergeResult(modality, skipped="no merge is due")
        folded, base = _fold(model, modality, version, plan, written)
        with transaction.atomic():
            index_sync.lock_index(model, modality)
            current = index_sync.latest_version(model, modality)
            if current is None or current.manifest is None:
                raise MergeConflict("the index has no segmented version any more")
            base_live = _rebuilt_base_live(version.manifest, current, folded) if plan.kind == "rebuild" else None
            manifest = replace_runs(version.manifest, current.manifest, folded, base_live)
            if base is not None:  # training may have set parameters (IVF-PQ's nlist)
                manifest = manifest.with_changes(backend=base.backend, params=base.params)
            number = index_sync.next_version(model, modality)
            build = index_sync.commit_version(model, modality, number, manifest)
        index_sync.prune_versions(model, modality)
    except MergeConflict as exc:
        for path in written:
            path.unlink(missing_ok=True)
        return MergeResult(modality, plan.kind if plan else "", skipped=str(exc),
                           seconds=round(time.perf_counter() - started, 3))
    finally:
        _session_unlock(key)
    next_plan = plan_merge(manifest, index_sync.merge_policy())
    result = MergeResult(modality, plan.kind, plan.reason, build.version,
                         rows=sum(ref.rows for ref in folded.values()),
                         bytes_written=sum(path.stat().st_size for path in written if path.exists()),
                         seconds=round(time.perf_counter() - started, 3),
                         merge_due=next_plan.kind if next_plan else "")
    log.info("index %s: %s merge (%s) in %.1f s, %s bytes written", build, plan.kind, plan.reason, result.seconds,
             result.bytes_written)
    return result


def _fold(model, modality, version: index_sync.Version, plan: MergePlan, written: list[Path]):
    """Write the segment each run of the plan folds into: ({run: its reference}, the new
    base's index or None)."""
    manifest, directory = version.manifest, version.directory
    if plan.kind == "deltas":
        policy = index_sync.merge_policy()
        graphs = policy.graph_rows and not get_backend(manifest.backend).exact
        folded = {}
        for start, stop in plan.runs:
            delta = fold_deltas([read_delta(directory / ref.file, ref.sha256) for ref in manifest.segments[start:stop]])
            stem = f"{index_sync.MERGE_PREFIX}delta-{version.build.version:06d}-{secrets.token_hex(4)}"
            sha = write_delta(directory / f"{stem}.vdelta", manifest.dim, delta.keys, delta.vectors, delta.tombstones)
            written.append(directory / f"{stem}.vdelta")
            graph = graph_sha = ""
            if graphs and delta.rows >= policy.graph_rows:  # searched through a graph, not scanned
                graph = f"{stem}.graph.vidx"
                written.append(directory / graph)
                graph_sha = index_delta(delta).save(directory / graph)
            size = sum((directory / name).stat().st_size for name in (f"{stem}.vdelta", graph) if name)
            folded[(start, stop)] = SegmentRef("delta", f"{stem}.vdelta", sha, size, rows=delta.rows, live=0,
                                               tombstones=len(delta.tombstones), index_file=graph,
                                               index_sha256=graph_sha)
        return folded, None
    name = f"{index_sync.MERGE_PREFIX}base-{version.build.version:06d}-{secrets.token_hex(4)}.vidx"
    if plan.kind == "base":
        index = open_base(directory / manifest.base.file, manifest.base.sha256)  # a writable copy
        fold_into(index, [read_delta(directory / ref.file, ref.sha256) for ref in manifest.deltas])
        built_rows = manifest.base.built_rows
    else:  # rebuild: a base learnt afresh from every stored vector
        index = index_sync.base_from_postgres(model, modality)
        built_rows = None
    written.extend([directory / name, directory / f"{name}.keys"])
    ref = index_sync.write_base(directory, name, index, built_rows)
    return {(0, len(manifest.segments)): ref}, index


def _rebuilt_base_live(snapshot: Manifest, current: index_sync.Version, folded: dict) -> int:
    """How many rows of a base rebuilt from Postgres no delta synced meanwhile hides."""
    (ref,) = folded.values()
    keys = read_keys(current.directory / ref.keys_file, ref.keys_sha256)
    hidden = np.zeros(len(keys), dtype=bool)
    for newer in current.manifest.segments[len(snapshot.segments):]:
        delta = read_delta(current.directory / newer.file, newer.sha256, vectors=False)
        hidden |= in_sorted(np.sort(delta.keys), keys) | in_sorted(delta.tombstones, keys)
    return int(len(keys) - hidden.sum())


def _remove_leftovers(model, modality) -> None:
    """What a killed merge left: its temp files, and its files no version names (under the
    merge lock, so no merge is writing them)."""
    directory = index_sync.index_dir(model, modality)
    if not directory.is_dir():
        return
    named, complete = index_sync.referenced_files(IndexBuild.objects.filter(model=model, modality=modality))
    for path in directory.iterdir():
        if path.name.startswith(f".{index_sync.MERGE_PREFIX}") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        elif complete and path.name.startswith(index_sync.MERGE_PREFIX) and path.resolve() not in named:
            log.info("removing %s, left by an interrupted merge", path)
            path.unlink(missing_ok=True)


def _session_lock(key: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        return bool(cursor.fetchone()[0])


def _session_unlock(key: int) -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [key])
    except Exception as exc:  # the connection went: so did its lock
        log.warning("releasing the merge lock: %s", exc)
