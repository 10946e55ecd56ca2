"""Segmented index versions: the files round-trip, base + deltas + tombstones answer as one
index with the same rows would, and merges fold segments without changing any answer."""

from __future__ import annotations

import numpy as np
import pytest

from search.core.vector_index import ChecksumMismatch, VectorIndexError, create_index
from search.core.vector_index.base import Subset, sha256_file
from search.core.vector_index.segment_files import (
    Manifest,
    SegmentRef,
    open_base,
    read_delta,
    read_keys,
    read_manifest,
    write_delta,
    write_keys,
    write_manifest,
)
from search.core.vector_index.segments import (
    MergeConflict,
    MergePolicy,
    SegmentedIndex,
    SegmentKeys,
    append_delta,
    fold_deltas,
    fold_into,
    index_delta,
    load_segment,
    plan_merge,
    replace_runs,
)
from tests.search.core.vectors import DIM, brute_force, recall, unit_vectors


@pytest.fixture(autouse=True)
def exact_float32_scan(monkeypatch):
    """faiss-flat's single-query fp16 pre-scan could reorder near ties; these tests compare
    exact answers."""
    monkeypatch.setenv("VECTOR_INDEX_FLAT_SCAN", "float32")


def write_base(directory, index, name="base.vidx", built_rows=None) -> SegmentRef:
    sha = index.save(directory / name)
    keys = index.ids()
    keys_sha = write_keys(directory / f"{name}.keys", keys)
    return SegmentRef("base", name, sha, (directory / name).stat().st_size, rows=len(keys), live=len(keys),
                      keys_file=f"{name}.keys", keys_sha256=keys_sha, built_rows=built_rows or len(keys))


def delta_writer(directory, dim=DIM):
    made = []

    def write(keys, vectors, tombstones):
        name = f"delta-{len(made)}.vdelta"
        sha = write_delta(directory / name, dim, keys, vectors, tombstones)
        made.append(name)
        return name, sha, (directory / name).stat().st_size

    return write


def open_version(directory, manifest, mapped=False) -> SegmentedIndex:
    return SegmentedIndex(manifest, [load_segment(directory, ref, mapped=mapped) for ref in manifest.segments])


class World:
    """A version built step by step, and the rows one index would hold after the same steps."""

    def __init__(self, directory, backend="faiss-flat", n=300, **params):
        self.directory = directory
        self.rows: dict[int, np.ndarray] = {}
        vectors = unit_vectors(n, seed=11)
        keys = np.arange(1000, 1000 + n, dtype=np.int64) * 3
        base = create_index(backend, DIM, **params)
        base.add(keys, vectors)
        self.rows.update(zip(keys.tolist(), vectors))
        ref = write_base(directory, base)
        self.manifest = Manifest(backend, DIM, base.params, ref.live, (ref,), {"step": 0})
        self.write = delta_writer(directory)
        self.steps = 0

    def step(self, keys=(), vectors=None, removed=()):
        keys = np.asarray(keys, dtype=np.int64)
        vectors = np.empty((0, DIM), np.float32) if vectors is None else vectors
        now = SegmentKeys.read(self.manifest, self.directory)
        self.steps += 1
        new = append_delta(self.manifest, now, keys, vectors, removed, self.write, {"step": self.steps})
        for key in removed:
            self.rows.pop(int(key), None)
        self.rows.update(zip(keys.tolist(), vectors))
        if new is not None:
            self.manifest = new
        return new

    def one_index(self):
        index = create_index("faiss-flat", DIM)
        keys = np.asarray(sorted(self.rows), dtype=np.int64)
        index.add(keys, np.stack([self.rows[k] for k in keys.tolist()]))
        return index

    def busy(self, rng):
        """Additions, replacements of base rows and of delta rows, removals of both."""
        live = lambda: np.asarray(sorted(self.rows), dtype=np.int64)  # noqa: E731
        fresh = 10 ** 6 + np.arange(40, dtype=np.int64)
        self.step(fresh[:20], unit_vectors(20, seed=21))
        self.step(rng.choice(live(), 15, replace=False), unit_vectors(15, seed=22))  # captions edited
        self.step(removed=rng.choice(live(), 25, replace=False))
        self.step(np.concatenate([fresh[20:], fresh[:5]]), unit_vectors(25, seed=23),
                  removed=rng.choice(live(), 10, replace=False))
        self.step(removed=np.concatenate([fresh[5:8], [424242]]))  # one key never stored


# --- files -----------------------------------------------------------------------------------


def test_a_delta_segment_round_trips_rows_and_tombstones(tmp_path):
    keys = np.array([9, 4, 77], dtype=np.int64)
    vectors = unit_vectors(3)
    sha = write_delta(tmp_path / "d.vdelta", DIM, keys, vectors, [30, 5, 30])
    delta = read_delta(tmp_path / "d.vdelta", sha)
    assert delta.keys.tolist() == [9, 4, 77] and delta.tombstones.tolist() == [5, 30]
    np.testing.assert_array_equal(delta.vectors, vectors)
    assert read_delta(tmp_path / "d.vdelta", vectors=False).vectors is None
    assert sha == sha256_file(tmp_path / "d.vdelta")


def test_a_segment_torn_after_it_was_checked_is_refused_again(tmp_path):
    sha = write_delta(tmp_path / "d.vdelta", DIM, [1, 2, 3], unit_vectors(3))
    read_delta(tmp_path / "d.vdelta", sha)  # checked once, then trusted while unchanged ...
    data = (tmp_path / "d.vdelta").read_bytes()
    (tmp_path / "d.vdelta").write_bytes(data[:-4])  # ... torn in place
    with pytest.raises(ChecksumMismatch):
        read_delta(tmp_path / "d.vdelta", sha)


def test_a_keys_file_and_a_manifest_round_trip(tmp_path):
    sha = write_keys(tmp_path / "k.keys", [30, 2, 11])
    assert read_keys(tmp_path / "k.keys", sha).tolist() == [2, 11, 30]
    ref = SegmentRef("base", "b.vidx", "ab" * 32, 123, rows=3, live=2, keys_file="k.keys", keys_sha256=sha)
    delta = SegmentRef("delta", "d.vdelta", "cd" * 32, 45, rows=1, live=1, tombstones=1)
    manifest = Manifest("faiss-hnsw", DIM, {"m": 8}, 3, (ref, delta), {"embedding": 17})
    checksum = write_manifest(tmp_path / "v1.manifest", manifest)
    assert read_manifest(tmp_path / "v1.manifest", checksum) == manifest
    assert manifest.files() == ["b.vidx", "k.keys", "d.vdelta"]


def test_torn_or_foreign_segment_files_are_refused(tmp_path):
    sha = write_delta(tmp_path / "d.vdelta", DIM, [1, 2], unit_vectors(2))
    data = (tmp_path / "d.vdelta").read_bytes()
    (tmp_path / "torn.vdelta").write_bytes(data[: len(data) - 7])
    with pytest.raises(VectorIndexError, match="length"):
        read_delta(tmp_path / "torn.vdelta")
    with pytest.raises(ChecksumMismatch):
        read_delta(tmp_path / "torn.vdelta", sha)
    write_keys(tmp_path / "k.keys", [1])
    with pytest.raises(VectorIndexError, match="not a delta"):
        read_delta(tmp_path / "k.keys")
    with pytest.raises(VectorIndexError, match="not a keys file"):
        read_keys(tmp_path / "d.vdelta")
    (tmp_path / "bad.manifest").write_text('{"format": "something else"}')
    with pytest.raises(VectorIndexError, match="not a segment manifest"):
        read_manifest(tmp_path / "bad.manifest")


def test_a_manifest_whose_counts_do_not_add_up_is_refused(tmp_path):
    ref = SegmentRef("base", "b.vidx", "ab" * 32, 1, rows=3, live=3)
    bad = Manifest("faiss-flat", DIM, {}, 4, (ref,), {})
    (tmp_path / "v.manifest").write_bytes(bad.to_bytes())
    with pytest.raises(VectorIndexError, match="count"):
        read_manifest(tmp_path / "v.manifest")


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-hnsw", "faiss-ivfpq"])
def test_a_mapped_base_answers_as_the_loaded_one(tmp_path, backend):
    params = {"train_size": 64, "nlist": 4, "pq_nbits": 4} if backend == "faiss-ivfpq" else {}
    index = create_index(backend, DIM, **params)
    index.add(np.arange(200, dtype=np.int64) * 7, unit_vectors(200, seed=3))
    if backend == "faiss-hnsw":
        index.remove([7, 14])  # tombstones travel with the file
    sha = index.save(tmp_path / "b.vidx")
    queries = unit_vectors(5, seed=4)
    loaded = open_base(tmp_path / "b.vidx", sha)
    mapped = open_base(tmp_path / "b.vidx", sha, mapped=True)
    assert mapped.count() == loaded.count() and mapped.ids().tolist() == loaded.ids().tolist()
    for got, want in zip(mapped.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-hnsw", "faiss-ivfpq"])
def test_a_mapped_base_keeps_its_vectors_in_the_file_mapping(tmp_path, backend):
    import faiss

    params = {"train_size": 64, "nlist": 4, "pq_nbits": 4} if backend == "faiss-ivfpq" else {}
    index = create_index(backend, DIM, **params)
    index.add(np.arange(100, dtype=np.int64), unit_vectors(100))
    sha = index.save(tmp_path / "b.vidx")
    mapped = open_base(tmp_path / "b.vidx", sha, mapped=True)
    start = np.frombuffer(mapped._mapped_payload, dtype=np.uint8).ctypes.data
    if backend == "faiss-ivfpq":  # its inverted lists (its id maps are copied if the file misaligns them)
        lists = faiss.extract_index_ivf(mapped._index).invlists
        pointers = [int(faiss.downcast_InvertedLists(lists).get_codes(0))]
    else:
        storage = mapped._index.index if backend == "faiss-flat" else mapped._index.storage
        pointers = [int(faiss.downcast_index(storage).codes.data())]
    assert all(start <= pointer < start + len(mapped._mapped_payload) for pointer in pointers)


def test_a_base_with_a_wrong_checksum_is_refused_mapped_or_not(tmp_path):
    index = create_index("faiss-flat", DIM)
    index.add([1, 2], unit_vectors(2))
    index.save(tmp_path / "b.vidx")
    for mapped in (False, True):
        with pytest.raises(ChecksumMismatch):
            open_base(tmp_path / "b.vidx", "0" * 64, mapped=mapped)


# --- searching base + deltas ------------------------------------------------------------------


def test_base_deltas_and_tombstones_answer_exactly_as_one_flat_index(tmp_path):
    world = World(tmp_path)
    world.busy(np.random.default_rng(0))
    version = open_version(tmp_path, world.manifest, mapped=True)
    one = world.one_index()
    queries = unit_vectors(30, seed=99)
    assert version.count() == one.count() == len(world.rows)
    assert version.ids().tolist() == one.ids().tolist()
    for k in (1, 10, 50):
        got, want = version.search(queries, k), one.search(queries, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_a_replaced_row_answers_with_its_new_vector_only(tmp_path):
    world = World(tmp_path, n=50)
    key = 1000 * 3
    old = world.rows[key].copy()
    new = unit_vectors(1, seed=5)
    world.step([key], new)
    version = open_version(tmp_path, world.manifest)
    ids, scores = version.search(new, 1)
    assert ids[0, 0] == key and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    ids, scores = version.search(old[None, :], 3)
    hits = dict(zip(ids[0].tolist(), scores[0].tolist()))
    assert hits.get(key, -1) < 0.999  # the old vector of the key is gone
    assert version.ids().tolist().count(key) == 1


def test_a_subset_is_passed_to_every_segment(tmp_path):
    world = World(tmp_path)
    world.busy(np.random.default_rng(1))
    version = open_version(tmp_path, world.manifest)
    one = world.one_index()
    rng = np.random.default_rng(2)
    allowed = np.concatenate([rng.choice(np.asarray(sorted(world.rows)), 40, replace=False), [10 ** 6 + 1, 7]])
    queries = unit_vectors(8, seed=98)
    got = version.search(queries, 10, Subset(allowed))
    want = one.search(queries, 10, Subset(allowed))
    np.testing.assert_array_equal(got[0], want[0])


def test_a_query_near_many_removed_rows_still_gets_k_live_ones(tmp_path):
    world = World(tmp_path, n=200)
    query = unit_vectors(1, seed=7)
    scores = np.stack([world.rows[k] for k in sorted(world.rows)]) @ query[0]
    nearest = np.asarray(sorted(world.rows))[np.argsort(-scores)[:60]]
    world.step(removed=nearest)  # the 60 best rows of the query are gone
    version = open_version(tmp_path, world.manifest)
    ids, _ = version.search(query, 10)
    np.testing.assert_array_equal(ids, world.one_index().search(query, 10)[0])


def test_an_approximate_base_with_deltas_keeps_its_recall(tmp_path):
    world = World(tmp_path, backend="faiss-hnsw", n=400, ef_search=64)
    world.busy(np.random.default_rng(3))
    version = open_version(tmp_path, world.manifest, mapped=True)
    assert not version.exact and version.backend == "faiss-hnsw"
    keys = np.asarray(sorted(world.rows))
    queries = unit_vectors(40, seed=97)
    truth, _ = brute_force(keys, np.stack([world.rows[k] for k in keys.tolist()]), queries, 10)
    assert recall(version.search(queries, 10)[0], truth) >= 0.95


def test_a_version_is_read_only(tmp_path):
    world = World(tmp_path, n=10)
    version = open_version(tmp_path, world.manifest)
    with pytest.raises(VectorIndexError, match="read-only"):
        version.add([1], unit_vectors(1))


# --- writing deltas -----------------------------------------------------------------------------


def test_only_removals_of_live_keys_become_tombstones_and_counts_follow(tmp_path):
    world = World(tmp_path, n=20)
    base_key = 1000 * 3
    assert world.step(removed=[5]) is None  # nothing held: nothing written
    world.step([77], unit_vectors(1), removed=[base_key, 5])
    assert world.manifest.count == 20 and [r.live for r in world.manifest.segments] == [19, 1]
    delta = read_delta(tmp_path / world.manifest.segments[1].file)
    assert delta.tombstones.tolist() == [base_key]
    world.step([77, base_key], unit_vectors(2, seed=8))  # 77 replaced, the removed key back
    assert [r.live for r in world.manifest.segments] == [19, 0, 2] and world.manifest.count == 21
    keys = SegmentKeys.read(world.manifest, tmp_path)
    assert keys.resolve([base_key, 77, 1001 * 3, 1003, 5]).tolist() == [2, 2, 0, -1, -1]
    assert keys.live_keys().tolist() == sorted(world.rows)


# --- merging -----------------------------------------------------------------------------------


def test_folding_deltas_equals_applying_them_in_order(tmp_path):
    world = World(tmp_path)
    world.busy(np.random.default_rng(4))
    snapshot = world.manifest
    runs = [(1, 3), (3, 6)]
    folded = {}
    for start, stop in runs:
        delta = fold_deltas([read_delta(tmp_path / r.file) for r in snapshot.segments[start:stop]])
        name = f"fold-{start}.vdelta"
        sha = write_delta(tmp_path / name, DIM, delta.keys, delta.vectors, delta.tombstones)
        folded[(start, stop)] = SegmentRef("delta", name, sha, 0, rows=delta.rows, live=0,
                                           tombstones=len(delta.tombstones))
    merged = replace_runs(snapshot, snapshot, folded)
    assert len(merged.segments) == 3 and merged.count == snapshot.count
    queries = unit_vectors(20, seed=96)
    got = open_version(tmp_path, merged).search(queries, 20)
    np.testing.assert_array_equal(got[0], world.one_index().search(queries, 20)[0])
    assert SegmentKeys.read(merged, tmp_path).live_keys().tolist() == sorted(world.rows)


def test_folding_into_the_base_equals_the_segments(tmp_path):
    world = World(tmp_path)
    world.busy(np.random.default_rng(5))
    snapshot = world.manifest
    base = open_base(tmp_path / snapshot.base.file)
    fold_into(base, [read_delta(tmp_path / r.file) for r in snapshot.deltas])
    # A sync writes another delta while the merge runs: it stays on top of the new base.
    world.step([2 * 10 ** 6], unit_vectors(1, seed=30), removed=[1000 * 3 + 3])
    ref = write_base(tmp_path, base, "merged.vidx")
    merged = replace_runs(snapshot, world.manifest, {(0, len(snapshot.segments)): ref})
    assert [r.kind for r in merged.segments] == ["base", "delta"] and merged.count == len(world.rows)
    queries = unit_vectors(20, seed=95)
    np.testing.assert_array_equal(open_version(tmp_path, merged).search(queries, 10)[0],
                                  world.one_index().search(queries, 10)[0])


def test_a_merge_whose_segments_were_replaced_meanwhile_is_refused(tmp_path):
    world = World(tmp_path, n=10)
    world.step([5], unit_vectors(1))
    snapshot = world.manifest
    other = snapshot.with_changes(segments=(snapshot.base,), count=snapshot.base.live)
    with pytest.raises(MergeConflict):
        replace_runs(snapshot, other, {(0, 2): snapshot.base})


def test_merges_are_planned_by_the_thresholds(tmp_path):
    world = World(tmp_path, n=100)
    policy = MergePolicy(delta_fraction=0.1, tombstone_fraction=0.2, min_rows=0, max_deltas=4)
    assert plan_merge(world.manifest, policy) is None
    world.step(10 ** 6 + np.arange(5), unit_vectors(5))
    for i in range(3):
        world.step([2 * 10 ** 6 + i], unit_vectors(1, seed=i))
    assert plan_merge(world.manifest, policy) is None  # four deltas are allowed
    world.step([3 * 10 ** 6], unit_vectors(1))
    plan = plan_merge(world.manifest, policy)
    # The small deltas are folded together; the larger first one is left alone.
    assert plan.kind == "deltas" and plan.runs == ((2, 6),)
    world.step(4 * 10 ** 6 + np.arange(1), unit_vectors(1))
    assert plan_merge(world.manifest, policy).kind == "base"  # 10 delta rows: a tenth of the base


def test_a_base_merge_is_due_once_enough_of_the_base_is_removed(tmp_path):
    world = World(tmp_path, n=100)
    policy = MergePolicy(delta_fraction=1.0, tombstone_fraction=0.2, min_rows=0, max_deltas=50)
    world.step(removed=np.arange(1000, 1019) * 3)
    assert plan_merge(world.manifest, policy) is None
    world.step(removed=[1019 * 3])
    plan = plan_merge(world.manifest, policy)
    assert plan.kind == "base" and "removed" in plan.reason


def test_a_learning_backend_is_rebuilt_once_it_has_grown(tmp_path):
    world = World(tmp_path, backend="faiss-ivfpq", n=100, train_size=50, nlist=2, pq_nbits=4)
    policy = MergePolicy(delta_fraction=10.0, tombstone_fraction=1.0, min_rows=0, max_deltas=50,
                         rebuild_growth=1.5)
    world.step(10 ** 6 + np.arange(49), unit_vectors(49))
    assert plan_merge(world.manifest, policy) is None
    world.step([2 * 10 ** 6], unit_vectors(1))
    assert plan_merge(world.manifest, policy).kind == "rebuild"


def test_a_large_delta_of_an_approximate_index_is_planned_a_graph_and_answers_through_it(tmp_path):
    world = World(tmp_path, backend="faiss-hnsw", n=300, ef_search=64)
    policy = MergePolicy(delta_fraction=10.0, tombstone_fraction=1.0, min_rows=0, max_deltas=50, graph_rows=100)
    world.step(10 ** 6 + np.arange(99), unit_vectors(99, seed=40))
    assert plan_merge(world.manifest, policy) is None
    world.step(2 * 10 ** 6 + np.arange(150), unit_vectors(150, seed=41), removed=[1000 * 3])
    plan = plan_merge(world.manifest, policy)
    assert (plan.kind, plan.runs) == ("deltas", ((2, 3),))  # only the large one, alone
    delta = read_delta(tmp_path / world.manifest.segments[2].file)
    graph_sha = index_delta(delta).save(tmp_path / "graph.vidx")
    ref = SegmentRef("delta", world.manifest.segments[2].file, world.manifest.segments[2].sha256, 0, rows=150,
                     live=0, tombstones=1, index_file="graph.vidx", index_sha256=graph_sha)
    graphed = replace_runs(world.manifest, world.manifest, {(2, 3): ref})
    assert plan_merge(graphed, policy) is None and "graph.vidx" in graphed.files()
    version = open_version(tmp_path, graphed, mapped=True)
    assert type(version.segments[2].index).__name__ == "FaissHNSWIndex"
    keys = np.asarray(sorted(world.rows))
    queries = unit_vectors(40, seed=94)
    truth, _ = brute_force(keys, np.stack([world.rows[k] for k in keys.tolist()]), queries, 10)
    assert recall(version.search(queries, 10)[0], truth) >= 0.95
    assert version.ids().tolist() == keys.tolist()


def test_an_exact_index_keeps_its_large_deltas_exact(tmp_path):
    world = World(tmp_path, n=100)
    policy = MergePolicy(delta_fraction=10.0, tombstone_fraction=1.0, min_rows=0, max_deltas=50, graph_rows=10)
    world.step(10 ** 6 + np.arange(50), unit_vectors(50))
    assert plan_merge(world.manifest, policy) is None

