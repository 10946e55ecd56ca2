"""Behaviour of the vector index package: the FAISS exact backend, the file
format (atomic save, checksums, backend-agnostic load) and the registry.

What every backend does (search, upsert, remove, bad input, save and load) is
checked for faiss-flat too, in test_vector_index_backends.py."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from search.core.vector_index import (
    ChecksumMismatch,
    VectorIndex,
    VectorIndexError,
    base,
    create_index,
    get_backend,
    load_index,
    register_backend,
    registry,
    sha256_file,
)
from tests.search.core.vectors import DIM, brute_force, sparse_ids, unit_vectors

BACKEND = "faiss-flat"










@pytest.fixture
def index(corpus):
    ids, vectors = corpus
    idx = create_index(BACKEND, DIM)
    idx.add(ids, vectors)
    return idx


@pytest.fixture
def restore_registry():
    backends, classes = dict(registry.BACKENDS), dict(registry._classes)
    yield
    registry.BACKENDS.clear()
    registry.BACKENDS.update(backends)
    registry._classes.clear()
    registry._classes.update(classes)





# --------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------


def test_scores_are_the_dot_products_of_query_and_returned_vector(index, corpus):
    ids, vectors = corpus
    by_id = dict(zip(ids.tolist(), vectors))
    query = unit_vectors(1, seed=3)[0]

    got_ids, got_scores = index.search(query, k=25)

    expected = np.array([by_id[i] @ query for i in got_ids[0]], dtype=np.float32)
    np.testing.assert_allclose(got_scores[0], expected, rtol=0, atol=1e-5)
    assert np.all(np.diff(got_scores[0]) <= 0), "results are best first"


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_vectors_are_coerced_to_float32_and_ids_to_int64():
    idx = create_index(BACKEND, DIM)
    v = unit_vectors(3).astype(np.float64)
    idx.add(np.array([3, 1, 2], dtype=np.int32), np.asfortranarray(v))
    got_ids, _ = idx.search(v[0], k=1)
    assert got_ids.dtype == np.int64 and got_ids[0, 0] == 3


@pytest.mark.parametrize("dim", [0, -3, 2.0, "8", True])
def test_dimension_must_be_a_positive_integer(dim):
    with pytest.raises(VectorIndexError):
        create_index(BACKEND, dim)


def test_flat_backend_has_no_parameters_and_refuses_those_of_other_backends():
    assert create_index(BACKEND, DIM).params == {}
    with pytest.raises(VectorIndexError):
        create_index(BACKEND, DIM, nlist=100)


# --------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------


def test_registry_load_index_reopens_a_file_without_naming_the_backend(index, tmp_path):
    path = tmp_path / "index.vidx"
    checksum = index.save(str(path))

    for loaded in (load_index(path, checksum=checksum), VectorIndex.load(path)):
        assert loaded.backend == BACKEND
        assert loaded.dim == DIM
        np.testing.assert_array_equal(loaded.ids(), index.ids())


def test_tampered_file_fails_checksum_verification(index, tmp_path):
    path = tmp_path / "index.vidx"
    checksum = index.save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(ChecksumMismatch):
        load_index(path, checksum=checksum)
    with pytest.raises(ChecksumMismatch):
        type(index).load(path, checksum=checksum)
    assert issubclass(ChecksumMismatch, VectorIndexError)


def test_checksum_comparison_ignores_case(index, tmp_path):
    path = tmp_path / "index.vidx"
    checksum = index.save(path)
    assert load_index(path, checksum=checksum.upper()).count() == 500


def test_missing_file_raises_vector_index_error(tmp_path):
    with pytest.raises(VectorIndexError):
        load_index(tmp_path / "nope.vidx")


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"not an index at all", id="garbage"),
        pytest.param(lambda data: data[:-100], id="truncated-payload"),
        pytest.param(lambda data: data[:20], id="truncated-header"),
        pytest.param(lambda data: data[:12] + b"[" + data[13:], id="broken-json"),
    ],
)
def test_corrupt_file_raises_vector_index_error(index, tmp_path, mangle):
    path = tmp_path / "index.vidx"
    index.save(path)
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(VectorIndexError):
        load_index(path)


def test_file_of_another_backend_is_refused_by_a_backend_class(tmp_path, restore_registry):
    register_backend("toy", f"{__name__}.ToyIndex")
    path = tmp_path / "toy.vidx"
    create_index("toy", 4).save(path)
    with pytest.raises(VectorIndexError, match="toy"):
        get_backend(BACKEND).load(path)


# --------------------------------------------------------------------------
# Atomic write
# --------------------------------------------------------------------------


def _leftovers(directory, keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_failure_while_writing_leaves_old_file_intact_and_no_temp_file(
    index, tmp_path, monkeypatch
):
    path = tmp_path / "index.vidx"
    old_checksum = index.save(path)

    bigger = create_index(BACKEND, DIM)
    bigger.add(sparse_ids(600), unit_vectors(600, seed=11))

    def fail(self):
        raise RuntimeError("disk on fire")

    # The header has already been written to the temp file when this fails.
    monkeypatch.setattr(type(bigger), "_serialize_payload", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        bigger.save(path)

    assert _leftovers(tmp_path, {"index.vidx"}) == []
    assert sha256_file(path) == old_checksum
    assert load_index(path, checksum=old_checksum).count() == 500


def test_failure_at_rename_leaves_old_file_intact_and_no_temp_file(
    index, tmp_path, monkeypatch
):
    path = tmp_path / "index.vidx"
    old_checksum = index.save(path)
    index.remove(index.ids()[:100])

    def fail(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(base.os, "replace", fail)
    with pytest.raises(OSError, match="rename refused"):
        index.save(path)
    monkeypatch.undo()

    assert _leftovers(tmp_path, {"index.vidx"}) == []
    assert load_index(path, checksum=old_checksum).count() == 500


def test_failure_at_fsync_leaves_no_temp_file(index, tmp_path, monkeypatch):
    path = tmp_path / "index.vidx"

    def fail(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(base.os, "fsync", fail)
    with pytest.raises(OSError, match="fsync failed"):
        index.save(path)
    monkeypatch.undo()

    assert _leftovers(tmp_path, set()) == []


def test_save_replaces_an_existing_file(index, tmp_path):
    path = tmp_path / "index.vidx"
    first = index.save(path)
    index.remove(index.ids()[:1])
    second = index.save(path)
    assert first != second
    assert load_index(path, checksum=second).count() == 499
    assert _leftovers(tmp_path, {"index.vidx"}) == []


def test_atomic_write_returns_the_sha256_of_the_written_bytes(tmp_path):
    path = tmp_path / "blob"

    def write(fh):
        fh.write(b"hello ")
        fh.write(np.frombuffer(b"world", dtype=np.uint8))

    digest = base.atomic_write(path, write)
    assert path.read_bytes() == b"hello world"
    assert digest == sha256_file(path)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


def test_unknown_backend_raises_naming_the_known_backends():
    with pytest.raises(VectorIndexError) as excinfo:
        get_backend("annoy")
    assert "annoy" in str(excinfo.value)
    assert BACKEND in str(excinfo.value)
    with pytest.raises(VectorIndexError):
        create_index("annoy", DIM)


def test_backend_module_is_imported_on_first_use(monkeypatch):
    module_name = "search.core.vector_index.faiss_flat"
    import search.core.vector_index as package

    monkeypatch.delitem(sys.modules, module_name, raising=False)
    monkeypatch.delattr(package, "faiss_flat", raising=False)
    monkeypatch.setattr(registry, "_classes", {})

    assert module_name not in sys.modules
    cls = get_backend(BACKEND)
    assert module_name in sys.modules
    assert cls.__module__ == module_name
    assert get_backend(BACKEND) is cls, "the class is cached after the first import"


def test_registered_backends_plug_in_and_reload_from_files(tmp_path, restore_registry):
    register_backend("toy", f"{__name__}.ToyIndex")
    toy = create_index("toy", 4, metric="ip")
    v = unit_vectors(3, dim=4, seed=12)
    toy.add([30, 10, 20], v)

    path = tmp_path / "toy.vidx"
    checksum = toy.save(path)
    loaded = load_index(path, checksum=checksum)

    assert type(loaded).__name__ == "ToyIndex"
    assert loaded.params == {"metric": "ip"}
    np.testing.assert_array_equal(loaded.ids(), [10, 20, 30])
    got_ids, _ = loaded.search(v[1], k=1)
    assert got_ids[0, 0] == 10


def test_register_backend_checks_the_class_and_the_path(restore_registry):
    with pytest.raises(VectorIndexError):
        register_backend("bad", "NoDots")
    register_backend("missing-module", "search.core.vector_index.no_such_module.Index")
    with pytest.raises(VectorIndexError, match="cannot be imported"):
        get_backend("missing-module")
    register_backend("not-an-index", f"{__name__}.unit_vectors")
    with pytest.raises(VectorIndexError, match="not a VectorIndex"):
        get_backend("not-an-index")
    register_backend("misnamed", f"{__name__}.ToyIndex")
    with pytest.raises(VectorIndexError, match="registered as"):
        get_backend("misnamed")


def test_loading_a_file_of_an_unregistered_backend_names_it(tmp_path, restore_registry):
    register_backend("toy", f"{__name__}.ToyIndex")
    path = tmp_path / "toy.vidx"
    create_index("toy", 4).save(path)
    del registry.BACKENDS["toy"]
    registry._classes.pop("toy", None)
    with pytest.raises(VectorIndexError, match="toy"):
        load_index(path)


# --------------------------------------------------------------------------
# A minimal second backend, showing what a plug-in has to provide
# --------------------------------------------------------------------------


class ToyIndex(VectorIndex):
    """Brute-force numpy index; state serialised as raw id and vector bytes."""

    backend = "toy"

    def __init__(self, dim, **params):
        super().__init__(dim, **params)
        self._rows: dict[int, np.ndarray] = {}

    def add(self, ids, vectors):
        ids = base.as_ids(ids)
        vectors = base.as_vectors(vectors, self.dim)
        if len(ids) != len(vectors):
            raise VectorIndexError("length mismatch")
        self._rows.update(zip(ids.tolist(), vectors))

    def remove(self, ids):
        return sum(self._rows.pop(i, None) is not None for i in base.as_ids(ids).tolist())

    def search(self, queries, k):
        queries = base.as_vectors(queries, self.dim, allow_single=True)
        k = base.as_k(k)
        out_ids, out_scores = base.empty_results(len(queries), k)
        if self._rows:
            ids = np.array(list(self._rows), dtype=np.int64)
            found_ids, found_scores = brute_force(
                ids, np.stack(list(self._rows.values())), queries, k
            )
            out_ids[:, : found_ids.shape[1]] = found_ids
            out_scores[:, : found_ids.shape[1]] = found_scores
        return out_ids, out_scores

    def count(self):
        return len(self._rows)

    def ids(self):
        return np.array(sorted(self._rows), dtype=np.int64)

    def _serialize_payload(self):
        ids = self.ids()
        vectors = np.empty((len(ids), self.dim), dtype=np.float32)
        for row, i in enumerate(ids.tolist()):
            vectors[row] = self._rows[i]
        return ids.tobytes() + vectors.tobytes()

    @classmethod
    def _deserialize_payload(cls, payload, *, dim, params, count):
        ids = np.frombuffer(payload, dtype=np.int64, count=count)
        vectors = np.frombuffer(payload, dtype=np.float32, offset=8 * count).reshape(count, dim)
        index = cls(dim, **params)
        index.add(ids, vectors)
        return index


# --------------------------------------------------------------------------
# Exact search on an accelerator (a torch copy of the vectors)
# --------------------------------------------------------------------------


def _same_results_through_changes(candidate, reference, corpus, one_query_at_a_time=False):
    """``candidate`` answers like ``reference`` (a float32 FAISS scan) before and after
    removals and additions, also for k past the count."""
    ids, vectors = corpus
    queries = unit_vectors(20, seed=5)
    for idx in (candidate, reference):
        idx.add(ids, vectors)

    def search(idx, k):
        if not one_query_at_a_time:
            return idx.search(queries, k)
        found = [idx.search(q, k) for q in queries]
        return np.vstack([f[0] for f in found]), np.vstack([f[1] for f in found])

    def same(k=10):
        got_ids, got_scores = search(candidate, k)
        want_ids, want_scores = reference.search(queries, k)
        assert np.array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
        return got_ids

    first = same()
    candidate.remove(first[:, 0])
    reference.remove(first[:, 0])
    assert not np.isin(same(), first[:, 0]).any()  # removed rows are gone from the copy too
    new_ids, new_vectors = np.array([1, 2], dtype=np.int64), queries[:2].copy()
    candidate.add(new_ids, new_vectors)
    reference.add(new_ids, new_vectors)
    assert list(same(k=1)[:2, 0]) == [1, 2]  # an added row is its own best match at once
    assert same(k=600).shape == (20, 600)  # k past the count keeps the padding


def test_the_device_copy_gives_faiss_results_and_follows_every_change(monkeypatch, corpus):
    from search.core.vector_index import faiss_flat

    on_cpu = create_index(BACKEND, DIM)  # 20 queries at once: FAISS's float32 product
    # torch on the CPU stands in for the CUDA device here: same code path
    monkeypatch.setattr(faiss_flat, "search_device", lambda: "cpu")
    _same_results_through_changes(create_index(BACKEND, DIM), on_cpu, corpus)


def test_a_single_query_scans_fp16_and_returns_the_float32_ranking_and_scores(monkeypatch):
    from search.core.vector_index import faiss_flat

    # Clustered rows, so that neighbours lie close together: what the fp16 pass must not lose.
    rng = np.random.default_rng(3)
    centres = unit_vectors(20, seed=4)
    vectors = centres[rng.integers(0, 20, 3000)] + 0.15 * unit_vectors(3000, seed=6)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    corpus = (sparse_ids(3000), vectors)
    candidate = create_index(BACKEND, DIM)
    _same_results_through_changes(candidate, create_index(BACKEND, DIM), corpus, one_query_at_a_time=True)
    assert candidate._half is not None  # the single queries did go through the fp16 copy
    monkeypatch.setenv(faiss_flat.FLAT_SCAN_ENV_VAR, "float32")
    assert not faiss_flat.fp16_scan()
    monkeypatch.setenv(faiss_flat.FLAT_SCAN_ENV_VAR, "int4")
    assert faiss_flat.fp16_scan()  # an unknown value warns and keeps the default


def test_the_search_device_is_the_cpu_without_cuda_or_when_asked(monkeypatch):
    import torch

    from search.core.vector_index import faiss_flat

    monkeypatch.setenv(faiss_flat.DEVICE_ENV_VAR, "cpu")
    assert faiss_flat.search_device() is None
    monkeypatch.setenv(faiss_flat.DEVICE_ENV_VAR, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert faiss_flat.search_device() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert faiss_flat.search_device() == "cuda"
    monkeypatch.setenv(faiss_flat.DEVICE_ENV_VAR, "cuda:1")
    assert faiss_flat.search_device() == "cuda:1"
