"""Writing the vector indices: keeping them in step with the vectors in Postgres.

Two indices per embedding model: ``image`` (rows keyed by asset id, for text→image and
image→image) and ``caption`` (rows keyed by caption id, for image→text). Workers write
new index versions, recorded as ``IndexBuild`` rows; web processes load them
(``search.serving``) and swap a newer one in without a restart.

A version is a **manifest** naming immutable segment files
(``search.core.vector_index.segments``): a base segment and small deltas. A sync after an
upload reads what changed since the newest version's cursor (``search.index_changes``:
new vectors by id, removals from the trigger-kept log), writes them as one delta and a
new manifest, and commits the ``IndexBuild``: its cost follows the upload, not the
collection. Folding deltas into the base is a merge (``search.index_merge``), due when
thresholds pass (``SyncResult.merge_due``), run by a worker beside the syncs.

Table-backed backends (pgvector, milvus: ``snapshot_files = False``) get their rows
written in place in the same sync; their manifest names the same base file, with the
new cursor and count.

Versions written before segments (one index file each) are still served; the first sync
after them writes a base segment from that file and the changes since, once.

Crashes: every file is written to a temp name and renamed; the ``IndexBuild`` row is
committed last, in the transaction that holds the index's advisory lock. A writer killed
at any point leaves the last committed version served; its temp files are removed by the
next writer, files it renamed but never committed by the prune that follows the next sync.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import connection, connections, transaction

from embeddings.models import Embedding, EmbeddingModel
from search import index_changes
from search.core.vector_index import VectorIndex, VectorIndexError, create_index, get_backend, load_index
from search.core.vector_index.base import in_sorted
from search.core.vector_index.segment_files import (
    Manifest,
    SegmentRef,
    read_manifest,
    write_delta,
    write_keys,
    write_manifest,
)
from search.core.vector_index.segments import (
    MergePolicy,
    SegmentedIndex,
    SegmentKeys,
    append_delta,
    load_segment,
    plan_merge,
)
from search.index_changes import ChangeCursor
from search.models import IndexBuild

log = logging.getLogger(__name__)


MODALITIES = (IndexBuild.Modality.IMAGE, IndexBuild.Modality.CAPTION)


FETCH_CHUNK = 5000

MANIFEST_SUFFIX = ".manifest"
MERGE_PREFIX = "merge-"  # files a merge writes; only it removes them while it may be running


def _embedding_rows(model: EmbeddingModel, modality: str):
    rows = Embedding.objects.filter(model=model)
    if modality == IndexBuild.Modality.IMAGE:
        return rows.filter(asset__isnull=False), "asset_id"
    return rows.filter(caption__isnull=False), "caption_id"


def stored_ids(model: EmbeddingModel, modality: str) -> np.ndarray:
    rows, key = _embedding_rows(model, modality)
    return np.fromiter(rows.values_list(key, flat=True), dtype=np.int64)


def _vectors_by_id(model: EmbeddingModel, modality: str, ids) -> dict[int, np.ndarray]:
    rows, key = _embedding_rows(model, modality)
    ids = [int(i) for i in ids]
    found: dict[int, np.ndarray] = {}
    for start in range(0, len(ids), FETCH_CHUNK):
        chunk = ids[start : start + FETCH_CHUNK]
        for row_id, blob in rows.filter(**{f"{key}__in": chunk}).values_list(key, "vector"):
            found[row_id] = np.frombuffer(bytes(blob), dtype="<f4")
    return found


def _stack(model: EmbeddingModel, vectors: list) -> np.ndarray:
    if not vectors:
        return np.zeros((0, model.dimension), dtype=np.float32)
    return np.stack(vectors).astype(np.float32, copy=False)


def stored_vectors(model: EmbeddingModel, modality: str, ids) -> np.ndarray:
    """Vectors of the given row ids, in that order (every one must be stored)."""
    found = _vectors_by_id(model, modality, ids)
    missing = [int(i) for i in ids if int(i) not in found]
    if missing:
        raise LookupError(f"no {modality} vector of {model} for ids {missing[:10]}")
    return _stack(model, [found[int(i)] for i in ids])


def current_vectors(model: EmbeddingModel, modality: str, ids) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of those of the given row ids still stored, in that order: a row
    deleted since its id was read is left out (its asset is gone)."""
    found = _vectors_by_id(model, modality, ids)
    kept = np.asarray([int(i) for i in ids if int(i) in found], dtype=np.int64)
    return kept, _stack(model, [found[int(i)] for i in kept])


def latest_build(model: EmbeddingModel, modality: str) -> IndexBuild | None:
    return (
        IndexBuild.objects.filter(model=model, modality=modality, status=IndexBuild.Status.READY)
        .order_by("-version")
        .first()
    )


def index_dir(model: EmbeddingModel, modality: str) -> Path:
    return Path(settings.INDEX_DIR) / f"model-{model.pk}" / modality


# --- versions: reading them -------------------------------------------------------------


def is_manifest(build: IndexBuild) -> bool:
    return Path(build.file_path).suffix == MANIFEST_SUFFIX


def mark_version_failed(build: IndexBuild, exc: Exception) -> None:
    log.warning("index %s unusable (%s); trying an older version", build, exc)
    IndexBuild.objects.filter(pk=build.pk).update(status=IndexBuild.Status.FAILED, error=str(exc)[:2000])


def ready_builds(model: EmbeddingModel, modality: str):
    return IndexBuild.objects.filter(model=model, modality=modality,
                                     status=IndexBuild.Status.READY).order_by("-version")


def open_version(build: IndexBuild, held: dict | None = None, *, mapped: bool = False) -> VectorIndex:
    """The index of one version, its files' checksums verified. ``held``: segments already
    loaded (by (file, sha256)), reused instead of loaded again; the segments of this version
    are added to it. A version written before segments is one index file."""
    if not is_manifest(build):
        return load_index(build.file_path, checksum=build.checksum)
    path = Path(build.file_path)
    manifest = read_manifest(path, build.checksum)
    segments = []
    for ref in manifest.segments:
        segment = None if held is None else held.get((ref.file, ref.sha256))
        if segment is None:
            segment = load_segment(path.parent, ref, mapped=mapped)
            if held is not None:
                held[(ref.file, ref.sha256)] = segment
        segments.append(segment)
    return SegmentedIndex(manifest, segments)


def load_latest_valid(model: EmbeddingModel, modality: str) -> tuple[VectorIndex | None, IndexBuild | None]:
    """The newest ready version whose files load and match their checksums (torn or missing
    ones are marked failed and an older one is tried)."""
    for build in ready_builds(model, modality):
        try:
            return open_version(build), build
        except Exception as exc:  # a missing or torn file: fall back to the previous version
            mark_version_failed(build, exc)
    return None, None


@dataclass
class Version:
    """The newest readable version, as a writer sees it: its manifest (None for a version
    written before segments) and folder."""

    build: IndexBuild
    manifest: Manifest | None

    @property
    def directory(self) -> Path:
        return Path(self.build.file_path).parent


def latest_version(model: EmbeddingModel, modality: str) -> Version | None:
    """The newest ready version whose manifest reads and matches its checksum (a writer
    checks the small files it reads itself; the base's checksum is the loaders')."""
    for build in ready_builds(model, modality):
        if not is_manifest(build):
            return Version(build, None)
        try:
            return Version(build, read_manifest(build.file_path, build.checksum))
        except Exception as exc:
            mark_version_failed(build, exc)
    return None


def indexed_ids(model: EmbeddingModel, modality: str) -> tuple[np.ndarray, IndexBuild | None]:
    """The ids the newest good version holds, read from its keys files where it has them
    (no vectors loaded); for checks that compare them with Postgres."""
    version = latest_version(model, modality)
    while version is not None:
        try:
            if version.manifest is not None and not version.manifest.base.table:
                return SegmentKeys.read(version.manifest, version.directory).live_keys(), version.build
            return open_version(version.build).ids(), version.build
        except Exception as exc:
            mark_version_failed(version.build, exc)
            version = latest_version(model, modality)
    return np.zeros(0, dtype=np.int64), None


def database_connection(alias: str = "default"):
    """The psycopg connection of a Django database alias, for the pgvector backend
    (``search.core.vector_index.pgvector.set_connection_provider``, set as the app starts)."""
    wrapper = connections[alias]
    wrapper.ensure_connection()
    return wrapper.connection


def _lock_key(model: EmbeddingModel, modality: str) -> int:
    return (model.pk << 4) | MODALITIES.index(modality)


def merge_lock_key(model: EmbeddingModel, modality: str) -> int:
    """The advisory lock a merge of the index holds while it runs (writers hold ``_lock_key``)."""
    return (model.pk << 4) | (2 + MODALITIES.index(modality))


def lock_index(model: EmbeddingModel, modality: str) -> None:
    """Take the index's writer lock until the end of the transaction."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(model, modality)])


def _new_index(model: EmbeddingModel, modality: str) -> VectorIndex:
    """An empty index of the configured backend, with the configured parameters
    (table-backed backends name their storage after the model and modality)."""
    backend = settings.VECTOR_INDEX_BACKEND
    params = get_backend(backend).params_for_scope(settings.VECTOR_INDEX_PARAMS, f"m{model.pk}_{modality}")
    return create_index(backend, model.dimension, **params)


def merge_policy() -> MergePolicy:
    return MergePolicy(
        delta_fraction=float(settings.INDEX_MERGE_DELTA_FRACTION),
        tombstone_fraction=float(settings.INDEX_MERGE_TOMBSTONE_FRACTION),
        min_rows=int(settings.INDEX_MERGE_MIN_ROWS),
        max_deltas=int(settings.INDEX_MERGE_MAX_DELTAS),
        rebuild_growth=float(settings.INDEX_REBUILD_GROWTH),
        graph_rows=int(settings.INDEX_DELTA_GRAPH_ROWS),
    )


# --- versions: writing them -------------------------------------------------------------


@dataclass
class SyncResult:
    modality: str
    added: int
    removed: int
    build: IndexBuild | None
    merge_due: str = ""  # "", "deltas", "base" or "rebuild": what a merge of the index would do
    bytes_written: int = 0


def sync_index(model: EmbeddingModel, modality: str, *, rebuild: bool = False, full: bool = False) -> SyncResult:
    """Bring one index in line with the stored embeddings and save a new version if it changed.

    The usual sync reads what changed since the newest version and writes it as a delta.
    ``rebuild``: a new base from every stored vector. ``full``: compare every stored id
    with the index as well (the reconciler's repair of drift no change log explains).

    Holds a Postgres advisory lock for the model and modality, so two workers never write
    the same index at once: a second sync or rebuild waits for the first, then starts from
    the version it wrote. The lock ends with the transaction, also when the process
    holding it dies.
    """
    with transaction.atomic():
        lock_index(model, modality)
        _remove_partial_writes(model, modality)
        version = None if rebuild else latest_version(model, modality)
        if version is None or version.manifest is None:
            result = _write_base_version(model, modality, version, rebuild=rebuild)
        elif version.manifest.base.table:
            result = _sync_in_place(model, modality, version, full=full)
        else:
            result = _sync_delta(model, modality, version, full=full)
    if result.build is not None and (version is None or result.build.pk != version.build.pk):
        prune_versions(model, modality)
    return result


def next_version(model, modality) -> int:
    last = IndexBuild.objects.filter(model=model, modality=modality).order_by("-version").first()
    return (last.version if last else 0) + 1


def _token() -> str:
    return secrets.token_hex(4)


def write_base(directory: Path, name: str, index: VectorIndex, built_rows: int | None = None) -> SegmentRef:
    """Save ``index`` as a base segment (with its keys file); its reference."""
    directory.mkdir(parents=True, exist_ok=True)
    sha = index.save(directory / name)
    size = (directory / name).stat().st_size
    if not index.snapshot_files:  # the file names live storage
        count = index.count()
        return SegmentRef("base", name, sha, size, rows=count, live=count, built_rows=count, table=True)
    keys = index.ids()
    keys_name = f"{name}.keys"
    keys_sha = write_keys(directory / keys_name, keys)
    return SegmentRef("base", name, sha, size + (directory / keys_name).stat().st_size, rows=len(keys),
                      live=len(keys), keys_file=keys_name, keys_sha256=keys_sha,
                      built_rows=len(keys) if built_rows is None else built_rows)


def commit_version(model, modality, number: int, manifest: Manifest) -> IndexBuild:
    """Write the manifest of version ``number`` and record it (in the caller's transaction)."""
    directory = index_dir(model, modality)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"v{number:06d}{MANIFEST_SUFFIX}"
    checksum = write_manifest(path, manifest)
    return IndexBuild.objects.create(
        model=model, modality=modality, backend=manifest.backend, params=manifest.params, version=number,
        vector_count=manifest.count, file_path=str(path), checksum=checksum, status=IndexBuild.Status.READY,
    )


def _write_base_version(model, modality, version: Version | None, *, rebuild: bool) -> SyncResult:
    """A version whose base holds every stored vector: after a rebuild, for the first
    version, and from a version written before segments (its file and the diff with
    Postgres, once; a torn one is built afresh from Postgres)."""
    cursor = index_changes.settled_position()
    index = previous = None
    if version is not None:
        try:
            index, previous = load_index(version.build.file_path, checksum=version.build.checksum), version.build
        except Exception as exc:
            mark_version_failed(version.build, exc)
    if index is None:
        index = _new_index(model, modality)
        if rebuild and not index.snapshot_files:  # a table-backed index (pgvector) starts afresh
            index.drop()
            index = _new_index(model, modality)
    added, removed = fill_from_postgres(index, model, modality)
    number = next_version(model, modality)
    ref = write_base(index_dir(model, modality), f"base-{number:06d}-{_token()}.vidx", index)
    manifest = Manifest(index.backend, index.dim, index.params, ref.live, (ref,), cursor.as_json())
    build = commit_version(model, modality, number, manifest)
    log.info("index %s: a base of %s rows (%s added, %s removed)%s", build, ref.live, added, removed,
             f" from v{previous.version}" if previous else "")
    return SyncResult(modality, added, removed, build, bytes_written=ref.bytes)


def fill_from_postgres(index: VectorIndex, model, modality) -> tuple[int, int]:
    """Make ``index`` hold exactly the stored vectors (read in chunks); (added, removed)."""
    wanted = stored_ids(model, modality)
    present = index.ids()
    missing = np.setdiff1d(wanted, present, assume_unique=True)
    extra = np.setdiff1d(present, wanted, assume_unique=True)
    if len(extra):
        index.remove(extra)
    added = 0
    for start in range(0, len(missing), FETCH_CHUNK):
        chunk, vectors = current_vectors(model, modality, missing[start : start + FETCH_CHUNK])
        if len(chunk):
            index.add(chunk, vectors)
            added += len(chunk)
    return added, len(extra)


def base_from_postgres(model, modality) -> VectorIndex:
    """A new index of the configured backend holding every stored vector."""
    index = _new_index(model, modality)
    fill_from_postgres(index, model, modality)
    return index


def _sync_delta(model, modality, version: Version, *, full: bool = False) -> SyncResult:
    manifest, directory = version.manifest, version.directory
    cursor = ChangeCursor.from_json(manifest.source)
    changes = index_changes.read_changes(model, modality, cursor)
    check = full or cursor.unsettled
    if not changes and not check:
        return SyncResult(modality, 0, 0, version.build, merge_due=_merge_due(manifest))
    keys_now = SegmentKeys.read(manifest, directory)
    keys, vectors, removed = changes.keys, changes.vectors, changes.removed
    if check:
        keys, vectors, removed = _with_drift(model, modality, keys_now, keys, vectors, removed)
    number = next_version(model, modality)
    written = []

    def write(delta_keys, delta_vectors, tombstones):
        name = f"delta-{number:06d}-{_token()}.vdelta"
        sha = write_delta(directory / name, manifest.dim, delta_keys, delta_vectors, tombstones)
        written.append((directory / name).stat().st_size)
        return name, sha, written[-1]

    updated = append_delta(manifest, keys_now, keys, vectors, removed, write, changes.cursor.as_json())
    if updated is None:
        if not _settles(cursor, changes.cursor):
            return SyncResult(modality, 0, 0, version.build, merge_due=_merge_due(manifest))
        updated = manifest.with_changes(source=changes.cursor.as_json())  # only the cursor moves
    build = commit_version(model, modality, number, updated)
    delta = updated.segments[-1] if written else SegmentRef("delta", "", "", 0, rows=0, live=0)
    return SyncResult(modality, delta.rows, delta.tombstones, build, merge_due=_merge_due(updated),
                      bytes_written=sum(written) + Path(build.file_path).stat().st_size)


def _settles(before: ChangeCursor, after: ChangeCursor) -> bool:
    """A cursor that could not be trusted (a build raced an open writer) and now can."""
    return before.unsettled and not after.unsettled


def _with_drift(model, modality, keys_now: SegmentKeys, keys, vectors, removed):
    """The changes plus whatever else differs between Postgres and the index."""
    live = keys_now.live_keys()
    live = np.union1d(np.setdiff1d(live, removed), keys)
    wanted = stored_ids(model, modality)
    missing = np.setdiff1d(wanted, live)
    extra = np.setdiff1d(live, wanted)
    if len(missing):
        found, found_vectors = current_vectors(model, modality, missing)
        keys, vectors = np.concatenate([keys, found]), np.concatenate([vectors, found_vectors])
    return keys, vectors, np.union1d(removed, extra)


def _merge_due(manifest: Manifest) -> str:
    plan = plan_merge(manifest, merge_policy())
    return plan.kind if plan is not None else ""


def _sync_in_place(model, modality, version: Version, *, full: bool = False) -> SyncResult:
    """A table-backed index: its rows are written in place (in this transaction for
    pgvector), and the new version names the same base file."""
    manifest = version.manifest
    index = load_index(version.directory / manifest.base.file, checksum=manifest.base.sha256)
    cursor = ChangeCursor.from_json(manifest.source)
    changes = index_changes.read_changes(model, modality, cursor)
    keys, vectors, removed = changes.keys, changes.vectors, np.setdiff1d(changes.removed, changes.keys)
    if full or cursor.unsettled:
        present = index.ids()
        wanted = stored_ids(model, modality)
        missing = np.setdiff1d(np.setdiff1d(wanted, present), keys)
        found, found_vectors = current_vectors(model, modality, missing)
        keys, vectors = np.concatenate([keys, found]), np.concatenate([vectors, found_vectors])
        removed = np.union1d(removed, np.setdiff1d(present, wanted))
    if not len(keys) and not len(removed) and not _settles(cursor, changes.cursor):
        return SyncResult(modality, 0, 0, version.build)
    before = _table_presence(index, np.concatenate([keys, removed]))
    gone = index.remove(removed) if len(removed) else 0
    if len(keys):
        index.add(keys, vectors)
    if before is None:
        count = index.count()
    else:
        count = manifest.count + int((~before[: len(keys)]).sum()) - int(before[len(keys):].sum())
    base = replace(manifest.base, rows=count, live=count)
    updated = manifest.with_changes(segments=(base,), count=count, source=changes.cursor.as_json())
    number = next_version(model, modality)
    build = commit_version(model, modality, number, updated)
    return SyncResult(modality, len(keys), gone, build, bytes_written=Path(build.file_path).stat().st_size)


def _table_presence(index: VectorIndex, keys: np.ndarray) -> np.ndarray | None:
    """Which ``keys`` a pgvector index's table holds (a lookup by primary key); None for
    other table-backed backends (their count is asked instead)."""
    if index.backend != "pgvector" or not len(keys):
        return np.zeros(0, dtype=bool) if not len(keys) else None
    from psycopg import sql

    table = sql.Identifier(*(part for part in (index.params.get("schema"), index.params["table"]) if part))
    conn = database_connection(index.params.get("alias", "default"))
    rows = conn.execute(sql.SQL("SELECT id FROM {} WHERE id = ANY(%s)").format(table), [keys.tolist()]).fetchall()
    present = np.sort(np.asarray([r[0] for r in rows], dtype=np.int64))
    return in_sorted(present, keys)


# --- leftovers and old versions -------------------------------------------------------------


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _remove_partial_writes(model, modality) -> None:
    """Temp files of writers that died mid-write (only called under the index lock, so no
    writer of this index is running; a merge's own temp files are the merge's to remove)."""
    directory = index_dir(model, modality)
    if directory.is_dir():
        for leftover in directory.glob(".*.tmp"):
            if leftover.name.startswith(f".{MERGE_PREFIX}"):
                continue
            log.info("removing %s, left by an interrupted index write", leftover)
            leftover.unlink(missing_ok=True)


def referenced_files(builds) -> tuple[set[Path], bool]:
    """Every file the given versions need (manifests, segments, single-file versions), and
    whether all of them could be read (an unreadable ready manifest may name more)."""
    files, complete = set(), True
    for build in builds:
        path = Path(build.file_path)
        files.add(path.resolve())
        if not is_manifest(build):
            continue
        try:
            manifest = read_manifest(path)
        except (VectorIndexError, OSError):
            complete = complete and build.status != IndexBuild.Status.READY
            continue
        files.update((path.parent / name).resolve() for name in manifest.files())
    return files, complete


def _cursor_of(build: IndexBuild) -> int | None:
    if not is_manifest(build):
        return None
    try:
        return ChangeCursor.from_json(read_manifest(build.file_path).source).change
    except (VectorIndexError, OSError):
        return None


def prune_versions(model, modality) -> None:
    """Keep the newest INDEX_VERSIONS_KEPT good versions (and anything newer than the newest
    good one, for diagnosis); torn or failed versions never count as kept. Then remove the
    files no remaining version names, and the logged changes every remaining version has read.

    Under the index lock: a sync may be writing files it has not committed yet. Rows go
    first, in their own transaction; files after it committed (a crash in between leaves
    files without a row, removed next time, never a row without its files).
    """
    with transaction.atomic():
        lock_index(model, modality)
        builds = IndexBuild.objects.filter(model=model, modality=modality)
        kept = list(builds.filter(status=IndexBuild.Status.READY).order_by("-version")[: settings.INDEX_VERSIONS_KEPT])
        if not kept:
            return
        builds.exclude(pk__in=[b.pk for b in kept]).filter(version__lt=kept[0].version).delete()
    with transaction.atomic():
        lock_index(model, modality)
        remaining = list(IndexBuild.objects.filter(model=model, modality=modality))
        files, complete = referenced_files(remaining)
        directory = index_dir(model, modality)
        if complete and directory.is_dir():
            merging = not _try_lock(merge_lock_key(model, modality))
            for path in directory.iterdir():
                if (path.is_file() and not _is_temp(path) and path.resolve() not in files
                        and not (merging and path.name.startswith(MERGE_PREFIX))):
                    path.unlink(missing_ok=True)
        cursors = [_cursor_of(b) for b in remaining if b.status == IndexBuild.Status.READY]
        if cursors and None not in cursors:
            index_changes.prune_changes(model, modality, min(cursors))


def _try_lock(key: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [key])
        return bool(cursor.fetchone()[0])


def sync_indices(model: EmbeddingModel | None = None, *, rebuild: bool = False) -> list[SyncResult]:
    model = model or EmbeddingModel.active()
    if model is None:
        return []
    return [sync_index(model, modality, rebuild=rebuild) for modality in MODALITIES]
