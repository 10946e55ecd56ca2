"""The milvus backend's own behaviour: collections per scope, its parameters, manifests,
filters inside the search, upserts and what other processes see.

The backend behaviour suite (test_vector_index_backends.py) runs against it too. These tests
need a Milvus server: the Milvus Lite server ``bin/test`` starts, or one named by
``MILVUS_URI``; without one they are skipped. Each test drops the collections it made.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from search.core.vector_index import Subset, VectorIndexError, create_index, get_backend, load_index
from search.core.vector_index import milvus
from search.core.vector_index.base import read_index_file
from tests.search.core.vectors import DIM, brute_force, recall, sparse_ids, unit_vectors

BIG = 20_000  # 0.1 % of it is 20 rows
K = 10


# --------------------------------------------------------------------------
# Collections and parameters
# --------------------------------------------------------------------------


def test_each_scope_gets_a_collection_named_after_it():
    cls = get_backend("milvus")
    assert cls.params_for_scope({}, "m3_image")["collection"] == "vecidx_m3_image"
    assert cls.params_for_scope({"collection_prefix": "site2_"}, "m3_caption")["collection"] == "site2_m3_caption"
    assert cls.params_for_scope({"collection": "mine"}, "m3_image")["collection"] == "mine"
    assert cls.params_for_scope({"ef": 128}, "M3 image!")["collection"] == "vecidx_m3_image"


def test_scopes_keep_their_rows_apart(milvus_index):
    prefix = f"t{np.random.default_rng().integers(1 << 40):x}_"
    scoped = get_backend("milvus").params_for_scope
    image = milvus_index(**scoped({"collection_prefix": prefix}, "m3_image"))
    caption = milvus_index(**scoped({"collection_prefix": prefix}, "m3_caption"))
    image.add([1, 2, 3], unit_vectors(3, seed=1))
    caption.add([7], unit_vectors(1, seed=2))
    assert (image.collection, caption.collection) == (f"{prefix}m3_image", f"{prefix}m3_caption")
    np.testing.assert_array_equal(image.ids(), [1, 2, 3])
    np.testing.assert_array_equal(caption.ids(), [7])


@pytest.mark.parametrize("bad, message", [
    ({"collection": "no spaces"}, "collection must be"),
    ({"collection": "1starts_with_a_digit"}, "collection must be"),
    ({"collection_prefix": "a-b"}, "collection_prefix"),
    ({"m": 1}, r"m must be an integer in \[2, 2048\]"),
    ({"ef_construction": 4}, "ef_construction"),
    ({"ef": 0}, "ef must be"),
    ({"ef": 1.5}, "ef must be"),
    ({"exact_subset_max": -1}, "exact_subset_max"),
    ({"insert_batch": 0}, "insert_batch"),
    ({"consistency": "Eventual"}, "consistency must be one of"),
    ({"alias": ""}, "alias"),
    ({"ef_search": 64}, "unknown 'milvus' parameters"),
])
def test_parameters_are_checked_with_a_reason(bad, message):
    with pytest.raises(VectorIndexError, match=message):
        create_index("milvus", DIM, **bad)


def test_ef_is_a_search_parameter_and_the_graph_parameters_are_not(milvus_index):
    index = milvus_index()
    index.set_search_params(ef=200)
    assert index.params["ef"] == 200
    with pytest.raises(VectorIndexError):
        index.set_search_params(m=8)


def test_without_a_server_the_error_says_how_to_name_one(monkeypatch):
    monkeypatch.setattr(milvus, "_provider", None)
    monkeypatch.delenv("MILVUS_URI", raising=False)
    with pytest.raises(VectorIndexError, match="MILVUS_URI"):
        create_index("milvus", DIM).count()


@pytest.mark.parametrize("version, templates", [
    ("v2.6.11", True), ("2.5.0", True), ("v2.4.6", False), ("milvus_lite-3.2.2", False), ("", False),
])
def test_filter_templates_are_used_only_where_the_server_parses_them(version, templates):
    class Server:
        def get_server_version(self):
            return version

    assert milvus._parses_templates(("test", version), Server()) is templates
    milvus._versions.pop(("test", version))


def test_the_collection_is_indexed_by_hnsw_on_inner_product_with_the_graph_parameters(milvus_index):
    index = milvus_index(m=12, ef_construction=48)
    index.add([1], unit_vectors(1))
    key, client = index._client()
    described = client.describe_index(index.collection, "vector")
    graph = described.get("params", described)  # Milvus Lite nests them, Milvus does not
    assert (described["index_type"], described["metric_type"]) == ("HNSW", "IP")
    assert (int(graph["M"]), int(graph["efConstruction"])) == (12, 48)


def test_drop_removes_the_collection_and_a_later_add_makes_it_again(milvus_index):
    index = milvus_index()
    index.add([1, 2], unit_vectors(2))
    key, client = index._client()
    assert client.has_collection(index.collection)

    index.drop()

    assert not client.has_collection(index.collection)
    assert index.count() == 0 and index.ids().size == 0
    assert (index.search(unit_vectors(1), k=2)[0] == -1).all()
    index.add([3], unit_vectors(1, seed=4))
    np.testing.assert_array_equal(index.ids(), [3])


def test_a_collection_of_another_dimension_is_refused(milvus_index):
    index = milvus_index()
    index.add([1], unit_vectors(1))
    other = create_index("milvus", DIM * 2, collection=index.collection)
    with pytest.raises(VectorIndexError, match=f"not {DIM * 2}"):
        other.count()


# --------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------


def test_save_writes_a_manifest_naming_the_collection_and_load_reopens_it(milvus_index, corpus, tmp_path):
    ids, vectors = corpus
    index = milvus_index(ef=100)
    index.add(ids, vectors)
    path = tmp_path / "v000001.index"
    checksum = index.save(path)

    header, payload = read_index_file(path, checksum)
    assert header["backend"] == "milvus" and header["count"] == len(ids)
    assert header["params"]["collection"] == index.collection and header["params"]["ef"] == 100
    assert json.loads(bytes(payload)) == {"collection": index.collection, "dim": DIM}
    assert path.stat().st_size < 2000, "the rows stay in Milvus"

    loaded = load_index(path, checksum=checksum)
    assert loaded.collection == index.collection and loaded.params == index.params
    queries = unit_vectors(5, seed=3)
    for got, want in zip(loaded.search(queries, K), index.search(queries, K)):
        np.testing.assert_array_equal(got, want)

    index.drop()
    with pytest.raises(VectorIndexError, match="does not exist"):
        load_index(path)


# --------------------------------------------------------------------------
# Writes and what searches see
# --------------------------------------------------------------------------


def test_upserting_an_id_replaces_its_vector(milvus_index, corpus):
    ids, vectors = corpus
    index = milvus_index()
    index.add(ids, vectors)
    target, fresh = int(ids[7]), unit_vectors(1, seed=70)

    index.add([target], fresh)

    assert index.count() == len(ids)
    got_ids, got_scores = index.search(fresh, k=3)
    assert got_ids[0, 0] == target and got_scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    old_ids, old_scores = index.search(vectors[7], k=len(ids))
    assert np.count_nonzero(old_ids == target) == 1
    assert old_scores[old_ids == target][0] == pytest.approx(float(fresh[0] @ vectors[7]), abs=1e-5)


def test_rows_written_by_one_client_are_found_at_once_by_another(milvus_index):
    """As a worker's sync and a web process do: no flush between the write and the search."""
    writer = milvus_index()
    reader = create_index("milvus", DIM, collection=writer.collection)
    for round_no in range(3):
        rows, vectors = np.arange(round_no * 50, round_no * 50 + 50), unit_vectors(50, seed=8 + round_no)
        writer.add(rows, vectors)
        assert reader.count() == 50 * (round_no + 1)
        assert reader.search(vectors[:5], k=1)[0][:, 0].tolist() == rows[:5].tolist()
    assert writer.remove(np.arange(50)) == 50
    assert reader.count() == 100 and not np.isin(reader.ids(), np.arange(50)).any()


def test_remove_counts_only_the_ids_that_were_stored(milvus_index):
    index = milvus_index()
    index.add([1, 2, 3], unit_vectors(3))
    assert index.remove([2, 3, 4, 5]) == 2
    assert index.remove([2]) == 0
    np.testing.assert_array_equal(index.ids(), [1])


def test_a_released_collection_is_loaded_again_by_the_next_search(milvus_index):
    """After a server restart Milvus keeps collections released until someone loads them."""
    index = milvus_index()
    index.add([1, 2], unit_vectors(2, seed=9))
    key, client = index._client()
    client.release_collection(index.collection)
    assert index.search(unit_vectors(2, seed=9), k=1)[0][:, 0].tolist() == [1, 2], "an index that had it loaded"
    client.release_collection(index.collection)
    other = create_index("milvus", DIM, collection=index.collection)
    assert other.search(unit_vectors(2, seed=9), k=1)[0][:, 0].tolist() == [1, 2], "one opened afterwards"


def test_a_collection_dropped_by_another_process_reads_as_empty_and_the_next_add_makes_it_again(milvus_index):
    """A rebuild elsewhere drops the collection under an index that had it open."""
    index = milvus_index()
    index.add([1, 2], unit_vectors(2, seed=10))
    create_index("milvus", DIM, collection=index.collection).drop()
    assert (index.search(unit_vectors(1), k=2)[0] == -1).all()
    assert index.count() == 0
    index.add([3], unit_vectors(1, seed=11))
    np.testing.assert_array_equal(index.ids(), [3])


# --------------------------------------------------------------------------
# Filters inside the search
# --------------------------------------------------------------------------


@pytest.fixture
def big_index(milvus_index):
    """BIG rows, sealed into segments (which a Milvus server indexes at once, Milvus Lite in the
    background: searches meet graphs, unindexed segments and the write buffer)."""
    ids, vectors = sparse_ids(BIG), unit_vectors(BIG, seed=11)
    index = milvus_index()
    index.add(ids, vectors)
    index.flush()
    return index, ids, vectors


def _check(index, ids, vectors, queries, subset_ids, exact: bool):
    got_ids, got_scores = index.search(queries, K, Subset(subset_ids))
    inside = np.isin(ids, subset_ids)
    want_ids, want_scores = brute_force(ids[inside], vectors[inside], queries, K)
    assert np.isin(got_ids, subset_ids).all(), "only rows of the subset come back"
    assert (got_ids >= 0).all(), "k hits"
    if exact:
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    else:
        assert recall(got_ids, want_ids) >= 0.95


def test_a_filter_keeping_one_row_in_a_thousand_returns_k_hits(big_index):
    index, ids, vectors = big_index
    subset_ids = np.random.default_rng(0).choice(ids, size=BIG // 1000, replace=False)
    for query in unit_vectors(5, seed=3):
        _check(index, ids, vectors, query[None, :], subset_ids, exact=True)


def _walks_stopping_short(monkeypatch, index, keep: int = 3) -> list:
    """Make the engine's first filtered search return only ``keep`` rows per query, as a
    graph walk that gave up would; returns the ``ef`` of each search call."""
    efs = []
    search = index._search

    def short_first(key, client, queries, k, ef, restrict):
        efs.append(ef)
        found = search(key, client, queries, k, ef, restrict)
        return [(ids[:keep], scores[:keep]) for ids, scores in found] if len(efs) == 1 else found

    monkeypatch.setattr(index, "_search", short_first)
    return efs


def test_a_walk_short_of_k_over_a_small_subset_is_answered_exactly(big_index, monkeypatch):
    index, ids, vectors = big_index
    efs = _walks_stopping_short(monkeypatch, index)
    subset_ids = np.random.default_rng(1).choice(ids, size=BIG // 100, replace=False)
    _check(index, ids, vectors, unit_vectors(10, seed=4), subset_ids, exact=True)
    assert efs == [index.params["ef"]], "no second walk: the subset's rows were scored here"


def test_a_walk_short_of_k_over_a_large_subset_is_retried_with_a_wider_list(big_index, monkeypatch):
    index, ids, vectors = big_index
    index.set_search_params(exact_subset_max=100, ef=K)
    efs = _walks_stopping_short(monkeypatch, index)
    subset_ids = np.random.default_rng(2).choice(ids, size=BIG // 10, replace=False)
    _check(index, ids, vectors, unit_vectors(10, seed=5), subset_ids, exact=False)
    assert efs == [K, 4 * K]


def test_a_subset_given_only_as_sql_is_refused(milvus_index):
    index = milvus_index()
    index.add([1], unit_vectors(1))
    with pytest.raises(VectorIndexError, match="filters by ids"):
        index.search(unit_vectors(1), K, Subset(sql="id > %s", sql_params=[0]))
