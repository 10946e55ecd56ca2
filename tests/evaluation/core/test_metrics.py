"""Tests for evaluation.core.metrics (plain numpy; no Django needed)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from evaluation.core import metrics
from evaluation.core.metrics import (
    captions_by_image,
    image_to_text,
    metrics_from_search,
    ranks_from_search,
    retrieval_metrics,
    text_to_image,
)

METRIC_KEYS = ("mAP", "median_rank", "mean_rank", "queries")


def assert_metrics_equal(got: dict, expected: dict, rel: float = 1e-12) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float) and math.isinf(value):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-12), key


# --------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------


def test_text_to_image_hand_computed_case():
    # 4 captions, 3 images; captions 0 and 1 describe image 0, caption 2
    # image 1, caption 3 image 2.
    scores = np.array(
        [
            [0.9, 0.1, 0.5],  # relevant image 0 scores highest -> rank 1
            [0.2, 0.8, 0.3],  # 0.2 is below 0.8 and 0.3       -> rank 3
            [0.4, 0.6, 0.7],  # relevant 0.6 is below 0.7      -> rank 2
            [0.1, 0.2, 0.3],  # relevant 0.3 is the highest    -> rank 1
        ]
    )
    result = text_to_image(scores, np.array([0, 0, 1, 2]), ks=(1, 2, 3))
    # ranks [1, 3, 2, 1]
    assert_metrics_equal(
        result,
        {
            "recall@1": 2 / 4,  # ranks 1 and 1
            "recall@2": 3 / 4,  # plus rank 2
            "recall@3": 4 / 4,
            "mAP": (1 + 1 / 3 + 1 / 2 + 1) / 4,  # AP = 1/rank -> 17/24
            "median_rank": 1.5,  # sorted ranks 1, 1, 2, 3
            "mean_rank": 7 / 4,
            "queries": 4,
        },
    )


def test_image_to_text_hand_computed_case():
    # 2 images, 5 captions: captions 0, 1, 2 describe image 0; 3, 4 image 1.
    scores = np.array(
        [
            # order c0 .9 (rel), c3 .7, c2 .5 (rel), c4 .3, c1 .1 (rel)
            # relevant ranks 1, 3, 5 -> AP = (1/1 + 2/3 + 3/5) / 3 = 34/45
            [0.9, 0.1, 0.5, 0.7, 0.3],
            # order c0 .8, c4 .7 (rel), c1 .6, c2 .4, c3 .2 (rel)
            # relevant ranks 2, 5 -> AP = (1/2 + 2/5) / 2 = 9/20
            [0.8, 0.6, 0.4, 0.2, 0.7],
        ]
    )
    result = image_to_text(scores, np.array([0, 0, 0, 1, 1]), ks=(1, 2, 5))
    # best relevant ranks: image 0 -> 1, image 1 -> 2
    assert_metrics_equal(
        result,
        {
            "recall@1": 1 / 2,
            "recall@2": 2 / 2,
            "recall@5": 2 / 2,
            "mAP": (34 / 45 + 9 / 20) / 2,  # 217/360
            "median_rank": 1.5,
            "mean_rank": 1.5,
            "queries": 2,
        },
    )


def test_default_ks_are_1_5_10_and_keys_are_stable():
    rng = np.random.default_rng(0)
    mapping = np.repeat(np.arange(12), 5)
    result = text_to_image(rng.standard_normal((60, 12)), mapping)
    assert list(result) == ["recall@1", "recall@5", "recall@10", *METRIC_KEYS]
    assert isinstance(result["queries"], int)
    assert all(isinstance(result[k], float) for k in result if k != "queries")


def test_duplicate_ks_are_reported_once():
    result = text_to_image(np.eye(3), np.arange(3), ks=(2, 1, 2))
    assert [k for k in result if k.startswith("recall@")] == ["recall@2", "recall@1"]


def test_k_larger_than_gallery_gives_full_recall():
    scores = np.array([[0.1, 0.9], [0.9, 0.1]])  # both captions rank their image 2nd
    result = text_to_image(scores, np.array([0, 1]), ks=(1, 2, 10))
    assert result["recall@1"] == 0.0
    assert result["recall@2"] == 1.0
    assert result["recall@10"] == 1.0


# --------------------------------------------------------------------------
# ties
# --------------------------------------------------------------------------


def test_text_to_image_tie_places_tied_candidate_before_relevant_image():
    scores = np.array(
        [
            [0.5, 0.5, 0.2],  # relevant image 0 tied with image 1 -> rank 2
            [0.3, 0.3, 0.3],  # all tied -> rank 3 (last)
            [0.1, 0.4, 0.4],  # relevant image 2 tied with image 1 -> rank 2
        ]
    )
    result = text_to_image(scores, np.array([0, 1, 2]), ks=(1, 2, 3))
    assert_metrics_equal(
        result,
        {
            "recall@1": 0.0,
            "recall@2": 2 / 3,
            "recall@3": 1.0,
            "mAP": (1 / 2 + 1 / 3 + 1 / 2) / 3,
            "median_rank": 2.0,
            "mean_rank": 7 / 3,
            "queries": 3,
        },
    )


def test_image_to_text_ties_put_non_relevant_captions_first_within_a_tied_block():
    # captions 0, 1, 3 describe image 0, caption 2 describes image 1
    scores = np.array(
        [
            # c0, c1 (relevant) and c2 (not) tie at 0.5: c2 first, then c0, c1
            # ranks: c2 1, c0 2, c1 3, c3 4 -> relevant ranks 2, 3, 4
            # AP = (1/2 + 2/3 + 3/4) / 3 = 23/36, best rank 2
            [0.5, 0.5, 0.5, 0.1],
            # c2 is the highest -> rank 1, AP 1
            [0.1, 0.2, 0.9, 0.3],
        ]
    )
    result = image_to_text(scores, np.array([0, 0, 1, 0]), ks=(1, 2))
    assert_metrics_equal(
        result,
        {
            "recall@1": 1 / 2,
            "recall@2": 2 / 2,
            "mAP": (23 / 36 + 1) / 2,
            "median_rank": 1.5,
            "mean_rank": 1.5,
            "queries": 2,
        },
    )


def test_constant_scores_give_the_worst_possible_ranks_in_both_directions():
    mapping = np.repeat(np.arange(3), 2)  # 3 images, 2 captions each
    t2i = text_to_image(np.zeros((6, 3)), mapping, ks=(1, 2, 3))
    # every caption's image is tied with the 2 others -> rank 3 = last
    assert_metrics_equal(
        t2i,
        {
            "recall@1": 0.0,
            "recall@2": 0.0,
            "recall@3": 1.0,
            "mAP": 1 / 3,
            "median_rank": 3.0,
            "mean_rank": 3.0,
            "queries": 6,
        },
    )
    i2t = image_to_text(np.full((3, 6), 7.0), mapping, ks=(1, 4, 5))
    # the 4 other captions come first: relevant ranks 5 and 6
    # AP = (1/5 + 2/6) / 2 = 4/15
    assert_metrics_equal(
        i2t,
        {
            "recall@1": 0.0,
            "recall@4": 0.0,
            "recall@5": 1.0,
            "mAP": 4 / 15,
            "median_rank": 5.0,
            "mean_rank": 5.0,
            "queries": 3,
        },
    )


def test_tie_rule_holds_for_integer_scores():
    # same as the float tie case above, with integer scores
    scores = np.array([[5, 5, 5, 1], [1, 2, 9, 3]], dtype=np.int64)
    result = image_to_text(scores, np.array([0, 0, 1, 0]), ks=(1, 2))
    assert result["mAP"] == pytest.approx((23 / 36 + 1) / 2)
    assert result["recall@1"] == 0.5


# --------------------------------------------------------------------------
# perfect and reversed score matrices
# --------------------------------------------------------------------------


def _binary_match(mapping: np.ndarray, n_images: int) -> np.ndarray:
    """(captions, images) matrix: 1 for the described image, 0 elsewhere."""
    return (mapping[:, None] == np.arange(n_images)[None, :]).astype(np.float64)


def test_perfect_scores_give_perfect_metrics_in_both_directions():
    rng = np.random.default_rng(1)
    n_images = 9
    mapping = np.concatenate([np.arange(n_images), rng.integers(0, n_images, 25)])
    match = _binary_match(mapping, n_images)
    # binary (captions of an image tie among themselves) and continuous
    for scores in (match, match + 0.01 * rng.random(match.shape)):
        for result in (
            text_to_image(scores, mapping),
            image_to_text(scores.T, mapping),
        ):
            assert result["recall@1"] == 1.0
            assert result["recall@5"] == 1.0
            assert result["mAP"] == 1.0
            assert result["median_rank"] == 1.0
            assert result["mean_rank"] == 1.0


def test_reversed_scores_give_the_worst_metrics_in_both_directions():
    mapping = np.array([0, 0, 0, 1, 1, 2, 3, 3])  # 4 images, 3 + 2 + 1 + 2 captions
    n_images, n_captions = 4, 8
    reversed_scores = 1.0 - _binary_match(mapping, n_images)

    t2i = text_to_image(reversed_scores, mapping, ks=(1, 3, 4))
    # the relevant image is always last: rank 4
    assert t2i["recall@1"] == 0.0
    assert t2i["recall@3"] == 0.0
    assert t2i["recall@4"] == 1.0
    assert t2i["mAP"] == pytest.approx(1 / 4)
    assert t2i["median_rank"] == 4.0
    assert t2i["mean_rank"] == 4.0

    i2t = image_to_text(reversed_scores.T, mapping, ks=(1, 5, 8))
    # an image with n captions has them at ranks 8-n+1 .. 8
    counts = np.bincount(mapping)
    best = n_captions - counts + 1  # [6, 7, 8, 7]
    ap = [np.mean([t / (n_captions - n + t) for t in range(1, n + 1)]) for n in counts]
    assert i2t["recall@1"] == 0.0
    assert i2t["recall@5"] == 0.0
    assert i2t["recall@8"] == 1.0
    assert i2t["mAP"] == pytest.approx(np.mean(ap))
    assert i2t["median_rank"] == np.median(best) == 7.0
    assert i2t["mean_rank"] == pytest.approx(np.mean(best))


# --------------------------------------------------------------------------
# agreement with a loop-based reference
# --------------------------------------------------------------------------


def loop_reference(scores: np.ndarray, relevant: list[set[int]], ks) -> dict:
    """Straightforward per-query implementation: sort the gallery with
    Python's sorted(), walk the ranking, accumulate hits and precisions.
    Only meant for tie-free scores."""
    best_ranks = []
    aps = []
    for query, rel in enumerate(relevant):
        row = [float(x) for x in scores[query]]
        ranking = sorted(range(len(row)), key=lambda item: row[item], reverse=True)
        hits = 0
        precision_sum = 0.0
        best = None
        for position, item in enumerate(ranking, start=1):
            if item in rel:
                hits += 1
                precision_sum += hits / position
                if best is None:
                    best = position
        best_ranks.append(best)
        aps.append(precision_sum / len(rel))
    out = {f"recall@{k}": sum(r <= k for r in best_ranks) / len(best_ranks) for k in ks}
    out["mAP"] = sum(aps) / len(aps)
    out["median_rank"] = float(statistics.median(best_ranks))
    out["mean_rank"] = sum(best_ranks) / len(best_ranks)
    out["queries"] = len(relevant)
    return out


def random_dataset(seed: int, n_images: int, max_captions: int, dim: int = 16):
    """Images with 1..max_captions captions each, in shuffled caption order,
    and float32 unit embeddings where captions lie near their image."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_captions + 1, n_images)
    mapping = rng.permutation(np.repeat(np.arange(n_images), counts))
    images = rng.standard_normal((n_images, dim))
    texts = images[mapping] + 1.5 * rng.standard_normal((mapping.shape[0], dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images.astype(np.float32), texts.astype(np.float32), mapping


def assert_tie_free(scores: np.ndarray) -> None:
    for row in scores:
        assert np.unique(row).shape[0] == row.shape[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_text_to_image_matches_loop_reference_on_random_scores(seed):
    rng = np.random.default_rng(100 + seed)
    n_images = int(rng.integers(5, 40))
    mapping = rng.integers(0, n_images, int(rng.integers(10, 120)))
    scores = rng.standard_normal((mapping.shape[0], n_images))
    ks = (1, 3, 5, 10)
    relevant = [{int(i)} for i in mapping]
    assert_metrics_equal(text_to_image(scores, mapping, ks), loop_reference(scores, relevant, ks))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_image_to_text_matches_loop_reference_with_varying_captions_per_image(seed):
    images, texts, mapping = random_dataset(seed, n_images=int(10 + 7 * seed), max_captions=7)
    scores = images @ texts.T
    assert_tie_free(scores)
    ks = (1, 5, 10)
    relevant = [set(np.flatnonzero(mapping == i).tolist()) for i in range(images.shape[0])]
    assert len({len(r) for r in relevant}) > 1  # really varying
    expected = loop_reference(scores, relevant, ks)
    assert_metrics_equal(image_to_text(scores, mapping, ks), expected, rel=1e-9)


@pytest.mark.parametrize("seed", [4, 5])
def test_retrieval_metrics_from_embeddings_matches_loop_reference(seed):
    images, texts, mapping = random_dataset(seed, n_images=30, max_captions=6)
    ks = (1, 5, 10)
    result = retrieval_metrics(images, texts, mapping, ks)
    assert set(result) == {"text_to_image", "image_to_text"}

    t2i_scores = texts @ images.T
    assert_tie_free(t2i_scores)
    assert_tie_free(t2i_scores.T)
    relevant_images = [{int(i)} for i in mapping]
    relevant_captions = [set(np.flatnonzero(mapping == i).tolist()) for i in range(30)]
    assert_metrics_equal(
        result["text_to_image"], loop_reference(t2i_scores, relevant_images, ks), rel=1e-9
    )
    assert_metrics_equal(
        result["image_to_text"], loop_reference(t2i_scores.T, relevant_captions, ks), rel=1e-9
    )


def test_small_chunks_give_the_same_results(monkeypatch):
    images, texts, mapping = random_dataset(7, n_images=50, max_captions=7)
    scores = texts @ images.T
    ks = (1, 5, 10)
    full = (text_to_image(scores, mapping, ks), image_to_text(scores.T, mapping, ks))
    from_embeddings = retrieval_metrics(images, texts, mapping, ks)
    # a budget smaller than a row forces one query per chunk, 300 several rows
    for budget in (1, 300):
        monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", budget)
        assert_metrics_equal(text_to_image(scores, mapping, ks), full[0])
        assert_metrics_equal(image_to_text(scores.T, mapping, ks), full[1])
        assert_metrics_equal(retrieval_metrics(images, texts, mapping, ks), from_embeddings)


def test_text_order_of_captions_does_not_matter():
    images, texts, mapping = random_dataset(8, n_images=20, max_captions=5)
    perm = np.random.default_rng(0).permutation(mapping.shape[0])
    assert_metrics_equal(
        retrieval_metrics(images, texts[perm], mapping[perm]),
        retrieval_metrics(images, texts, mapping),
    )


# --------------------------------------------------------------------------
# agreement with CLIP_benchmark's recall (LAION)
# --------------------------------------------------------------------------


def test_recall_matches_clip_benchmark_on_random_scores():
    torch = pytest.importorskip("torch")
    zeroshot_retrieval = pytest.importorskip(
        "clip_benchmark.metrics.zeroshot_retrieval",
        reason=(
            "clip-benchmark not installed; its retrieval module needs only torch and tqdm: "
            "pip install --no-deps clip-benchmark==1.6.2"
        ),
    )
    ks = (1, 5, 10)
    for seed in range(3):
        images, texts, mapping = random_dataset(20 + seed, n_images=40, max_captions=7)
        scores = texts @ images.T  # (captions, images), float32
        assert_tie_free(scores)
        assert_tie_free(scores.T)
        scores_t = torch.from_numpy(np.ascontiguousarray(scores))
        positive = torch.zeros(scores.shape, dtype=torch.bool)
        positive[torch.arange(scores.shape[0]), torch.from_numpy(mapping)] = True
        ours = retrieval_metrics(images, texts, mapping, ks)
        for k in ks:
            # as in CLIP_benchmark's evaluate(): a query counts when at
            # least one relevant item is in its top k
            image_retrieval = (
                (zeroshot_retrieval.recall_at_k(scores_t, positive, k) > 0).float().mean().item()
            )
            text_retrieval = (
                (zeroshot_retrieval.recall_at_k(scores_t.T, positive.T, k) > 0)
                .float()
                .mean()
                .item()
            )
            assert ours["text_to_image"][f"recall@{k}"] == pytest.approx(image_retrieval)
            assert ours["image_to_text"][f"recall@{k}"] == pytest.approx(text_retrieval)


# --------------------------------------------------------------------------
# search-index results
# --------------------------------------------------------------------------


def full_search(scores: np.ndarray, k: int | None = None):
    """Top-k ids and scores per row, best first, like a vector index."""
    order = np.argsort(-scores, axis=1, kind="stable")
    if k is not None:
        order = order[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_results_over_the_whole_gallery_equal_dense_metrics(seed):
    images, texts, mapping = random_dataset(30 + seed, n_images=25, max_captions=7)
    n_images = images.shape[0]
    dense = retrieval_metrics(images, texts, mapping, ks=(1, 5, 10))

    ids, sc = full_search(texts @ images.T)
    for scores_arg in (None, sc):
        got = metrics_from_search(ids, mapping, ks=(1, 5, 10), result_scores=scores_arg)
        assert_metrics_equal(got, dense["text_to_image"], rel=1e-9)

    ids, sc = full_search(images @ texts.T)
    relevant = captions_by_image(mapping, n_images)
    for scores_arg in (None, sc):
        got = metrics_from_search(ids, relevant, ks=(1, 5, 10), result_scores=scores_arg)
        assert_metrics_equal(got, dense["image_to_text"], rel=1e-9)
    # relevant given as Python sets works the same
    sets = [set(r.tolist()) for r in relevant]
    assert_metrics_equal(metrics_from_search(ids, sets), dense["image_to_text"], rel=1e-9)


def test_search_results_with_scores_apply_the_tie_rule_like_dense_scores():
    rng = np.random.default_rng(3)
    n_images = 12
    mapping = rng.permutation(np.repeat(np.arange(n_images), rng.integers(1, 6, n_images)))
    # heavily quantised scores: many ties, including among relevant items
    scores = rng.integers(0, 4, (n_images, mapping.shape[0])).astype(np.float32)
    ks = (1, 2, 5)
    dense = image_to_text(scores, mapping, ks)
    # an index may return tied items in any order: shuffle within ties
    ids, _ = full_search(scores + 0.1 * rng.random(scores.shape).astype(np.float32))
    got = metrics_from_search(
        ids, captions_by_image(mapping, n_images), ks, result_scores=np.take_along_axis(scores, ids, 1)
    )
    assert_metrics_equal(got, dense)

    t_scores = scores.T.copy()
    ids, _ = full_search(t_scores + 0.1 * rng.random(t_scores.shape).astype(np.float32))
    got = metrics_from_search(ids, mapping, ks, result_scores=np.take_along_axis(t_scores, ids, 1))
    assert_metrics_equal(got, text_to_image(t_scores, mapping, ks))


def test_search_results_from_a_faiss_index_equal_dense_metrics():
    faiss = pytest.importorskip("faiss")
    images, texts, mapping = random_dataset(40, n_images=40, max_captions=6, dim=32)
    dense = retrieval_metrics(images, texts, mapping, ks=(1, 5, 10))

    index = faiss.IndexFlatIP(images.shape[1])
    index.add(images)
    distances, ids = index.search(texts, images.shape[0])
    assert_metrics_equal(metrics_from_search(ids, mapping, result_scores=distances), dense["text_to_image"])

    index = faiss.IndexFlatIP(texts.shape[1])
    index.add(texts)
    distances, ids = index.search(images, texts.shape[0])
    relevant = captions_by_image(mapping, images.shape[0])
    assert_metrics_equal(
        metrics_from_search(ids, relevant, result_scores=distances), dense["image_to_text"]
    )


def test_truncated_search_results_count_missing_items_as_not_found():
    # 3 queries, top-3 results from a larger gallery
    ids = np.array(
        [
            [4, 7, 1],  # relevant {7, 9}: 7 at rank 2, 9 not returned
            [2, 3, 5],  # relevant {8}: not returned
            [6, 0, -1],  # relevant {6}: rank 1 (-1 = empty slot)
        ]
    )
    relevant = [{7, 9}, {8}, {6}]
    queries, items, ranks = ranks_from_search(ids, relevant)
    assert queries.tolist() == [0, 0, 1, 2]
    assert items.tolist() == [7, 9, 8, 6]
    assert ranks.tolist() == [2, math.inf, math.inf, 1]

    result = metrics_from_search(ids, relevant, ks=(1, 2, 3))
    # AP: query 0 -> (1/2 + 0) / 2 = 1/4 (missing item still counts in the
    # denominator), query 1 -> 0, query 2 -> 1
    # best ranks 2, inf, 1 -> median 2, mean inf
    assert_metrics_equal(
        result,
        {
            "recall@1": 1 / 3,
            "recall@2": 2 / 3,
            "recall@3": 2 / 3,
            "mAP": (1 / 4 + 0 + 1) / 3,
            "median_rank": 2.0,
            "mean_rank": math.inf,
            "queries": 3,
        },
    )


def test_search_metrics_refuse_k_beyond_the_result_lists():
    with pytest.raises(ValueError, match="recall@10 cannot be computed from 3 results"):
        metrics_from_search(np.zeros((2, 3), dtype=np.int64), [{0}, {1}], ks=(1, 10))


@pytest.mark.parametrize(
    "ids, relevant, scores, message",
    [
        (np.zeros(3, dtype=np.int64), [{0}], None, "result_ids must be a 2-D array"),
        (np.zeros((1, 3)), [{0}], None, "result_ids must hold integer ids"),
        (np.zeros((2, 3), dtype=np.int64), [{0}], None, "relevant has 1 entries but result_ids has 2 rows"),
        (np.zeros((2, 3), dtype=np.int64), [{0}, set()], None, "every query needs at least one relevant id"),
        (np.zeros((1, 3), dtype=np.int64), [{-2}], None, "relevant ids must be non-negative"),
        (np.zeros((1, 3), dtype=np.int64), [{0}], np.zeros((1, 2)), "result_scores has shape"),
        (np.zeros((1, 3), dtype=np.int64), [{0}], np.array([[0.0, np.nan, 1.0]]), "NaN"),
    ],
)
def test_search_input_validation(ids, relevant, scores, message):
    with pytest.raises(ValueError, match=message):
        ranks_from_search(ids, relevant, result_scores=scores)


# --------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("func", [text_to_image, image_to_text])
@pytest.mark.parametrize(
    "scores, mapping, message",
    [
        (np.zeros(4), [0, 1], "scores must be a 2-D array"),
        (np.zeros((2, 2), dtype=bool), [0, 1], "scores must hold real numbers"),
        (np.zeros((0, 2)), [], "scores must not be empty"),
        (np.zeros((2, 2)), [[0, 1]], "text_to_image must be a 1-D array"),
        (np.zeros((2, 2)), [0.0, 1.0], "text_to_image must hold integer image indices"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), [0, 1], "NaN or infinite"),
        (np.array([[0.0, np.inf], [1.0, 0.0]]), [0, 1], "NaN or infinite"),
    ],
)
def test_invalid_inputs_are_rejected_in_both_directions(func, scores, mapping, message):
    with pytest.raises(ValueError, match=message):
        func(scores, np.asarray(mapping), ks=(1,))


def test_text_to_image_rejects_a_mapping_of_the_wrong_length():
    with pytest.raises(ValueError, match="text_to_image has 2 entries but there are 3 captions"):
        text_to_image(np.zeros((3, 2)), np.array([0, 1]))


def test_text_to_image_rejects_out_of_range_image_indices():
    with pytest.raises(ValueError, match=r"in \[0, 2\); caption 1 maps to 2"):
        text_to_image(np.zeros((3, 2)), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="caption 0 maps to -1"):
        text_to_image(np.zeros((3, 2)), np.array([-1, 0, 1]))


def test_image_to_text_rejects_a_mapping_of_the_wrong_length():
    # scores are (images, captions): 4 captions expected
    with pytest.raises(ValueError, match="text_to_image has 3 entries but there are 4 captions"):
        image_to_text(np.zeros((2, 4)), np.array([0, 1, 1]))


def test_image_to_text_rejects_images_without_captions():
    with pytest.raises(ValueError, match="at least one caption per image; 2 image\\(s\\) have none: 1, 3"):
        image_to_text(np.zeros((4, 3)), np.array([0, 2, 0]))


def test_text_to_image_accepts_images_without_captions():
    # an image nobody describes is still a valid distractor for text -> image
    result = text_to_image(np.array([[1.0, 0.0, 0.5]]), np.array([0]), ks=(1,))
    assert result["recall@1"] == 1.0


@pytest.mark.parametrize("ks", [(), (0,), (1, -5), (1.5,), (True,), 5, ("1",)])
def test_invalid_ks_are_rejected(ks):
    with pytest.raises(ValueError, match="ks must"):
        text_to_image(np.eye(3), np.arange(3), ks=ks)


@pytest.mark.parametrize(
    "images, texts, mapping, message",
    [
        (np.zeros(4), np.zeros((2, 4)), [0, 0], "image_embeddings must be a 2-D array"),
        (np.zeros((1, 4)), np.zeros((2, 3)), [0, 0], "differ in dimension: 4 vs 3"),
        (np.zeros((2, 4)), np.zeros((3, 4)), [0, 1], "text_to_image has 2 entries but there are 3 captions"),
        (np.zeros((2, 4)), np.zeros((2, 4)), [0, 0], "at least one caption per image"),
        (np.zeros((0, 4)), np.zeros((2, 4)), [0, 0], "image_embeddings must not be empty"),
        (np.ones((1, 4)), np.full((1, 4), np.nan), [0], "NaN or infinite"),
    ],
)
def test_retrieval_metrics_input_validation(images, texts, mapping, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts, np.asarray(mapping))


def test_captions_by_image_lists_caption_indices_per_image():
    groups = captions_by_image(np.array([2, 0, 2, 1, 0]), 4)
    assert [g.tolist() for g in groups] == [[1, 4], [3], [0, 2], []]
    with pytest.raises(ValueError, match="image indices"):
        captions_by_image(np.array([0, 5]), 3)
