"""Searches inside a ``Subset``, for every backend and each of its strategies:
only the subset's rows come back, ``k`` of them however selective the subset,
exactly (flat, buffered IVF-PQ) or at recall@10 >= 0.95 against brute force
over the subset (graphs, IVF-PQ, pgvector).

The pgvector cases need PostgreSQL, as in test_vector_index_backends.py: under
``bin/test`` the test database (each test rolled back), elsewhere
``VECTOR_INDEX_PG_DSN``; otherwise they are skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from search.core.vector_index import Subset, VectorIndexError, create_index, load_index
from tests.search.core.vectors import DIM, brute_force, recall, sparse_ids, unit_vectors

BIG = 20_000  # rows of the corpus for selective subsets: 0.1 % of it is 20 rows
K = 10

# name -> (backend, parameters, attributes set on the instance). Each strategy of
# a backend is a case of its own: the switch points are forced one way or the other.
SPECS = {
    "faiss-flat": ("faiss-flat", {}, {}),
    "faiss-flat-scan": ("faiss-flat", {}, {"gather_max_fraction": 0.0}),
    "faiss-flat-rows": ("faiss-flat", {}, {"gather_max_fraction": 1.0}),
    "faiss-hnsw": ("faiss-hnsw", {}, {}),
    "faiss-hnsw-graph": ("faiss-hnsw", {"exact_subset_max": 0}, {}),
    "faiss-ivfpq": ("faiss-ivfpq", {"nlist": 16, "nprobe": 8, "pq_m": 16, "pq_nbits": 4, "train_size": 2000,
                                    "refine": "flat", "k_factor": 32}, {}),
    "faiss-ivfpq-lists": ("faiss-ivfpq", {"nlist": 16, "nprobe": 8, "pq_m": 16, "pq_nbits": 4, "train_size": 2000,
                                          "refine": "sq8", "k_factor": 32, "exact_subset_max": 0}, {}),
    "faiss-ivfpq-untrained": ("faiss-ivfpq", {"train_size": 1 << 30}, {}),
    # Random 32-d vectors are harder for a graph than embeddings: a wider candidate list.
    "pgvector": ("pgvector", {"ef_search": 100}, {}),
}


@pytest.fixture(autouse=True, scope="module")
def single_threaded_faiss():
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


LAYOUTS = ("dense", "sparse")


def pytest_generate_tests(metafunc):
    """Each case of SPECS; on the big corpus also each id layout (pgvector keeps its
    ids in a table, whatever they are: one layout, and fewer slow table builds)."""
    if "layout" in metafunc.fixturenames:
        pairs = [(name, layout) for name in SPECS for layout in LAYOUTS
                 if SPECS[name][0] != "pgvector" or layout == "dense"]
        metafunc.parametrize(("spec_name", "layout"), pairs, ids=[f"{n}-{lay}" for n, lay in pairs])
    elif "spec_name" in metafunc.fixturenames:
        metafunc.parametrize("spec_name", list(SPECS))


@pytest.fixture
def make(request, spec_name):
    """make(**extra) -> a new empty index of the case under test."""
    backend, params, attributes = SPECS[spec_name]
    if backend == "pgvector" and not _pg_available(request):
        pytest.skip("pgvector needs PostgreSQL: run under bin/test or set VECTOR_INDEX_PG_DSN")
    created = []

    def factory(**extra):
        index = create_index(backend, DIM, **{**params, **extra})
        for name, value in attributes.items():
            setattr(index, name, value)
        created.append(index)
        return index

    yield factory
    if backend == "pgvector" and os.environ.get("VECTOR_INDEX_PG_DSN"):
        for index in created:
            index.drop()


def _exact(index) -> bool:
    return type(index).exact or not index.is_trained


def _big_corpus(layout: str):
    """BIG unit vectors under database-like ids (3, 6, 9 ...) or large sparse ones."""
    ids = np.arange(1, BIG + 1, dtype=np.int64) * 3 if layout == "dense" else sparse_ids(BIG)
    return ids, unit_vectors(BIG, seed=11)


@pytest.fixture
def big(layout):
    return _big_corpus(layout)


@pytest.fixture
def big_index(make, big):
    ids, vectors = big
    index = make()
    index.add(ids, vectors)
    return index


@pytest.fixture
def small_index(make, corpus):
    ids, vectors = corpus
    index = make()
    index.add(ids, vectors)
    return index


def _kept(ids: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A random subset of ``ids`` keeping ``fraction`` of them, in random order."""
    rng = np.random.default_rng(seed)
    return rng.permutation(ids)[: max(1, round(fraction * len(ids)))]


def _truth(ids, vectors, queries, subset_ids, k=K):
    inside = np.isin(ids, subset_ids)
    return brute_force(ids[inside], vectors[inside], queries, k)


def _check_against_brute_force(index, ids, vectors, queries, subset_ids):
    got_ids, got_scores = index.search(queries, K, Subset(subset_ids))
    want_ids, want_scores = _truth(ids, vectors, queries, subset_ids)
    assert np.isin(got_ids, subset_ids).all(), "only rows of the subset come back"
    assert (got_ids >= 0).all(), "k hits whenever k rows of the subset are stored"
    if _exact(index):
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-5)
    else:
        assert recall(got_ids, want_ids) >= 0.95
        assert np.all(np.diff(got_scores, axis=1) <= 1e-6), "best first"


# --------------------------------------------------------------------------
# The Subset itself
# --------------------------------------------------------------------------


def test_a_subset_keeps_its_ids_sorted_unique_and_int64():
    subset = Subset([9, 3, 3, 7])
    assert subset.ids.dtype == np.int64 and subset.ids.flags.c_contiguous
    np.testing.assert_array_equal(subset.ids, [3, 7, 9])
    assert len(subset) == 3 and subset.sql is None
    assert len(Subset([])) == 0 and Subset([]), "an empty filter is still a filter"
    already = np.arange(5, dtype=np.int64)
    assert Subset(already).ids is already, "sorted unique ids are kept as they are"


def test_a_subset_needs_ids_or_sql_and_refuses_bad_ids():
    with pytest.raises(VectorIndexError):
        Subset()
    with pytest.raises(VectorIndexError):
        Subset(sql="  ")
    with pytest.raises(VectorIndexError):
        Subset([-1, 2])
    with pytest.raises(VectorIndexError):
        Subset([1.5])
    sql_only = Subset(sql="id IN (SELECT id FROM t WHERE x = %s)", sql_params=[4])
    assert sql_only.ids is None and sql_only.sql_params == (4,)
    with pytest.raises(TypeError):
        len(sql_only)


# --------------------------------------------------------------------------
# Every backend, every strategy
# --------------------------------------------------------------------------


def test_a_filtered_search_matches_brute_force_over_the_subset(big_index, big):
    ids, vectors = big
    for fraction in (0.5, 0.1, 0.01):
        # 25 queries: FAISS's batched product for the flat scan; single queries below.
        _check_against_brute_force(big_index, ids, vectors, unit_vectors(25, seed=2), _kept(ids, fraction))


def test_a_filter_keeping_one_row_in_a_thousand_still_returns_k_hits(big_index, big):
    ids, vectors = big
    subset_ids = _kept(ids, 0.001)
    assert len(subset_ids) == 20
    for query in unit_vectors(5, seed=3):
        _check_against_brute_force(big_index, ids, vectors, query[None, :], subset_ids)


def test_a_filter_correlated_with_the_query_still_finds_the_subsets_best(big_index, big):
    """The rows nearest the query are all outside the subset: the walk must go past them."""
    ids, vectors = big
    queries = unit_vectors(10, seed=4)
    near = np.unique(brute_force(ids, vectors, queries, 1000)[0])
    subset_ids = _kept(np.setdiff1d(ids, near), 0.01, seed=5)
    _check_against_brute_force(big_index, ids, vectors, queries, subset_ids)


def test_a_subset_smaller_than_k_pads_with_minus_one(small_index, corpus):
    ids, _ = corpus
    got_ids, got_scores = small_index.search(unit_vectors(2, seed=6), K, Subset(ids[[5, 50, 400]]))
    assert sorted(got_ids[0, :3].tolist()) == sorted(ids[[5, 50, 400]].tolist())
    assert (got_ids[:, 3:] == -1).all() and np.isneginf(got_scores[:, 3:]).all()


def test_an_empty_subset_returns_empty_results(small_index):
    got_ids, got_scores = small_index.search(unit_vectors(3, seed=7), K, Subset([]))
    assert got_ids.shape == got_scores.shape == (3, K)
    assert (got_ids == -1).all() and np.isneginf(got_scores).all()


def test_ids_not_in_the_index_are_ignored(big_index, big):
    ids, vectors = big
    queries = unit_vectors(5, seed=8)
    stored = _kept(ids, 0.01)
    unknown = np.array([0, 1, 2, int(ids.max()) + 1, 1 << 50], dtype=np.int64)
    unknown = unknown[~np.isin(unknown, ids)]
    got_ids, _ = big_index.search(queries, K, Subset(np.concatenate([stored, unknown])))
    assert np.isin(got_ids, stored).all()
    want_ids, _ = _truth(ids, vectors, queries, stored)
    assert recall(got_ids, want_ids) >= (1.0 if _exact(big_index) else 0.95)
    nothing, _ = big_index.search(queries, K, Subset(unknown))
    assert (nothing == -1).all()


def test_without_a_subset_a_search_is_unchanged(small_index):
    queries = unit_vectors(5, seed=9)
    plain = small_index.search(queries, K)
    for got, want in zip(small_index.search(queries, K, None), plain):
        np.testing.assert_array_equal(got, want)
    if _exact(small_index):  # a subset of every row is no filter at all
        for got, want in zip(small_index.search(queries, K, Subset(small_index.ids())), plain):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_removed_and_replaced_rows_never_come_back(make, big):
    ids, vectors = big
    index = make()
    index.add(ids, vectors)
    queries = unit_vectors(5, seed=10)
    subset = Subset(_kept(ids, 0.01))
    best = index.search(queries, K, subset)[0]
    gone = np.unique(best[:, :3])
    replaced = np.setdiff1d(best, gone)[:5]
    fresh = unit_vectors(len(replaced), seed=12)

    assert index.remove(gone) == len(gone)
    index.add(replaced, fresh)

    got_ids, _ = index.search(queries, K, subset)
    assert not np.isin(got_ids, gone).any()
    assert (got_ids >= 0).all()
    current = vectors.copy()
    current[np.searchsorted(ids, replaced)] = fresh
    live = ~np.isin(ids, gone)
    want_ids, _ = _truth(ids[live], current[live], queries, subset.ids)
    assert recall(got_ids, want_ids) >= (1.0 if _exact(index) else 0.95)


def test_a_filtered_search_survives_saving_and_loading(big_index, tmp_path):
    path = tmp_path / "filtered.vidx"
    big_index.save(path)
    loaded = load_index(path)
    subset = Subset(_kept(big_index.ids(), 0.01))
    queries = unit_vectors(5, seed=13)
    for got, want in zip(loaded.search(queries, K, subset), big_index.search(queries, K, subset)):
        np.testing.assert_array_equal(got, want)


def test_a_subset_that_is_not_a_subset_is_refused(small_index):
    with pytest.raises(VectorIndexError):
        small_index.search(unit_vectors(1), K, [1, 2, 3])


# --------------------------------------------------------------------------
# Particular to a backend
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-hnsw", "faiss-ivfpq"])
def test_a_faiss_backend_refuses_a_subset_given_only_as_sql(backend):
    index = create_index(backend, DIM)
    index.add([1, 2], unit_vectors(2))
    with pytest.raises(VectorIndexError, match="ids"):
        index.search(unit_vectors(1), K, Subset(sql="id < 10"))
    both = Subset([2], sql="id < 10")  # the ids serve where SQL cannot
    assert index.search(unit_vectors(1), K, both)[0][0, 0] == 2


def test_the_flat_device_path_masks_rows_outside_the_subset(monkeypatch):
    from search.core.vector_index import faiss_flat

    ids, vectors = _big_corpus("sparse")
    on_device = create_index("faiss-flat", DIM)
    on_device.add(ids, vectors)
    # torch on the CPU stands in for the CUDA device: the same code path
    monkeypatch.setattr(faiss_flat, "search_device", lambda: "cpu")
    for fraction in (0.5, 0.001):
        _check_against_brute_force(on_device, ids, vectors, unit_vectors(5, seed=14), _kept(ids, fraction))
    assert on_device._mirror is not None, "the device copy answered"


@pytest.mark.parametrize("scan", ["fp16", "float32"])
def test_a_single_flat_query_scans_a_large_subset_exactly_either_way(monkeypatch, scan):
    from search.core.vector_index import faiss_flat

    monkeypatch.setenv(faiss_flat.FLAT_SCAN_ENV_VAR, scan)
    ids, vectors = _big_corpus("sparse")
    index = create_index("faiss-flat", DIM)
    index.add(ids, vectors)
    subset_ids = _kept(ids, 0.6)
    assert len(subset_ids) > index.gather_max_fraction * len(ids), "the scan, not the rows one by one"
    for query in unit_vectors(5, seed=15):
        _check_against_brute_force(index, ids, vectors, query[None, :], subset_ids)
    assert (index._half is not None) == (scan == "fp16")


@pytest.mark.parametrize("exact_subset_max", [0, BIG])
def test_hnsw_subsets_leave_out_tombstones_in_both_strategies(exact_subset_max):
    ids, vectors = _big_corpus("dense")
    index = create_index("faiss-hnsw", DIM, rebuild_fraction=0.9, exact_subset_max=exact_subset_max)
    index.add(ids, vectors)
    subset_ids = _kept(ids, 0.2)
    gone = subset_ids[: len(subset_ids) // 2]
    index.remove(gone)
    assert index.tombstones == len(gone)
    queries = unit_vectors(10, seed=16)
    got_ids, _ = index.search(queries, K, Subset(subset_ids))
    assert not np.isin(got_ids, gone).any() and (got_ids >= 0).all()
    live = ~np.isin(ids, gone)
    want_ids, _ = _truth(ids[live], vectors[live], queries, subset_ids)
    assert recall(got_ids, want_ids) >= (1.0 if exact_subset_max else 0.95)


def test_hnsw_filter_parameters_are_search_parameters_and_checked():
    index = create_index("faiss-hnsw", DIM)
    index.set_search_params(exact_subset_max=0, subset_ef_max=64)
    assert index.params["exact_subset_max"] == 0 and index.params["subset_ef_max"] == 64
    with pytest.raises(VectorIndexError):
        index.set_search_params(exact_subset_max=-1)
    with pytest.raises(VectorIndexError):
        index.set_search_params(subset_ef_max=0)


# --------------------------------------------------------------------------
# pgvector: the filter in the SQL statement
# --------------------------------------------------------------------------


@pytest.fixture
def pg_big(request):
    """A pgvector index of the dense big corpus, and a table giving each row a bucket in [0, 1000)."""
    if not _pg_available(request):
        pytest.skip("pgvector needs PostgreSQL: run under bin/test or set VECTOR_INDEX_PG_DSN")
    ids, vectors = _big_corpus("dense")
    index = create_index("pgvector", DIM, ef_search=100)
    index.add(ids, vectors)
    conn = index._connection()
    tags = f"{index.params['table']}_tags"
    conn.execute(f'CREATE TABLE "{tags}" (id bigint PRIMARY KEY, bucket int NOT NULL)')
    buckets = np.random.default_rng(17).integers(0, 1000, len(ids))
    with conn.cursor() as cur, cur.copy(f'COPY "{tags}" (id, bucket) FROM STDIN') as copy:
        for row in zip(ids.tolist(), buckets.tolist()):
            copy.write_row(row)
    conn.execute(f'ANALYZE "{tags}"')
    conn.execute(f'ANALYZE "{index.params["table"]}"')

    def bucket_below(limit: int) -> Subset:
        return Subset(sql=f'id IN (SELECT id FROM "{tags}" WHERE bucket < %s)', sql_params=(limit,))

    yield index, bucket_below, ids, vectors, buckets
    if os.environ.get("VECTOR_INDEX_PG_DSN"):
        conn.execute(f'DROP TABLE "{tags}"')
        index.drop()


def _local(conn) -> bool:
    from psycopg.pq import TransactionStatus

    return conn.info.transaction_status != TransactionStatus.IDLE


def test_pgvector_filters_with_an_sql_condition_in_the_same_statement(pg_big):
    index, bucket_below, ids, vectors, buckets = pg_big
    queries = unit_vectors(10, seed=18)
    for per_mille in (1, 10, 100, 500):
        got_ids, got_scores = index.search(queries, K, bucket_below(per_mille))
        kept = ids[buckets < per_mille]
        assert np.isin(got_ids, kept).all() and (got_ids >= 0).all()
        assert recall(got_ids, _truth(ids, vectors, queries, kept)[0]) >= 0.95
        assert np.all(np.diff(got_scores, axis=1) <= 1e-6), "re-sorted best first"


def test_pgvector_prefers_the_sql_condition_when_both_are_given(pg_big):
    index, bucket_below, ids, _, buckets = pg_big
    both = Subset(ids[:50], sql=bucket_below(5).sql, sql_params=(5,))
    got_ids, _ = index.search(unit_vectors(3, seed=19), K, both)
    assert np.isin(got_ids, ids[buckets < 5]).all() and (got_ids >= 0).all()


def test_pgvector_orders_the_matching_rows_exactly_when_the_graph_scan_stops_early(pg_big):
    """Fewer rows pass than the iterative scan may visit: the exact ordering finds them all."""
    index, bucket_below, ids, vectors, buckets = pg_big
    conn = index._connection()
    local = _local(conn)
    # Make the planner keep the HNSW scan and let it give up after a few rows.
    conn.execute("SELECT set_config('enable_seqscan', 'off', %s), set_config('hnsw.max_scan_tuples', '50', %s)",
                 [local, local])
    queries = unit_vectors(3, seed=20)
    try:
        got_ids, _ = index.search(queries, K, bucket_below(2))
    finally:
        if not local:
            conn.execute("RESET enable_seqscan")
            conn.execute("RESET hnsw.max_scan_tuples")
    want_ids, _ = _truth(ids, vectors, queries, ids[buckets < 2])
    np.testing.assert_array_equal(got_ids, want_ids)


def test_pgvector_filtered_searches_leave_the_session_settings_alone(pg_big):
    index, bucket_below, *_ = pg_big
    conn = index._connection()

    def order() -> str:
        return conn.execute("SELECT current_setting('hnsw.iterative_scan')").fetchone()[0]

    before = order()
    index.search(unit_vectors(1), K, bucket_below(3))
    if not _local(conn):  # outside a transaction the relaxed order ended with the search's own
        assert order() == before
    index.search(unit_vectors(1), K)  # an unfiltered search sets its strict order again
    assert order() == "strict_order"


# --------------------------------------------------------------------------
# The benchmark command (tiny sizes)
# --------------------------------------------------------------------------


def bench_filters(**options) -> str:
    """What ``manage.py bench_filters`` prints for a small run."""
    from django.conf import settings

    if not settings.configured:
        pytest.skip("management commands need Django settings (run under bin/test)")
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("bench_filters", size=3000, dim=DIM, clusters=16, queries=10, stdout=out, **options)
    return out.getvalue()


def _table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")] for line in text.splitlines()
            if line.count("|") == 7 and "recall" not in line]


def test_bench_filters_prints_recall_and_latency_per_subset_and_strategy():
    text = bench_filters(backend="faiss-hnsw", selectivities="50,1", no_store=True)
    assert "load average at start" in text
    rows = _table_rows(text)
    # unfiltered, then 2 selectivities x (random, clusters) x 3 strategies
    assert len(rows) == 1 + 2 * 2 * 3
    assert {row[2] for row in rows[1:]} == {"auto", "exact", "graph"}
    exact = [float(row[3]) for row in rows if row[2] == "exact"]
    assert exact == [1.0] * 4, "exact over the subset is the reference itself"


def test_bench_filters_stores_its_figures_as_a_benchmark_run(db):
    from evaluation.models import BenchmarkRun

    text = bench_filters(backend="faiss-flat", selectivities="10")
    assert "stored as benchmark run" in text
    run = BenchmarkRun.objects.get()
    assert run.stage == "manage.py bench_filters" and run.index_backend == "faiss-flat"
    assert run.extra["benchmark"] == "filtered-search"
    assert {row["strategy"] for row in run.extra["sweep"]} == {"-", "auto", "rows", "selector"}
