"""One behaviour suite run against every vector index backend, then the
behaviour particular to each (HNSW tombstones, IVF-PQ training, pgvector
tables and transactions; milvus has its own file, test_milvus_backend.py).

The pgvector cases need PostgreSQL: under ``bin/test`` they use the test
database through Django's connection (each test in a transaction that is
rolled back, tables included); elsewhere set ``VECTOR_INDEX_PG_DSN``, or they
are skipped. The milvus cases need a Milvus server: under ``bin/test`` the
Milvus Lite server of the local services (each test's collections dropped
afterwards); elsewhere set ``MILVUS_URI``, or they are skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from search.core.vector_index import (
    ChecksumMismatch,
    VectorIndexError,
    create_index,
    get_backend,
    load_index,
    sha256_file,
)
from tests.search.core.vectors import DIM, N, brute_force, recall, unit_vectors

# name -> (backend, parameters). Small-data settings: the IVF-PQ index trains
# on the first 300 rows and re-ranks exactly, so scores are exact inner products.
SPECS = {
    "faiss-flat": ("faiss-flat", {}),
    "faiss-hnsw": ("faiss-hnsw", {}),
    "faiss-ivfpq": ("faiss-ivfpq", {"nlist": 8, "nprobe": 8, "pq_m": 16, "pq_nbits": 4, "train_size": 300,
                                    "refine": "flat", "k_factor": 16}),
    "faiss-ivfpq-untrained": ("faiss-ivfpq", {}),
    "pgvector": ("pgvector", {}),
    "milvus": ("milvus", {}),
}


@pytest.fixture(autouse=True, scope="module")
def single_threaded_faiss():
    # Tiny indexes: OpenMP thread start-up and spinning would dominate, and on a
    # busy machine spinning threads slow everything else down.
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)














def _pg_available(request) -> bool:
    if os.environ.get("VECTOR_INDEX_PG_DSN"):
        return True
    try:
        request.getfixturevalue("db")
    except pytest.FixtureLookupError:
        return False
    return True


@pytest.fixture(params=list(SPECS))
def spec(request):
    backend, params = SPECS[request.param]
    if backend == "pgvector" and not _pg_available(request):
        pytest.skip("pgvector needs PostgreSQL: run under bin/test or set VECTOR_INDEX_PG_DSN")
    if backend == "milvus":
        request.getfixturevalue("milvus_server")
    return request.param, backend, params


@pytest.fixture
def make(spec):
    """make(**extra) -> a new empty index of the backend under test."""
    _, backend, params = spec
    created = []

    def factory(dim=DIM, **extra):
        index = create_index(backend, dim, **{**params, **extra})
        created.append(index)
        return index

    yield factory
    if backend == "milvus" or (backend == "pgvector" and os.environ.get("VECTOR_INDEX_PG_DSN")):
        for index in created:  # outside a rolled-back test transaction: clean up
            index.drop()




@pytest.fixture
def index(make, corpus):
    ids, vectors = corpus
    idx = make()
    idx.add(ids, vectors)
    return idx


def _is_exact(idx) -> bool:
    return type(idx).exact or not idx.is_trained


# --------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------


def test_search_returns_the_nearest_neighbours_by_external_id(index, corpus):
    ids, vectors = corpus
    queries = unit_vectors(20, seed=2)

    got_ids, got_scores = index.search(queries, k=10)
    want_ids, want_scores = brute_force(ids, vectors, queries, 10)

    assert got_ids.dtype == np.int64 and got_ids.shape == (20, 10)
    assert got_scores.dtype == np.float32 and got_scores.shape == (20, 10)
    if _is_exact(index):
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-5)
    else:
        assert recall(got_ids, want_ids) >= 0.95


def test_scores_are_inner_products_best_first(index, corpus):
    ids, vectors = corpus
    by_id = dict(zip(ids.tolist(), vectors))
    query = unit_vectors(1, seed=3)[0]

    got_ids, got_scores = index.search(query, k=25)

    expected = np.array([by_id[i] @ query for i in got_ids[0]], dtype=np.float32)
    np.testing.assert_allclose(got_scores[0], expected, rtol=0, atol=1e-5)
    assert np.all(np.diff(got_scores[0]) <= 1e-6), "results are best first"


def test_a_single_1d_query_is_treated_as_one_row(index):
    query = unit_vectors(1, seed=4)
    ids_2d, scores_2d = index.search(query, k=5)
    ids_1d, scores_1d = index.search(query[0], k=5)
    assert ids_1d.shape == (1, 5)
    np.testing.assert_array_equal(ids_1d, ids_2d)
    np.testing.assert_array_equal(scores_1d, scores_2d)


def test_a_stored_vector_is_its_own_best_match(index, corpus):
    ids, vectors = corpus
    got_ids, got_scores = index.search(vectors[:50], k=1)
    hits = got_ids[:, 0] == ids[:50]
    if _is_exact(index):
        assert hits.all()
    else:
        assert np.mean(hits) >= 0.98
    np.testing.assert_allclose(got_scores[hits, 0], 1.0, atol=1e-5)


def test_k_larger_than_count_pads_with_minus_one_and_minus_inf(make):
    idx = make()
    idx.add([5, 9, 2], unit_vectors(3))

    got_ids, got_scores = idx.search(unit_vectors(2, seed=5), k=6)

    assert got_ids.shape == got_scores.shape == (2, 6)
    assert sorted(got_ids[0, :3].tolist()) == [2, 5, 9]
    assert (got_ids[:, 3:] == -1).all()
    assert np.isneginf(got_scores[:, 3:]).all()
    assert np.isfinite(got_scores[:, :3]).all()


def test_searching_an_empty_index_returns_only_padding(make):
    got_ids, got_scores = make().search(unit_vectors(3), k=4)
    assert got_ids.shape == (3, 4)
    assert (got_ids == -1).all() and np.isneginf(got_scores).all()


# --------------------------------------------------------------------------
# Upsert and remove
# --------------------------------------------------------------------------


def test_adding_an_existing_id_replaces_its_vector_without_duplicating(index, corpus):
    ids, vectors = corpus
    target = int(ids[123])
    new_vector = unit_vectors(1, seed=99)

    index.add([target], new_vector)

    assert index.count() == len(index) == N
    np.testing.assert_array_equal(index.ids(), np.sort(ids))
    got_ids, got_scores = index.search(new_vector, k=5)
    assert got_ids[0, 0] == target
    assert target not in got_ids[0, 1:]
    assert got_scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    # The old vector is gone: searching with it finds the target at most once,
    # scored by its new vector. An exact index ranks every row: exactly once.
    old_ids, old_scores = index.search(vectors[123], k=N if _is_exact(index) else 50)
    assert np.count_nonzero(old_ids == target) <= 1
    if _is_exact(index):
        assert target in old_ids[0]
    if target in old_ids[0]:
        position = list(old_ids[0]).index(target)
        assert old_scores[0, position] == pytest.approx(float(new_vector[0] @ vectors[123]), abs=1e-5)


def test_an_id_repeated_within_one_batch_keeps_its_last_vector(make):
    idx = make()
    v = unit_vectors(3, seed=6)
    idx.add([7, 8, 7], v)

    assert idx.count() == 2
    np.testing.assert_array_equal(idx.ids(), [7, 8])
    got_ids, got_scores = idx.search(v[2], k=2)
    assert got_ids[0, 0] == 7
    assert got_scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_upsert_mixing_new_and_existing_ids(make):
    idx = make()
    idx.add([1, 2, 3], unit_vectors(3, seed=7))
    idx.add([3, 4], unit_vectors(2, seed=8))
    assert idx.count() == 4
    np.testing.assert_array_equal(idx.ids(), [1, 2, 3, 4])


def test_remove_deletes_rows_counts_them_and_ignores_unknown_ids(index, corpus):
    ids, vectors = corpus
    gone = ids[:10]

    removed = index.remove(np.concatenate([gone, [1, 2, 999_999_999_999]]))

    assert removed == 10
    assert index.count() == N - 10
    np.testing.assert_array_equal(index.ids(), np.sort(ids[10:]))
    got_ids, _ = index.search(vectors[:10], k=N - 10)  # every remaining row
    assert not np.isin(got_ids, gone).any()
    assert index.remove(gone) == 0
    assert index.remove([]) == 0


def test_removing_everything_leaves_an_empty_searchable_index(index, corpus):
    ids, _ = corpus
    assert index.remove(ids) == N
    assert index.count() == 0
    assert index.ids().dtype == np.int64 and index.ids().size == 0
    got_ids, _ = index.search(unit_vectors(1), k=3)
    assert (got_ids == -1).all()
    index.add([42], unit_vectors(1, seed=3))
    assert index.search(unit_vectors(1, seed=3), k=1)[0][0, 0] == 42


def test_heavy_churn_keeps_results_consistent(make):
    """Many rounds of replacing and removing rows: what is searched is what is stored."""
    idx = make()
    rng = np.random.default_rng(20)
    truth: dict[int, np.ndarray] = {}
    for round_no in range(6):
        new_ids = rng.choice(400, size=120, replace=False)
        vectors = unit_vectors(120, seed=100 + round_no)
        idx.add(new_ids, vectors)
        truth.update(zip(new_ids.tolist(), vectors))
        gone = rng.choice(400, size=40, replace=False)
        removed = idx.remove(gone)
        assert removed == sum(truth.pop(int(i), None) is not None for i in gone)
    assert idx.count() == len(truth)
    np.testing.assert_array_equal(idx.ids(), sorted(truth))
    ids = np.array(sorted(truth))
    vectors = np.stack([truth[i] for i in ids])
    got_ids, got_scores = idx.search(vectors[:30], k=1)
    assert np.mean(got_ids[:, 0] == ids[:30]) >= 0.95
    assert np.isin(idx.search(unit_vectors(5, seed=77), k=20)[0], ids).all()


# --------------------------------------------------------------------------
# Bad input and parameters
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, vectors",
    [
        pytest.param([1, 2], unit_vectors(2, dim=DIM + 1), id="wrong-dim"),
        pytest.param([1, 2, 3], unit_vectors(2), id="fewer-vectors-than-ids"),
        pytest.param([1], unit_vectors(2), id="more-vectors-than-ids"),
        pytest.param([1], unit_vectors(1)[0], id="1d-vector-on-add"),
        pytest.param([[1, 2]], unit_vectors(2), id="2d-ids"),
        pytest.param([1.0, 2.0], unit_vectors(2), id="float-ids"),
        pytest.param([-1, 2], unit_vectors(2), id="negative-id"),
        pytest.param([1, 2], np.array([["a"] * DIM] * 2), id="string-vectors"),
    ],
)
def test_malformed_add_raises_vector_index_error(make, ids, vectors):
    idx = make()
    with pytest.raises(VectorIndexError):
        idx.add(ids, vectors)
    assert idx.count() == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors_and_queries_are_refused(make, bad):
    idx = make()
    v = unit_vectors(2)
    v[1, 3] = bad
    with pytest.raises(VectorIndexError):
        idx.add([1, 2], v)
    assert idx.count() == 0
    with pytest.raises(VectorIndexError):
        idx.search(v, k=1)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "3", None])
def test_k_must_be_a_positive_integer(index, k):
    with pytest.raises(VectorIndexError):
        index.search(unit_vectors(1), k=k)


def test_query_of_the_wrong_dimension_is_refused(index):
    with pytest.raises(VectorIndexError):
        index.search(unit_vectors(1, dim=DIM - 1), k=1)


def test_unknown_parameters_are_refused(make):
    with pytest.raises(VectorIndexError):
        make(no_such_parameter=3)


def test_search_parameters_can_be_changed_and_others_cannot(index):
    names = type(index).search_param_names
    with pytest.raises(VectorIndexError):
        index.set_search_params(no_such_parameter=1)
    for name in names:
        index.set_search_params(**{name: 7})
        assert index.params[name] == 7
        with pytest.raises(VectorIndexError):
            index.set_search_params(**{name: -5})
        assert index.params[name] == 7
    assert index.search(unit_vectors(1), k=3)[0].shape == (1, 3)


def test_params_for_scope_keep_deployment_params(spec):
    _, backend, params = spec
    cls = get_backend(backend)
    scoped = cls.params_for_scope(dict(params), "m3_image")
    for key, value in params.items():
        assert scoped[key] == value
    assert cls.params_for_scope(dict(params), "m3_image") == scoped, "deterministic"
    if backend == "pgvector":
        assert scoped["table"] == "vecidx_m3_image"
        assert cls.params_for_scope({"table": "mine"}, "m3_image")["table"] == "mine"


# --------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_results(index, tmp_path):
    path = tmp_path / "index.vidx"
    checksum = index.save(path)

    assert checksum == sha256_file(path)
    queries = unit_vectors(15, seed=9)
    # Through the registry (backend read from the file) and the backend class.
    for loaded in (load_index(path, checksum=checksum), type(index).load(path, checksum=checksum)):
        assert type(loaded) is type(index)
        assert loaded.dim == DIM and loaded.params == index.params and loaded.count() == N
        np.testing.assert_array_equal(loaded.ids(), index.ids())
        for got, want in zip(loaded.search(queries, k=20), index.search(queries, k=20)):
            np.testing.assert_array_equal(got, want)
    assert type(index).load(path).count() == N


def test_a_loaded_index_stays_mutable(index, tmp_path):
    path = tmp_path / "index.vidx"
    index.save(path)
    first = int(index.ids()[0])
    loaded = load_index(path)
    loaded.add([1], unit_vectors(1, seed=10))
    assert loaded.remove([first]) == 1
    assert loaded.count() == N
    assert loaded.search(unit_vectors(1, seed=10), k=1)[0][0, 0] == 1


def test_saving_the_same_index_twice_gives_the_same_checksum(index, tmp_path):
    assert index.save(tmp_path / "a.vidx") == index.save(tmp_path / "b.vidx")


def test_a_tampered_file_fails_checksum_verification(index, tmp_path):
    path = tmp_path / "index.vidx"
    checksum = index.save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        load_index(path, checksum=checksum)


@pytest.mark.parametrize("cut", [lambda d: d[: len(d) // 2], lambda d: d[:20], lambda d: b"junk" + d[4:]])
def test_a_corrupt_file_raises_vector_index_error(index, tmp_path, cut):
    path = tmp_path / "index.vidx"
    index.save(path)
    path.write_bytes(cut(path.read_bytes()))
    with pytest.raises(VectorIndexError):
        load_index(path)


def test_a_saved_version_is_a_snapshot_or_names_live_rows(index, tmp_path):
    path = tmp_path / "index.vidx"
    index.save(path)
    index.remove(index.ids()[:100])
    reopened = load_index(path)
    if type(index).snapshot_files:
        assert reopened.count() == N
    else:  # the file names live storage: later changes show through
        assert reopened.count() == N - 100


# --------------------------------------------------------------------------
# faiss-hnsw: tombstones and rebuilds
# --------------------------------------------------------------------------


def test_hnsw_removal_leaves_tombstones_that_searches_skip(corpus):
    ids, vectors = corpus
    idx = create_index("faiss-hnsw", DIM, rebuild_fraction=0.5)
    idx.add(ids, vectors)
    assert idx.remove(ids[:100]) == 100
    assert idx.tombstones == 100 and idx.count() == N - 100
    got_ids, _ = idx.search(vectors[:100], k=10)
    assert not np.isin(got_ids, ids[:100]).any()
    assert (got_ids >= 0).all(), "over-fetch still fills k live rows"
    assert recall(idx.search(vectors[100:150], k=1)[0], ids[100:150, None]) >= 0.98


def test_hnsw_rebuilds_itself_once_tombstones_pass_the_fraction(corpus, tmp_path):
    ids, vectors = corpus
    idx = create_index("faiss-hnsw", DIM, rebuild_fraction=0.2)
    idx.add(ids, vectors)
    idx.remove(ids[:90])
    assert idx.tombstones == 90
    path = tmp_path / "tombstones.vidx"
    idx.save(path)
    reopened = load_index(path)
    assert reopened.tombstones == 90 and reopened.count() == N - 90
    np.testing.assert_array_equal(reopened.search(vectors[:5], k=5)[0], idx.search(vectors[:5], k=5)[0])

    idx.remove(ids[90:110])  # 110 of 500 > 20 %
    assert idx.tombstones == 0 and idx.count() == N - 110
    np.testing.assert_array_equal(idx.ids(), np.sort(ids[110:]))
    got_ids, got_scores = idx.search(vectors[110:160], k=1)
    assert np.mean(got_ids[:, 0] == ids[110:160]) >= 0.98


def test_hnsw_replacing_a_vector_tombstones_the_old_row(corpus):
    ids, vectors = corpus
    idx = create_index("faiss-hnsw", DIM)
    idx.add(ids, vectors)
    idx.add(ids[:3], unit_vectors(3, seed=50))
    assert idx.tombstones == 3 and idx.count() == N
    got_ids, got_scores = idx.search(unit_vectors(3, seed=50), k=1)
    np.testing.assert_array_equal(got_ids[:, 0], ids[:3])


# --------------------------------------------------------------------------
# faiss-ivfpq: training
# --------------------------------------------------------------------------


def test_ivfpq_is_exact_until_it_has_enough_rows_to_train(corpus):
    ids, vectors = corpus
    idx = create_index("faiss-ivfpq", DIM, nlist=8, pq_nbits=4, train_size=400, refine="none")
    idx.add(ids[:399], vectors[:399])
    assert not idx.is_trained
    queries = unit_vectors(10, seed=2)
    want, _ = brute_force(ids[:399], vectors[:399], queries, 10)
    np.testing.assert_array_equal(idx.search(queries, k=10)[0], want)
    idx.add(ids[399:], vectors[399:])
    assert idx.is_trained and idx.count() == N
    assert idx.params["pq_m"] == DIM // 8 and idx.params["nlist"] == 8


def test_ivfpq_explicit_training_encodes_rows_added_before(corpus, tmp_path):
    ids, vectors = corpus
    idx = create_index("faiss-ivfpq", DIM, nlist=64, pq_m=16, pq_nbits=4, refine="sq8", nprobe=64)
    idx.add(ids[:50], vectors[:50])
    path = tmp_path / "untrained.vidx"
    idx.save(path)
    assert not load_index(path).is_trained and load_index(path).count() == 50

    idx.train(unit_vectors(2000, seed=30))
    assert idx.is_trained and idx.count() == 50
    assert idx.params["nlist"] == 2000 // 39, "nlist is lowered to what the sample supports"
    idx.add(ids[50:], vectors[50:])
    queries = unit_vectors(20, seed=2)
    want, _ = brute_force(ids, vectors, queries, 10)
    assert recall(idx.search(queries, k=10)[0], want) >= 0.8
    with pytest.raises(VectorIndexError):
        idx.train(vectors)


def test_ivfpq_training_on_its_buffer_indexes_like_explicit_training():
    """Automatic training (the buffer reaching ``train_size``) assigns the buffered rows
    once; the result is the index explicit training on the same rows gives."""
    vectors, queries = clustered(1200, seed=7), clustered(20, seed=8)
    ids = np.arange(1, 1201, dtype=np.int64) * 3
    params = dict(nlist=16, pq_m=8, pq_nbits=6, refine="sq6", nprobe=4)
    auto = create_index("faiss-ivfpq", 64, train_size=1200, **params)
    auto.add(ids, vectors)
    explicit = create_index("faiss-ivfpq", 64, **params)
    explicit.add(ids, vectors)
    explicit.train(vectors)
    assert auto.is_trained and explicit.is_trained
    got, want = auto.search(queries, k=10), explicit.search(queries, k=10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


def clustered(n: int, seed: int = 0, dim: int = 64, clusters: int = 16) -> np.ndarray:
    """Unit vectors around a few fixed centres, as embeddings are (rows have cosine
    ~0.93 with their centre); ``seed`` draws different rows of the same mixture."""
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(clusters, size=n)] + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rescore_error(idx, queries, vectors):
    """Mean |re-ranking score - exact score| over the candidates of ``queries``."""
    ids, scores = idx.search(queries, k=20)
    exact = np.einsum("qkd,qd->qk", vectors[ids], queries)
    return float(np.abs(scores - exact).mean())


def test_ivfpq_residual_codes_rescore_more_precisely_than_plain_codes():
    vectors, queries = clustered(3000), clustered(30, seed=1)
    ids = np.arange(3000)
    errors = {}
    for residual in (True, False):
        idx = create_index("faiss-ivfpq", 64, nlist=32, nprobe=32, pq_m=8, refine="sq6",
                           refine_residual=residual, train_size=3000)
        idx.add(ids, vectors)
        assert idx.is_trained
        errors[residual] = _rescore_error(idx, queries, vectors)
    assert errors[True] < 0.7 * errors[False], errors  # measured: 0.53


def test_ivfpq_codes_of_removed_rows_are_compacted_and_the_rest_still_rescored(tmp_path):
    vectors, queries = clustered(2000), clustered(20, seed=1)
    ids = np.arange(10, 2010) * 3
    idx = create_index("faiss-ivfpq", 64, nlist=16, nprobe=16, pq_m=8, refine="sq8", train_size=2000)
    idx.add(ids, vectors)
    assert len(idx._codes) == 2000
    gone = ids[::2]
    assert idx.remove(gone) == 1000
    assert len(idx._codes) == 1000, "half the codes were dead: compacted"
    kept, kept_vectors = ids[1::2], vectors[1::2]
    got_ids, got_scores = idx.search(queries, k=10)
    assert not np.isin(got_ids, gone).any()
    rows = np.searchsorted(kept, got_ids)
    error = np.abs(got_scores - np.einsum("qkd,qd->qk", kept_vectors[rows], queries))
    # Residual ranges are trimmed to quantiles: a rare outlying coordinate is clipped.
    assert np.quantile(error, 0.95) < 0.01 and error.max() < 0.05
    want, _ = brute_force(kept, kept_vectors, queries, 10)
    assert recall(got_ids, want) >= 0.9

    # Saved and loaded (codes mapped from the file), then changed again.
    idx.save(tmp_path / "ivf.vidx")
    loaded = load_index(tmp_path / "ivf.vidx")
    np.testing.assert_array_equal(loaded.search(queries, k=10)[0], got_ids)
    fresh = clustered(5, seed=7)
    loaded.add(kept[:5], fresh)  # replace five rows
    loaded.add([1, 2], vectors[:2])  # and add two
    assert loaded.count() == 1002
    top, score = loaded.search(fresh, k=1)
    np.testing.assert_array_equal(top[:, 0], kept[:5])
    assert (score[:, 0] > 0.98).all()


def test_ivfpq_with_an_opq_rotation_rescores_and_reloads(tmp_path):
    vectors, queries = clustered(1500), clustered(10, seed=1)
    ids = np.arange(1500)
    idx = create_index("faiss-ivfpq", 64, nlist=8, nprobe=8, pq_m=8, opq=True, refine="sq8", train_size=1500)
    idx.add(ids, vectors)
    assert idx._index.ntotal == 1500
    got, scores = idx.search(queries, k=10)
    want, want_scores = brute_force(ids, vectors, queries, 10)
    assert recall(got, want) >= 0.9
    np.testing.assert_allclose(scores[:, 0], want_scores[:, 0], atol=0.01)
    idx.save(tmp_path / "opq.vidx")
    np.testing.assert_array_equal(load_index(tmp_path / "opq.vidx").search(queries, k=10)[0], got)


def test_ivfpq_refuses_a_pq_m_that_does_not_divide_the_dimension():
    with pytest.raises(VectorIndexError):
        create_index("faiss-ivfpq", DIM, pq_m=5)
    with pytest.raises(VectorIndexError):
        create_index("faiss-ivfpq", DIM, refine="sq3")
    with pytest.raises(VectorIndexError):
        create_index("faiss-ivfpq", DIM, refine_residual="yes")


# --------------------------------------------------------------------------
# pgvector: tables, transactions, the SQL plan
# --------------------------------------------------------------------------


@pytest.fixture
def pg(request):
    if not _pg_available(request):
        pytest.skip("pgvector needs PostgreSQL: run under bin/test or set VECTOR_INDEX_PG_DSN")
    made = []

    def factory(**params):
        index = create_index("pgvector", DIM, **params)
        made.append(index)
        return index

    yield factory
    if os.environ.get("VECTOR_INDEX_PG_DSN"):
        for index in made:
            index.drop()


def _pg_connection(index):
    return index._connection()


def test_pgvector_search_is_an_index_scan_on_the_hnsw_index(pg, corpus):
    ids, vectors = corpus
    idx = pg()
    idx.add(ids, vectors)
    conn = _pg_connection(idx)
    import psycopg
    from pgvector import Vector
    from psycopg.pq import TransactionStatus

    local = conn.info.transaction_status != TransactionStatus.IDLE
    with psycopg.Cursor(conn) as cur:
        # 500 rows are cheaper to scan than to search: make the planner show the index path.
        cur.execute("SELECT set_config('enable_seqscan', 'off', %s)", [local])
        plan = "\n".join(
            row[0]
            for row in cur.execute(
                f'EXPLAIN SELECT id FROM "{idx.params["table"]}" ORDER BY embedding <#> %s LIMIT 10',
                [Vector(vectors[0])],
            ).fetchall()
        )
        if not local:
            cur.execute("SELECT set_config('enable_seqscan', 'on', false)")
    assert f'{idx.params["table"]}_hnsw' in plan, plan


def test_pgvector_bulk_load_builds_the_index_after_copying(pg, corpus):
    ids, vectors = corpus
    idx = pg(bulk_build_min=100)
    idx.add(ids, vectors)
    conn = _pg_connection(idx)
    found = conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = %s", [idx.params["table"]]
    ).fetchall()
    assert any("hnsw" in row[0] and "vector_ip_ops" in row[0] for row in found)
    want, _ = brute_force(ids, vectors, vectors[:20], 10)
    assert recall(idx.search(vectors[:20], k=10)[0], want) >= 0.95


def test_pgvector_cosine_distance_scores_as_cosine_similarity(pg, corpus):
    ids, vectors = corpus
    idx = pg(distance="cosine")
    idx.add(ids, vectors * 3.0)  # not unit length: cosine ignores the norm
    got_ids, got_scores = idx.search(vectors[:5], k=1)
    np.testing.assert_array_equal(got_ids[:, 0], ids[:5])
    np.testing.assert_allclose(got_scores[:, 0], 1.0, atol=1e-5)


def test_pgvector_rows_roll_back_with_the_surrounding_transaction(pg, corpus):
    """Written on the caller's connection, inside its transaction."""
    ids, vectors = corpus
    idx = pg()
    idx.add(ids[:10], vectors[:10])
    conn = _pg_connection(idx)
    if os.environ.get("VECTOR_INDEX_PG_DSN") and conn.autocommit:
        with pytest.raises(RuntimeError), conn.transaction():
            idx.add(ids[10:20], vectors[10:20])
            raise RuntimeError("abort")
    else:
        from django.db import transaction

        with pytest.raises(RuntimeError), transaction.atomic():
            idx.add(ids[10:20], vectors[10:20])
            assert idx.count() == 20
            raise RuntimeError("abort")
    assert idx.count() == 10


def test_pgvector_loading_a_manifest_of_a_missing_table_fails(pg, corpus, tmp_path):
    ids, vectors = corpus
    idx = pg()
    idx.add(ids[:5], vectors[:5])
    path = tmp_path / "manifest.vidx"
    idx.save(path)
    idx.drop()
    with pytest.raises(VectorIndexError, match="does not exist"):
        load_index(path)


def test_pgvector_refuses_a_table_of_another_dimension(pg, corpus):
    ids, vectors = corpus
    idx = pg()
    idx.add(ids[:5], vectors[:5])
    other = create_index("pgvector", DIM * 2, table=idx.params["table"])
    with pytest.raises(VectorIndexError, match=f"vector\\({DIM}\\)"):
        other.count()


def test_pgvector_k_beyond_the_hnsw_limit_scans_exactly(pg):
    idx = pg()
    vectors = unit_vectors(1100, seed=40)
    idx.add(np.arange(1100), vectors)
    got_ids, got_scores = idx.search(vectors[0], k=1050)
    assert (got_ids >= 0).all() and len(set(got_ids[0].tolist())) == 1050
    assert np.all(np.diff(got_scores[0]) <= 1e-6)


@pytest.mark.parametrize("bad", [{"table": "x; DROP TABLE y"}, {"m": 1}, {"maintenance_work_mem": "lots"},
                                 {"distance": "l1"}, {"ef_search": 5000}])
def test_pgvector_checks_its_parameters(bad):
    with pytest.raises(VectorIndexError):
        create_index("pgvector", DIM, **bad)


# --------------------------------------------------------------------------
# The benchmark command (tiny sizes)
# --------------------------------------------------------------------------


def bench_index(**options) -> str:
    """What ``manage.py bench_index`` prints for a small IVF-PQ run."""
    from django.conf import settings

    if not settings.configured:
        pytest.skip("management commands need Django settings (run under bin/test)")
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("bench_index", backend="faiss-ivfpq", n=3000, dim=DIM, clusters=16, no_store=True, stdout=out,
                 **options)
    return out.getvalue()


def test_bench_index_command_prints_a_recall_latency_table():
    text = bench_index(queries=20, params='{"nlist": 16, "pq_m": 8, "train_size": 1000}',
                       sweep="nprobe=4,16;k_factor=4,16")
    assert "recall@10" in text and "nprobe, k_factor" in text
    rows = [line for line in text.splitlines() if line.count("|") == 4 and "recall" not in line]
    assert len(rows) == 4
    recalls = [float(line.split("|")[1]) for line in rows]
    assert max(recalls) >= 0.9


def test_bench_index_refine_study_ranks_the_codes_by_precision():
    text = bench_index(queries=30, params='{"nlist": 16, "nprobe": 16, "pq_m": 8, "train_size": 1000}',
                       sweep="nprobe=16", refine_study=8)
    study = dict(line.strip().rsplit(": ", 1) for line in text.splitlines() if line.startswith("  ") and ": " in line)
    study = {name.strip(): float(value) for name, value in study.items()}
    assert set(study) == {"PQ codes only", "sq6", "sq6 residual", "sq8", "sq8 residual", "flat"}
    assert study["flat"] >= study["sq8"] >= study["PQ codes only"]
    assert study["flat"] >= 0.9 > study["PQ codes only"]
