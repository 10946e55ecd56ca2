"""Writing the vector indices: keeping them in step with the vectors in Postgres.

Two indices per embedding model: ``image`` (rows keyed by asset id, for
text→image and image→image) and ``caption`` (rows keyed by caption id, for
image→text). Workers write new index versions (atomically, one file per
version, recorded as an ``IndexBuild``); web processes load them
(``search.serving``) and swap a newer one in without a restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import connection, connections, transaction

from embeddings.models import Embedding, EmbeddingModel
from search.core.vector_index import VectorIndex, create_index, get_backend, load_index
from search.models import IndexBuild

log = logging.getLogger(__name__)


MODALITIES = (IndexBuild.Modality.IMAGE, IndexBuild.Modality.CAPTION)


FETCH_CHUNK = 5000


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


def load_latest_valid(model: EmbeddingModel, modality: str) -> tuple[VectorIndex | None, IndexBuild | None]:
    """The newest ready version whose file loads and matches its checksum."""
    builds = IndexBuild.objects.filter(
        model=model, modality=modality, status=IndexBuild.Status.READY
    ).order_by("-version")
    for build in builds:
        try:
            return load_index(build.file_path, checksum=build.checksum), build
        except Exception as exc:  # a missing or torn file: fall back to the previous version
            log.warning("index %s unusable (%s); trying an older version", build, exc)
            IndexBuild.objects.filter(pk=build.pk).update(status=IndexBuild.Status.FAILED, error=str(exc)[:2000])
    return None, None


def database_connection(alias: str = "default"):
    """The psycopg connection of a Django database alias, for the pgvector backend
    (``search.core.vector_index.pgvector.set_connection_provider``, set as the app starts)."""
    wrapper = connections[alias]
    wrapper.ensure_connection()
    return wrapper.connection


def _lock_key(model: EmbeddingModel, modality: str) -> int:
    return (model.pk << 4) | MODALITIES.index(modality)


def _new_index(model: EmbeddingModel, modality: str) -> VectorIndex:
    """An empty index of the configured backend, with the configured parameters
    (table-backed backends name their storage after the model and modality)."""
    backend = settings.VECTOR_INDEX_BACKEND
    params = get_backend(backend).params_for_scope(settings.VECTOR_INDEX_PARAMS, f"m{model.pk}_{modality}")
    return create_index(backend, model.dimension, **params)


@dataclass
class SyncResult:
    modality: str
    added: int
    removed: int
    build: IndexBuild | None


def sync_index(model: EmbeddingModel, modality: str, *, rebuild: bool = False) -> SyncResult:
    """Bring one index in line with the stored embeddings and save a new version if it changed.

    Holds a Postgres advisory lock for the model and modality, so two workers
    never write the same index at once: a second sync or rebuild waits for the
    first, then starts from the version it wrote. The lock ends with the
    transaction, also when the process holding it dies.
    """
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(model, modality)])
        _remove_partial_writes(model, modality)
        index, previous = (None, None) if rebuild else load_latest_valid(model, modality)
        if index is None:
            index = _new_index(model, modality)
            if rebuild and not index.snapshot_files:  # a table-backed index (pgvector) starts afresh
                index.drop()
                index = _new_index(model, modality)
        wanted = stored_ids(model, modality)
        present = index.ids()
        missing = np.setdiff1d(wanted, present, assume_unique=True)
        extra = np.setdiff1d(present, wanted, assume_unique=True)
        if previous is not None and not len(missing) and not len(extra):
            return SyncResult(modality, 0, 0, previous)
        if len(extra):
            index.remove(extra)
        added = 0
        for start in range(0, len(missing), FETCH_CHUNK):
            chunk, vectors = current_vectors(model, modality, missing[start : start + FETCH_CHUNK])
            if len(chunk):
                index.add(chunk, vectors)
                added += len(chunk)
        if previous is not None and not added and not len(extra):
            return SyncResult(modality, 0, 0, previous)  # what was missing was deleted meanwhile
        build = _save_version(model, modality, index, previous)
    _prune_old_versions(model, modality)
    return SyncResult(modality, added, len(extra), build)


def _save_version(model, modality, index: VectorIndex, previous: IndexBuild | None) -> IndexBuild:
    last = IndexBuild.objects.filter(model=model, modality=modality).order_by("-version").first()
    version = (last.version if last else 0) + 1
    directory = index_dir(model, modality)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"v{version:06d}.index"
    checksum = index.save(path)
    return IndexBuild.objects.create(
        model=model,
        modality=modality,
        backend=index.backend,
        params=index.params,
        version=version,
        vector_count=index.count(),
        file_path=str(path),
        checksum=checksum,
        status=IndexBuild.Status.READY,
    )


def _remove_partial_writes(model, modality) -> None:
    """Temp files of writers that died mid-write (only called under the index lock, so no
    writer of this index is running)."""
    directory = index_dir(model, modality)
    if directory.is_dir():
        for leftover in directory.glob(".*.tmp"):
            log.info("removing %s, left by an interrupted index write", leftover)
            leftover.unlink(missing_ok=True)


def _prune_old_versions(model, modality) -> None:
    """Keep the newest INDEX_VERSIONS_KEPT good versions (and anything newer than the newest
    good one, for diagnosis); torn or failed versions never count as kept."""
    builds = IndexBuild.objects.filter(model=model, modality=modality)
    kept = list(builds.filter(status=IndexBuild.Status.READY).order_by("-version")[: settings.INDEX_VERSIONS_KEPT])
    if not kept:
        return
    old = builds.exclude(pk__in=[b.pk for b in kept]).filter(version__lt=kept[0].version)
    for build in list(old):
        # The row first: a crash in between leaves a file without a row (harmless), never a
        # ready row without its file.
        build.delete()
        Path(build.file_path).unlink(missing_ok=True)


def sync_indices(model: EmbeddingModel | None = None, *, rebuild: bool = False) -> list[SyncResult]:
    model = model or EmbeddingModel.active()
    if model is None:
        return []
    return [sync_index(model, modality, rebuild=rebuild) for modality in MODALITIES]
