"""Index files are versioned and atomic; web processes swap in new versions and survive torn files."""

from pathlib import Path

import numpy as np
import pytest

from embeddings.models import Embedding
from search import asset_vectors, index_sync, reconciler
from search.curation import ingest_image
from search.models import IndexBuild
from search.serving import LoadedIndices
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def isolated(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.INDEX_DIR = tmp_path / "indices"
    settings.INDEX_VERSIONS_KEPT = 3


def add_asset(model, colour, captions=("x",)):
    asset = ingest_image(image_bytes(colour), list(captions)).asset
    asset_vectors.embed_asset(asset.pk, model)
    return asset


def test_each_change_writes_a_new_version_and_an_unchanged_sync_writes_none(tiny_model, isolated):
    add_asset(tiny_model, (1, 1, 1))
    first = index_sync.sync_index(tiny_model, "image")
    assert (first.added, first.build.version, first.build.vector_count) == (1, 1, 1)
    again = index_sync.sync_index(tiny_model, "image")
    assert again.added == 0 and again.build.version == 1
    add_asset(tiny_model, (2, 2, 2))
    second = index_sync.sync_index(tiny_model, "image")
    assert (second.added, second.build.version, second.build.vector_count) == (1, 2, 2)
    assert Path(first.build.file_path).exists() and Path(second.build.file_path).exists()


def test_a_web_process_swaps_in_a_newer_version_without_restart(tiny_model, isolated):
    cache = LoadedIndices()
    a = add_asset(tiny_model, (10, 10, 10))
    index_sync.sync_indices(tiny_model)
    assert cache.get(tiny_model, "image").ids().tolist() == [a.pk]
    b = add_asset(tiny_model, (20, 20, 20))
    index_sync.sync_indices(tiny_model)
    assert sorted(cache.get(tiny_model, "image").ids().tolist()) == sorted([a.pk, b.pk])


def test_a_torn_latest_file_falls_back_to_the_last_good_version(tiny_model, isolated):
    a = add_asset(tiny_model, (30, 30, 30))
    good = index_sync.sync_index(tiny_model, "image").build
    add_asset(tiny_model, (40, 40, 40))
    newest = index_sync.sync_index(tiny_model, "image").build
    data = Path(newest.file_path).read_bytes()
    Path(newest.file_path).write_bytes(data[: len(data) // 2])  # a torn write
    index = LoadedIndices().get(tiny_model, "image")
    assert index.ids().tolist() == [a.pk]
    newest.refresh_from_db()
    assert newest.status == IndexBuild.Status.FAILED and good.version < newest.version
    # The next sync repairs it from Postgres.
    repaired = index_sync.sync_index(tiny_model, "image").build
    assert repaired.vector_count == 2 and repaired.version > newest.version


def test_old_versions_are_pruned(tiny_model, isolated):
    paths = []
    for shade in range(5):
        add_asset(tiny_model, (shade * 40, 5, 5))
        paths.append(Path(index_sync.sync_index(tiny_model, "image").build.file_path))
    assert IndexBuild.objects.filter(model=tiny_model, modality="image").count() == 3
    assert [p.exists() for p in paths] == [False, False, True, True, True]


def test_rebuild_gives_the_same_vectors_as_stored(tiny_model, isolated):
    assets = [add_asset(tiny_model, (i * 50, 0, 0), [f"caption {i}"]) for i in range(3)]
    results = index_sync.sync_indices(tiny_model, rebuild=True)
    assert [r.build.vector_count for r in results] == [3, 3]
    index = LoadedIndices().get(tiny_model, "image")
    stored = index_sync.stored_vectors(tiny_model, "image", [a.pk for a in assets])
    ids, scores = index.search(stored, 1)
    assert ids[:, 0].tolist() == [a.pk for a in assets]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


BACKENDS = [
    ("faiss-hnsw", {"ef_search": 32}),
    ("pgvector", {"ef_search": 20}),
    ("milvus", {"ef": 24, "collection_prefix": "test_versions_"}),
]


@pytest.fixture(params=BACKENDS, ids=[backend for backend, _ in BACKENDS])
def configured_backend(request, settings, tiny_model):
    """VECTOR_INDEX_BACKEND and VECTOR_INDEX_PARAMS set to one backend; a milvus collection
    (no part of the test's transaction) is dropped afterwards."""
    backend, params = request.param
    if backend == "milvus" and not settings.MILVUS_URI:
        pytest.skip("the milvus backend needs a Milvus server: run under bin/test or set MILVUS_URI")
    settings.VECTOR_INDEX_BACKEND, settings.VECTOR_INDEX_PARAMS = backend, params
    yield backend, params
    if backend == "milvus":
        for modality in index_sync.MODALITIES:
            index_sync._new_index(tiny_model, modality).drop()


def test_the_configured_backend_and_its_parameters_serve_searches(tiny_model, isolated, configured_backend):
    backend, params = configured_backend
    assets = [add_asset(tiny_model, (i * 60, 20, 20), [f"caption {i}"]) for i in range(3)]
    build = index_sync.sync_index(tiny_model, "image", rebuild=True).build
    assert build.backend == backend and {name: build.params[name] for name in params} == params
    index = LoadedIndices().get(tiny_model, "image")
    stored = index_sync.stored_vectors(tiny_model, "image", [a.pk for a in assets])
    ids, _ = index.search(stored, 1)
    assert ids[:, 0].tolist() == [a.pk for a in assets]
    # An upload after the build is found once the next sync has run.
    late = add_asset(tiny_model, (250, 250, 20), ["late"])
    index_sync.sync_index(tiny_model, "image")
    vector = index_sync.stored_vectors(tiny_model, "image", [late.pk])
    assert LoadedIndices().get(tiny_model, "image").search(vector, 1)[0][0, 0] == late.pk


def test_the_reconciler_finds_and_repairs_drift_in_each_backend(tiny_model, isolated, configured_backend):
    assets = [add_asset(tiny_model, (i * 60, 90, 20), [f"drift {i}"]) for i in range(3)]
    index_sync.sync_index(tiny_model, "image", rebuild=True)
    assert reconciler.check_index(tiny_model, "image").in_step
    Embedding.objects.filter(asset=assets[0]).delete()  # a row the index still holds
    unsynced = add_asset(tiny_model, (5, 5, 250), ["unsynced"])  # and one it never saw

    check = reconciler.check_index(tiny_model, "image")

    assert (check.missing, check.extra, check.repaired, check.error) == (1, 1, True, "")
    served = LoadedIndices().get(tiny_model, "image").ids().tolist()
    assert sorted(served) == sorted([a.pk for a in assets[1:]] + [unsynced.pk])
    assert reconciler.check_index(tiny_model, "image").in_step
