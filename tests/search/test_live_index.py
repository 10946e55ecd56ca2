"""Uploads become searchable through small deltas: a sync writes what changed since the last
version (one delta and a manifest), web processes open a newer version with the segments they
hold, merges fold deltas into a new base beside the syncs, and a crash at any write step
leaves the last good version served and loses nothing."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
from django.db import connection, transaction

from embeddings.models import Embedding
from search import index_changes, index_merge, index_sync, serving, tasks
from search.core.vector_index import base as vector_files
from search.core.vector_index.segment_files import read_manifest
from search.core.vector_index.segments import MergePlan
from search.models import Caption, ImageAsset, IndexBuild, VectorChange

pytestmark = pytest.mark.django_db

IMAGE = IndexBuild.Modality.IMAGE


@pytest.fixture
def isolated(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.INDEX_DIR = tmp_path / "indices"
    settings.INDEX_VERSIONS_KEPT = 3
    settings.INDEX_MERGE_MIN_ROWS = 0
    settings.INDEX_MERGE_DELTA_FRACTION = 10.0  # no merge unless a test asks for one
    settings.INDEX_MERGE_TOMBSTONE_FRACTION = 10.0
    settings.INDEX_MERGE_MAX_DELTAS = 1000
    settings.INDEX_SYNC_WRITER_WAIT = 0.3


_made = [0]


def unit(model, seed) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(model.dimension).astype(np.float32)
    return vector / np.linalg.norm(vector)


def store(model, n, *, captions=0) -> list[ImageAsset]:
    """``n`` assets with a stored image vector each (and ``captions`` captions with vectors)."""
    assets = []
    for _ in range(n):
        _made[0] += 1
        i = _made[0]
        asset = ImageAsset.objects.create(sha256=hashlib.sha256(f"live-{i}".encode()).hexdigest(),
                                          file=f"images/live/{i}.png", width=1, height=1, format="PNG",
                                          status=ImageAsset.Status.EMBEDDED)
        Embedding.objects.create(model=model, asset=asset, vector=Embedding.pack(unit(model, i)))
        for j in range(captions):
            caption = Caption.objects.create(asset=asset, text=f"c{i}-{j}", normalized_text=f"c{i}-{j}")
            Embedding.objects.create(model=model, caption=caption, vector=Embedding.pack(unit(model, 10 ** 6 + i * 10 + j)))
        assets.append(asset)
    return assets


def vector_of(model, asset) -> np.ndarray:
    return index_sync.stored_vectors(model, IMAGE, [asset.pk])


def nearest(index, vector) -> int:
    return int(index.search(vector, 1)[0][0, 0])


def manifest_of(build) -> object:
    return read_manifest(build.file_path, build.checksum)


def test_a_sync_after_an_upload_writes_one_small_delta_whatever_the_collection(tiny_model, isolated):
    written = []
    for size in (20, 400):
        store(tiny_model, size)
        index_sync.sync_index(tiny_model, IMAGE, rebuild=True)
        store(tiny_model, 1)
        result = index_sync.sync_index(tiny_model, IMAGE)
        manifest = manifest_of(result.build)
        assert (result.added, [ref.kind for ref in manifest.segments]) == (1, ["base", "delta"])
        assert manifest.count == len(index_sync.stored_ids(tiny_model, IMAGE))
        written.append(result.bytes_written)
    # A delta of one row and a manifest, at 21 and 421 rows (the manifest's numbers have more digits).
    assert abs(written[0] - written[1]) < 32 and max(written) < 4096


def test_an_unchanged_index_writes_no_version(tiny_model, isolated):
    store(tiny_model, 3, captions=1)
    first = index_sync.sync_index(tiny_model, IMAGE)
    store(tiny_model, 1)  # new rows of no interest to the caption index...
    results = {r.modality: r for r in index_sync.sync_indices(tiny_model)}
    assert results["caption"].build.version == 1 and results["image"].build.version == 2
    assert index_sync.sync_index(tiny_model, IMAGE).build.version == 2 > first.build.version


def test_a_web_process_opens_a_newer_version_with_the_base_it_holds(tiny_model, isolated):
    store(tiny_model, 30)
    index_sync.sync_index(tiny_model, IMAGE)
    loaded = serving.LoadedIndices()
    first = loaded.get(tiny_model, IMAGE)
    late = store(tiny_model, 1)[0]
    index_sync.sync_index(tiny_model, IMAGE)
    second = loaded.get(tiny_model, IMAGE)
    assert second is not first and second.base_index is first.base_index  # the base was not read again
    assert nearest(second, vector_of(tiny_model, late)) == late.pk
    assert len(loaded.held_segments(tiny_model, IMAGE)) == 2


def test_a_removed_row_leaves_the_index_and_comes_back_only_when_stored_again(tiny_model, isolated):
    assets = store(tiny_model, 10)
    index_sync.sync_index(tiny_model, IMAGE)
    gone = assets[3]
    old = vector_of(tiny_model, gone)
    Embedding.objects.filter(asset=gone).delete()
    result = index_sync.sync_index(tiny_model, IMAGE)
    assert (result.added, result.removed, result.build.vector_count) == (0, 1, 9)
    index = serving.LoadedIndices().get(tiny_model, IMAGE)
    assert gone.pk not in index.ids().tolist() and nearest(index, old) != gone.pk
    # Stored again with another vector (an edit): the new vector answers, the old one does not.
    Embedding.objects.create(model=tiny_model, asset=gone, vector=Embedding.pack(unit(tiny_model, 999)))
    index_sync.sync_index(tiny_model, IMAGE)
    index = serving.LoadedIndices().get(tiny_model, IMAGE)
    assert nearest(index, vector_of(tiny_model, gone)) == gone.pk
    ids, scores = index.search(old, 10)
    assert gone.pk not in ids[0].tolist() or scores[0][ids[0].tolist().index(gone.pk)] < 0.99
    assert index.ids().tolist().count(gone.pk) == 1 and index.count() == 10


def test_a_caption_edited_between_two_syncs_answers_with_its_new_vector(tiny_model, isolated):
    asset = store(tiny_model, 5, captions=2)[0]
    index_sync.sync_index(tiny_model, "caption")
    caption = asset.captions.first()
    Embedding.objects.filter(caption=caption).delete()  # the admin's edit drops the old vector ...
    new = unit(tiny_model, 4242)
    Embedding.objects.create(model=tiny_model, caption=caption, vector=Embedding.pack(new))  # ... the task stores the new
    index_sync.sync_index(tiny_model, "caption")
    index = serving.LoadedIndices().get(tiny_model, "caption")
    ids, scores = index.search(new, 1)
    assert (ids[0, 0], round(float(scores[0, 0]), 4)) == (caption.pk, 1.0)
    assert index.count() == 10


def test_a_row_committed_after_a_sync_read_past_it_is_read_by_the_next(tiny_model, isolated, transactional_db):
    """A writer still open when a sync runs: the sync does not move its watermark past it."""
    store(tiny_model, 5)
    index_sync.sync_index(tiny_model, IMAGE)
    asset = store(tiny_model, 1)[0]
    Embedding.objects.filter(asset=asset).delete()
    inserted, release = threading.Event(), threading.Event()

    def slow_writer():
        try:
            with transaction.atomic():
                Embedding.objects.create(model=tiny_model, asset=asset, vector=Embedding.pack(unit(tiny_model, 7)))
                inserted.set()
                release.wait(10)
        finally:
            connection.close()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert inserted.wait(10)
    early = store(tiny_model, 1)[0]  # committed after the slow writer's row got its id
    during = index_sync.sync_index(tiny_model, IMAGE)
    cursor = index_changes.ChangeCursor.from_json(manifest_of(during.build).source)
    release.set()
    writer.join()
    assert early.pk in serving.LoadedIndices().get(tiny_model, IMAGE).ids().tolist()
    assert cursor.embedding_seen  # the watermark stayed; what was read above it is listed
    index_sync.sync_index(tiny_model, IMAGE)
    served = serving.LoadedIndices().get(tiny_model, IMAGE).ids().tolist()
    assert asset.pk in served and served.count(early.pk) == 1
    assert sorted(served) == sorted(index_sync.stored_ids(tiny_model, IMAGE).tolist())


def test_old_versions_go_but_the_segments_kept_versions_name_stay(tiny_model, isolated):
    store(tiny_model, 10)
    base_build = index_sync.sync_index(tiny_model, IMAGE).build
    base_files = [Path(base_build.file_path).parent / name for name in manifest_of(base_build).files()]
    manifests = []
    for _ in range(4):
        store(tiny_model, 1)
        manifests.append(Path(index_sync.sync_index(tiny_model, IMAGE).build.file_path))
    assert not Path(base_build.file_path).exists()  # the first version's manifest is pruned ...
    assert all(path.exists() for path in base_files)  # ... its base is still named by the kept ones
    assert [p.exists() for p in manifests] == [False, True, True, True]
    kept = index_sync.referenced_files(IndexBuild.objects.filter(model=tiny_model, modality=IMAGE))[0]
    on_disk = {p.resolve() for p in index_sync.index_dir(tiny_model, IMAGE).iterdir()}
    assert on_disk == kept  # the first delta went with the versions that named it


def test_logged_changes_every_kept_version_has_read_are_pruned(tiny_model, isolated):
    assets = store(tiny_model, 6)
    index_sync.sync_index(tiny_model, IMAGE)
    for asset in assets[:4]:
        Embedding.objects.filter(asset=asset).delete()
        index_sync.sync_index(tiny_model, IMAGE)
    left = VectorChange.objects.filter(model_id=tiny_model.pk, asset_id__isnull=False).count()
    assert left == 2  # the oldest kept version (of three) still needs the last two


# --- merges -----------------------------------------------------------------------------------


def test_a_merge_folds_the_deltas_into_a_new_base_and_answers_the_same(tiny_model, isolated):
    assets = store(tiny_model, 40)
    index_sync.sync_index(tiny_model, IMAGE)
    for asset in assets[:5]:
        Embedding.objects.filter(asset=asset).delete()
    store(tiny_model, 6)
    index_sync.sync_index(tiny_model, IMAGE)
    store(tiny_model, 2)
    index_sync.sync_index(tiny_model, IMAGE)
    before = index_sync.load_latest_valid(tiny_model, IMAGE)[0]
    queries = np.stack([unit(tiny_model, 50_000 + i) for i in range(10)])

    result = index_merge.merge_index(tiny_model, IMAGE, plan=MergePlan("base", ((0, 3),), "asked"))

    after, build = index_sync.load_latest_valid(tiny_model, IMAGE)
    assert result.kind == "base" and build.version == result.version
    assert [ref.kind for ref in after.manifest.segments] == ["base"] and after.count() == 43
    np.testing.assert_array_equal(after.search(queries, 10)[0], before.search(queries, 10)[0])
    assert after.ids().tolist() == sorted(index_sync.stored_ids(tiny_model, IMAGE).tolist())


def test_deltas_synced_while_a_merge_runs_stay_on_top_of_the_new_base(tiny_model, isolated, monkeypatch,
                                                                      transactional_db):
    assets = store(tiny_model, 20)
    index_sync.sync_index(tiny_model, IMAGE)
    store(tiny_model, 3)
    index_sync.sync_index(tiny_model, IMAGE)
    fold = index_merge._fold
    during = {}

    def another_worker_syncs():
        try:
            during["late"] = store(tiny_model, 1)[0]  # an upload, and a delete, synced meanwhile
            Embedding.objects.filter(asset=assets[0]).delete()
            index_sync.sync_index(tiny_model, IMAGE)
        finally:
            connection.close()

    def fold_then_sync(*args):
        folded = fold(*args)
        worker = threading.Thread(target=another_worker_syncs)
        worker.start()
        worker.join()
        return folded

    monkeypatch.setattr(index_merge, "_fold", fold_then_sync)
    index_merge.merge_index(tiny_model, IMAGE, plan=MergePlan("base", ((0, 2),), "asked"))
    index, _ = index_sync.load_latest_valid(tiny_model, IMAGE)
    assert [(ref.kind, ref.rows, ref.live) for ref in index.manifest.segments] == [("base", 23, 22), ("delta", 1, 1)]
    assert index.ids().tolist() == sorted(index_sync.stored_ids(tiny_model, IMAGE).tolist())
    assert nearest(index, vector_of(tiny_model, during["late"])) == during["late"].pk
    assert index.count() == 23


def test_small_deltas_are_folded_together_past_the_limit(tiny_model, isolated, settings):
    settings.INDEX_MERGE_MAX_DELTAS = 4
    store(tiny_model, 10)
    index_sync.sync_index(tiny_model, IMAGE)
    for _ in range(5):
        store(tiny_model, 1)
        result = index_sync.sync_index(tiny_model, IMAGE)
    assert result.merge_due == "deltas"
    merged = index_merge.merge_index(tiny_model, IMAGE)
    index, _ = index_sync.load_latest_valid(tiny_model, IMAGE)
    assert merged.kind == "deltas" and len(index.manifest.deltas) == 2 and index.count() == 15
    assert index.ids().tolist() == sorted(index_sync.stored_ids(tiny_model, IMAGE).tolist())


def test_a_merge_gives_a_large_delta_of_an_approximate_index_a_graph(tiny_model, isolated, settings):
    settings.VECTOR_INDEX_BACKEND, settings.VECTOR_INDEX_PARAMS = "faiss-hnsw", {"ef_search": 64}
    settings.INDEX_DELTA_GRAPH_ROWS = 20
    store(tiny_model, 30)
    index_sync.sync_index(tiny_model, IMAGE)
    added = store(tiny_model, 25)  # a bulk import: one sync, one large delta
    assert index_sync.sync_index(tiny_model, IMAGE).merge_due == "deltas"
    merged = index_merge.merge_index(tiny_model, IMAGE)
    build = index_sync.latest_build(tiny_model, IMAGE)
    delta = manifest_of(build).segments[-1]
    assert merged.kind == "deltas" and delta.index_file and (Path(build.file_path).parent / delta.index_file).exists()
    index = serving.LoadedIndices().get(tiny_model, IMAGE)
    assert all(nearest(index, vector_of(tiny_model, a)) == a.pk for a in added)
    assert index_sync.sync_index(tiny_model, IMAGE).merge_due == ""


def test_a_sync_task_queues_the_merge_that_is_due(tiny_model, isolated, settings, monkeypatch):
    settings.INDEX_MERGE_DELTA_FRACTION = 0.1
    queued = []
    monkeypatch.setattr(tasks.merge_index_task, "apply_async", lambda args, queue=None: queued.append(args))
    tasks.clear_merge_pending(tiny_model.pk, IMAGE)
    store(tiny_model, 20)
    tasks.sync_indices_task(tiny_model.pk)
    assert queued == []
    store(tiny_model, 2)
    tasks.sync_indices_task(tiny_model.pk)
    assert queued == [(tiny_model.pk, IMAGE)]
    tasks.merge_index_task(tiny_model.pk, IMAGE)
    index, _ = index_sync.load_latest_valid(tiny_model, IMAGE)
    assert [ref.kind for ref in index.manifest.segments] == ["base"] and index.count() == 22


# --- crashes at each write step ------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int):
    """Make the ``step``-th atomic file write of this process raise after its file is in place."""
    real = vector_files.atomic_write
    calls = [0]

    def write(path, fn):
        checksum = real(path, fn)
        calls[0] += 1
        if calls[0] == step:
            raise Crash(path)
        return checksum

    monkeypatch.setattr(vector_files, "atomic_write", write)
    return calls


@pytest.mark.parametrize("step", [1, 2])  # after the delta, after the manifest (before the commit)
def test_a_sync_that_crashes_after_a_write_leaves_the_last_version_and_loses_nothing(
        tiny_model, isolated, monkeypatch, step):
    assets = store(tiny_model, 12)
    good = index_sync.sync_index(tiny_model, IMAGE).build
    late = store(tiny_model, 2)
    Embedding.objects.filter(asset=assets[0]).delete()
    crash_at(monkeypatch, step)
    with pytest.raises(Crash):
        index_sync.sync_index(tiny_model, IMAGE)
    monkeypatch.undo()
    assert index_sync.latest_build(tiny_model, IMAGE).pk == good.pk
    served = serving.LoadedIndices().get(tiny_model, IMAGE)
    assert served.count() == 12 and assets[0].pk in served.ids().tolist()
    result = index_sync.sync_index(tiny_model, IMAGE)  # nothing lost, nothing back from the dead
    index = serving.LoadedIndices().get(tiny_model, IMAGE)
    assert index.ids().tolist() == sorted(index_sync.stored_ids(tiny_model, IMAGE).tolist())
    assert all(nearest(index, vector_of(tiny_model, a)) == a.pk for a in late)
    on_disk = {p.resolve() for p in index_sync.index_dir(tiny_model, IMAGE).iterdir()}
    named = index_sync.referenced_files(IndexBuild.objects.filter(model=tiny_model, modality=IMAGE))[0]
    assert on_disk == named and result.build.version == good.version + 1  # leftovers cleaned


@pytest.mark.parametrize("step", [1, 2, 3])  # after the new base, its keys, the manifest
def test_a_merge_that_crashes_after_a_write_leaves_the_last_version(tiny_model, isolated, monkeypatch, step):
    assets = store(tiny_model, 12)
    index_sync.sync_index(tiny_model, IMAGE)
    store(tiny_model, 3)
    Embedding.objects.filter(asset=assets[1]).delete()
    good = index_sync.sync_index(tiny_model, IMAGE).build
    crash_at(monkeypatch, step)
    with pytest.raises(Crash):
        index_merge.merge_index(tiny_model, IMAGE, plan=MergePlan("base", ((0, 2),), "asked"))
    monkeypatch.undo()
    assert index_sync.latest_build(tiny_model, IMAGE).pk == good.pk
    served = serving.LoadedIndices().get(tiny_model, IMAGE)
    assert served.ids().tolist() == sorted(index_sync.stored_ids(tiny_model, IMAGE).tolist())
    merged = index_merge.merge_index(tiny_model, IMAGE, plan=MergePlan("base", ((0, 2),), "asked"))
    assert merged.kind == "base" and merged.version == good.version + 1
    on_disk = {p.resolve() for p in index_sync.index_dir(tiny_model, IMAGE).iterdir()}
    named = index_sync.referenced_files(IndexBuild.objects.filter(model=tiny_model, modality=IMAGE))[0]
    assert on_disk == named  # what the crashed merge wrote is gone


def test_a_torn_delta_falls_back_to_the_version_before_it(tiny_model, isolated):
    store(tiny_model, 8)
    good = index_sync.sync_index(tiny_model, IMAGE).build
    store(tiny_model, 1)
    newest = index_sync.sync_index(tiny_model, IMAGE).build
    delta = Path(newest.file_path).parent / manifest_of(newest).segments[-1].file
    delta.write_bytes(delta.read_bytes()[:40])
    served = serving.LoadedIndices().served(tiny_model, IMAGE)
    assert served.version == good.version and served.index.count() == 8
    newest.refresh_from_db()
    assert newest.status == IndexBuild.Status.FAILED
    repaired = index_sync.sync_index(tiny_model, IMAGE).build  # from the good version's cursor
    assert repaired.vector_count == 9


# --- versions written before segments, and table-backed indices ----------------------------------


def test_a_version_written_as_one_file_is_served_and_becomes_a_base(tiny_model, isolated):
    assets = store(tiny_model, 6)
    index = index_sync._new_index(tiny_model, IMAGE)
    index.add([a.pk for a in assets], np.concatenate([vector_of(tiny_model, a) for a in assets]))
    directory = index_sync.index_dir(tiny_model, IMAGE)
    directory.mkdir(parents=True)
    path = directory / "v000001.index"
    checksum = index.save(path)
    IndexBuild.objects.create(model=tiny_model, modality=IMAGE, backend=index.backend, version=1, vector_count=6,
                              file_path=str(path), checksum=checksum, status=IndexBuild.Status.READY)
    assert serving.LoadedIndices().get(tiny_model, IMAGE).count() == 6
    late = store(tiny_model, 1)[0]
    build = index_sync.sync_index(tiny_model, IMAGE).build
    assert index_sync.is_manifest(build) and build.vector_count == 7
    assert nearest(serving.LoadedIndices().get(tiny_model, IMAGE), vector_of(tiny_model, late)) == late.pk


def test_a_table_backed_index_is_written_in_place_and_names_one_base(tiny_model, isolated, settings):
    settings.VECTOR_INDEX_BACKEND, settings.VECTOR_INDEX_PARAMS = "pgvector", {"ef_search": 40}
    assets = store(tiny_model, 5)
    first = index_sync.sync_index(tiny_model, IMAGE, rebuild=True).build
    late = store(tiny_model, 1)[0]
    Embedding.objects.filter(asset=assets[0]).delete()
    result = index_sync.sync_index(tiny_model, IMAGE)
    manifest = manifest_of(result.build)
    assert (result.added, result.removed, manifest.count) == (1, 1, 5)
    assert manifest.segments == (manifest.segments[0],) and manifest.base.file == manifest_of(first).base.file
    index = serving.LoadedIndices().get(tiny_model, IMAGE)
    assert nearest(index, vector_of(tiny_model, late)) == late.pk
    assert sorted(index.ids().tolist()) == sorted(index_sync.stored_ids(tiny_model, IMAGE).tolist())
