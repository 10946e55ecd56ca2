"""Image-text retrieval metrics (recall@K, mAP, median and mean rank).

Plain numpy, no framework dependencies.  All metrics are fractions in
``[0, 1]`` except the ranks, which are 1-based positions.

Setting
-------
``N`` images, ``M`` captions.  ``text_to_image[j]`` is the index of the image
that caption ``j`` describes: every caption has exactly one relevant image,
and every image has one or more captions (usually 5, the number may vary).
Scores are "larger is better" similarities, e.g. dot products of
L2-normalised embeddings.

text -> image (each caption queries all ``N`` images)
    ``rank``      position (1-based) of the caption's single relevant image.
    ``recall@K``  mean over captions of ``[rank <= K]``.
    ``AP``        ``1 / rank``; ``mAP`` is the mean over captions.
    ``median_rank`` / ``mean_rank`` over captions.

image -> text (each image queries all ``M`` captions)
    ``recall@K``  fraction of images with at least one of their captions in
                  the top K (the usual CLIP-style definition, as in LAION's
                  CLIP_benchmark ``zeroshot_retrieval``).  Equivalently
                  ``[best rank <= K]`` averaged over images.
    ``rank``      rank of the best-ranked relevant caption (used for
                  ``median_rank`` and ``mean_rank``).
    ``AP``        average precision over all relevant captions of the image:
                  the mean, over its relevant captions, of the precision at
                  each relevant caption's rank.  ``mAP`` is the mean over
                  images.

Ties (deterministic, pessimistic)
---------------------------------
Ties are broken against the relevant items: within a block of equal scores
every non-relevant candidate is placed before every relevant one, so the
rank of a relevant item is ``1 +`` the number of non-relevant candidates
scoring ``>=`` its score ``+`` the number of relevant items ranked before it.
Relevant items tied with each other are ordered by index (which of them
comes first changes no metric).  For text -> image, where a query has a
single relevant item, the rank is simply ``1 +`` the number of other
candidates whose score is ``>=`` its own.

This is the worst case over all tie orders for every metric at the same
time, so a constant score matrix gives every query the worst possible rank
and can never look good, while a perfect (e.g. binary 0/1) score matrix,
where an image's captions tie among themselves, still scores 1.0.

CLIP_benchmark ranks with ``torch.topk``, whose order among equal scores is
unspecified, so its results on tied scores depend on the implementation.
With continuous float scores from real embeddings exact ties practically
never occur and both agree; the rule here only makes degenerate inputs
(constant or heavily quantised scores) deterministic and not flattering.

Search-index results
--------------------
:func:`metrics_from_search` computes the same metrics from the top-k id
lists returned by a vector index (e.g. FAISS).  A relevant item that is not
among the ``k`` returned ids counts as "not found" (rank ``+inf``):

* it adds a precision of 0 to its query's AP, while still counting in the
  number of relevant items, so mAP is a lower bound of the full-ranking mAP
  (AP truncated at ``k``);
* a query with no relevant item found has best rank ``+inf``: ``mean_rank``
  becomes ``inf`` as soon as one query misses, and ``median_rank`` becomes
  ``inf`` when at least half of the queries miss;
* recall@K is exact for every ``K <= k``; larger K are refused.

With ``k`` equal to the gallery size every item is found and all metrics
equal the dense score-matrix computation on the same scores (passing the
returned scores makes this hold even with ties).

Memory
------
Score matrices are processed in chunks of query rows, so memory stays
bounded (a few tens of MB) whatever the number of queries, and
:func:`retrieval_metrics` never materialises the full score matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "text_to_image",
    "image_to_text",
    "retrieval_metrics",
    "captions_by_image",
    "ranks_from_search",
    "metrics_from_search",
]

DEFAULT_KS = (1, 5, 10)

# Upper bound on the number of score elements handled at once.
_CHUNK_ELEMENTS = 1 << 22

RowFn = Callable[[int, int], np.ndarray]


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    try:
        values = tuple(ks)
    except TypeError:
        raise ValueError(f"ks must be a sequence of positive integers, got {ks!r}") from None
    if not values:
        raise ValueError("ks must contain at least one value")
    out: list[int] = []
    for k in values:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must contain positive integers, got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    return tuple(out)


def _real_matrix(values, name: str) -> np.ndarray:
    """``values`` as a 2-D array of real numbers (not booleans), or a ValueError naming it."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {values.shape}")
    if values.dtype == np.bool_ or not (
        np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {values.dtype}")
    return values


def _check_scores(scores, name: str = "scores") -> np.ndarray:
    scores = _real_matrix(scores, name)
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {scores.shape}")
    return scores


def _check_mapping(text_to_image, n_captions: int, n_images: int) -> np.ndarray:
    mapping = np.asarray(text_to_image)
    if mapping.ndim != 1:
        raise ValueError(f"text_to_image must be a 1-D array, got shape {mapping.shape}")
    if mapping.size and (mapping.dtype == np.bool_ or not np.issubdtype(mapping.dtype, np.integer)):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {mapping.dtype}")
    if mapping.shape[0] != n_captions:
        raise ValueError(
            f"text_to_image has {mapping.shape[0]} entries but there are {n_captions} captions"
        )
    if n_captions == 0:
        raise ValueError("there must be at least one caption")
    lo, hi = int(mapping.min()), int(mapping.max())
    if lo < 0 or hi >= n_images:
        bad = np.flatnonzero((mapping < 0) | (mapping >= n_images))
        raise ValueError(
            f"text_to_image values must be image indices in [0, {n_images}); "
            f"caption {int(bad[0])} maps to {int(mapping[bad[0]])}"
        )
    return mapping.astype(np.int64, copy=False)


def _check_every_image_has_caption(mapping: np.ndarray, n_images: int) -> np.ndarray:
    counts = np.bincount(mapping, minlength=n_images)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        shown = ", ".join(str(int(i)) for i in missing[:10])
        more = f" (and {missing.size - 10} more)" if missing.size > 10 else ""
        raise ValueError(
            f"image->text retrieval needs at least one caption per image; "
            f"{missing.size} image(s) have none: {shown}{more}"
        )
    return counts


def _check_finite(block: np.ndarray, what: str) -> None:
    if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
        raise ValueError(f"{what} contain NaN or infinite values")


# --------------------------------------------------------------------------
# core
# --------------------------------------------------------------------------


def _dense_counts(
    row_fn: RowFn,
    n_queries: int,
    n_gallery: int,
    pair_query: np.ndarray,
    pair_item: np.ndarray,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Score and ``>=`` count of every (query, relevant item) pair.

    ``pair_query`` must be sorted in non-decreasing order.  ``row_fn(a, b)``
    returns the score rows of queries ``a..b-1`` (shape ``(b - a, n_gallery)``).
    Returns, per pair, the number of gallery items whose score is ``>=`` the
    pair's own score (the item itself included), and that score.  Both come
    from the same computed row, so they are consistent even when the rows
    are recomputed (e.g. from embeddings) rather than read from a matrix.
    """
    n_pairs = pair_query.shape[0]
    count_ge = np.empty(n_pairs, dtype=np.int64)
    own_all: np.ndarray | None = None
    # first pair index of every query (pairs are sorted by query)
    pair_start = np.searchsorted(pair_query, np.arange(n_queries + 1), side="left")
    chunk_rows = max(1, _CHUNK_ELEMENTS // max(1, n_gallery))

    for q0 in range(0, n_queries, chunk_rows):
        q1 = min(q0 + chunk_rows, n_queries)
        block = np.asarray(row_fn(q0, q1))
        if block.shape != (q1 - q0, n_gallery):
            raise ValueError(
                f"score rows have shape {block.shape}, expected {(q1 - q0, n_gallery)}"
            )
        _check_finite(block, what)

        p0, p1 = int(pair_start[q0]), int(pair_start[q1])
        local = pair_query[p0:p1] - q0
        own = block[local, pair_item[p0:p1]]
        if own_all is None:
            own_all = np.empty(n_pairs, dtype=own.dtype)
        own_all[p0:p1] = own
        # handle the j-th relevant item of every query at once; rows are only
        # gathered (copied) for queries that do not all have a j-th item
        slot = np.arange(p0, p1) - pair_start[pair_query[p0:p1]]
        for j in range(int(slot.max()) + 1 if slot.size else 0):
            sel = np.flatnonzero(slot == j)
            rows = block if sel.shape[0] == q1 - q0 else block[local[sel]]
            count_ge[p0 + sel] = np.count_nonzero(rows >= own[sel, None], axis=1)
    assert own_all is not None
    return count_ge, own_all


def _break_ties(
    pair_query: np.ndarray,
    pair_item: np.ndarray,
    pair_score: np.ndarray,
    count_ge: np.ndarray,
) -> np.ndarray:
    """Ranks with ties broken against the relevant items.

    Within a block of equal scores the non-relevant items come first and the
    relevant ones follow, ordered by item id.  With the relevant items of a
    query sorted by (score descending, id ascending), the t-th one has rank
    ``t + (number of non-relevant items scoring >= it)``, and the number of
    non-relevant items scoring ``>=`` is ``count_ge`` minus the number of
    relevant items scoring ``>=``.
    """
    n = pair_query.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # dense integer codes of the scores: exact ordering whatever the dtype
    _, code = np.unique(pair_score, return_inverse=True)
    code = code.reshape(-1).astype(np.int64)
    order = np.lexsort((pair_item, -code, pair_query))
    q = pair_query[order]
    c = code[order]
    idx = np.arange(n)
    group_start = np.searchsorted(q, q, side="left")
    t = idx - group_start + 1
    # end of each run of equal (query, score)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (q[1:] != q[:-1]) | (c[1:] != c[:-1])
    run_id = np.cumsum(new_run) - 1
    run_end = np.append(np.flatnonzero(new_run)[1:] - 1, n - 1)[run_id]
    relevant_ge = run_end - group_start + 1
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = t + count_ge[order] - relevant_ge
    return ranks


def _summarise(
    n_queries: int,
    pair_query: np.ndarray,
    pair_rank: np.ndarray,
    n_relevant: np.ndarray,
    ks: tuple[int, ...],
) -> dict:
    """Turn the ranks of the found relevant pairs into the metric dict.

    ``pair_rank`` holds finite 1-based ranks of relevant items that were
    found; ``n_relevant`` the total number of relevant items per query
    (found or not).  Queries without a found pair get best rank ``inf``.
    """
    pair_query = np.asarray(pair_query, dtype=np.int64)
    pair_rank = np.asarray(pair_rank, dtype=np.int64)

    order = np.lexsort((pair_rank, pair_query))
    q_sorted = pair_query[order]
    r_sorted = pair_rank[order]

    # number of relevant items of the same query ranked at or before each
    # pair, via a combined (query, rank) key that is sorted like the pairs
    max_rank = int(r_sorted.max()) if r_sorted.size else 0
    key = q_sorted * (max_rank + 1) + r_sorted
    group_start = np.searchsorted(q_sorted, q_sorted, side="left")
    n_at_or_before = np.searchsorted(key, key, side="right") - group_start
    precision = n_at_or_before / r_sorted if r_sorted.size else np.zeros(0)

    ap = np.bincount(q_sorted, weights=precision, minlength=n_queries) / n_relevant

    best = np.full(n_queries, np.inf)
    first = np.ones(q_sorted.shape[0], dtype=bool)
    first[1:] = q_sorted[1:] != q_sorted[:-1]
    best[q_sorted[first]] = r_sorted[first]

    out: dict = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(best <= k))
    out["mAP"] = float(np.mean(ap))
    out["median_rank"] = float(np.median(best))
    out["mean_rank"] = float(np.mean(best))
    out["queries"] = int(n_queries)
    return out


def _text_to_image_from_rows(row_fn: RowFn, mapping: np.ndarray, n_images: int, ks, what) -> dict:
    n_captions = mapping.shape[0]
    queries = np.arange(n_captions, dtype=np.int64)
    # a single relevant item per query: the rank is simply the >= count
    ranks, _ = _dense_counts(row_fn, n_captions, n_images, queries, mapping, what)
    return _summarise(n_captions, queries, ranks, np.ones(n_captions), ks)


def _image_to_text_from_rows(row_fn: RowFn, mapping: np.ndarray, n_images: int, ks, what) -> dict:
    counts = _check_every_image_has_caption(mapping, n_images)
    captions = np.argsort(mapping, kind="stable")
    images = mapping[captions]
    count_ge, own = _dense_counts(row_fn, n_images, mapping.shape[0], images, captions, what)
    ranks = _break_ties(images, captions, own, count_ge)
    return _summarise(n_images, images, ranks, counts, ks)


# --------------------------------------------------------------------------
# public API: dense scores
# --------------------------------------------------------------------------


def text_to_image(scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Text -> image retrieval metrics.

    ``scores`` has shape ``(M captions, N images)``; ``text_to_image[j]`` is
    the image described by caption ``j``.  Returns ``recall@K`` for each K,
    ``mAP``, ``median_rank``, ``mean_rank`` and ``queries`` (= M).
    """
    ks = _check_ks(ks)
    scores = _check_scores(scores)
    n_captions, n_images = scores.shape
    mapping = _check_mapping(text_to_image, n_captions, n_images)
    return _text_to_image_from_rows(lambda a, b: scores[a:b], mapping, n_images, ks, "scores")


def image_to_text(scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Image -> text retrieval metrics.

    ``scores`` has shape ``(N images, M captions)``; ``text_to_image[j]`` is
    the image described by caption ``j``.  Every image needs at least one
    caption.  Returns ``recall@K`` for each K, ``mAP``, ``median_rank``,
    ``mean_rank`` and ``queries`` (= N).
    """
    ks = _check_ks(ks)
    scores = _check_scores(scores)
    n_images, n_captions = scores.shape
    mapping = _check_mapping(text_to_image, n_captions, n_images)
    return _image_to_text_from_rows(lambda a, b: scores[a:b], mapping, n_images, ks, "scores")


def _check_embeddings(emb, name: str) -> np.ndarray:
    emb = _real_matrix(emb, name)
    if emb.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.issubdtype(emb.dtype, np.floating):
        emb = emb.astype(np.float32)
    return emb


def retrieval_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict:
    """Both directions from embeddings; scores are dot products.

    ``image_embeddings`` ``(N, d)`` and ``text_embeddings`` ``(M, d)`` are
    expected to be L2-normalised (then scores are cosine similarities).
    The score matrix is computed chunk by chunk, never in full.

    Returns ``{"text_to_image": {...}, "image_to_text": {...}}``.
    """
    ks = _check_ks(ks)
    images = _check_embeddings(image_embeddings, "image_embeddings")
    texts = _check_embeddings(text_embeddings, "text_embeddings")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image and text embeddings differ in dimension: {images.shape[1]} vs {texts.shape[1]}"
        )
    n_images, n_captions = images.shape[0], texts.shape[0]
    mapping = _check_mapping(text_to_image, n_captions, n_images)
    _check_every_image_has_caption(mapping, n_images)
    what = "embedding dot products"
    return {
        "text_to_image": _text_to_image_from_rows(
            lambda a, b: texts[a:b] @ images.T, mapping, n_images, ks, what
        ),
        "image_to_text": _image_to_text_from_rows(
            lambda a, b: images[a:b] @ texts.T, mapping, n_images, ks, what
        ),
    }


def captions_by_image(text_to_image: np.ndarray, n_images: int) -> list[np.ndarray]:
    """Caption indices of every image, for use as ``relevant`` in image -> text
    :func:`metrics_from_search`."""
    mapping = np.asarray(text_to_image)
    if mapping.ndim != 1 or mapping.dtype == np.bool_ or not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError("text_to_image must be a 1-D array of integer image indices")
    if mapping.size and (mapping.min() < 0 or mapping.max() >= n_images):
        raise ValueError(f"text_to_image values must be image indices in [0, {n_images})")
    order = np.argsort(mapping, kind="stable")
    bounds = np.searchsorted(mapping[order], np.arange(n_images + 1), side="left")
    return [order[bounds[i] : bounds[i + 1]] for i in range(n_images)]


# --------------------------------------------------------------------------
# public API: top-k search results
# --------------------------------------------------------------------------


def _relevant_pairs(relevant, n_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten ``relevant`` into sorted, de-duplicated (query, item) pairs."""
    try:
        n_given = len(relevant)
    except TypeError:
        raise ValueError("relevant must be a sequence with one entry per query") from None
    if n_given != n_queries:
        raise ValueError(f"relevant has {n_given} entries but result_ids has {n_queries} rows")
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and relevant.dtype != object:
        if relevant.dtype == np.bool_ or not np.issubdtype(relevant.dtype, np.integer):
            raise ValueError("relevant given as an array must hold integer ids")
        items = relevant.astype(np.int64)
        queries = np.arange(items.shape[0], dtype=np.int64)
    else:
        try:
            groups = [np.fromiter((int(x) for x in g), dtype=np.int64) for g in relevant]
        except TypeError:
            raise ValueError(
                "relevant must be a sequence of collections of integer ids, one per query"
            ) from None
        lengths = np.array([g.shape[0] for g in groups], dtype=np.int64)
        queries = np.repeat(np.arange(len(groups), dtype=np.int64), lengths)
        items = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    if items.size and items.min() < 0:
        raise ValueError("relevant ids must be non-negative")
    if items.size:
        width = int(items.max()) + 1
        keys = np.unique(queries * width + items)
        queries, items = keys // width, keys % width
    counts = np.bincount(queries, minlength=n_queries)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"every query needs at least one relevant id; {empty.size} have none "
            f"(first: query {int(empty[0])})"
        )
    return queries, items, counts


def ranks_from_search(
    result_ids: np.ndarray,
    relevant,
    result_scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of the relevant items in top-k search results.

    ``result_ids`` ``(Q, k)``: ids returned per query, best first (negative
    ids, as FAISS uses for missing results, are ignored).  ``relevant``: one
    collection of relevant ids per query, or a 1-D integer array with a
    single relevant id per query.  ``result_scores`` (optional, ``(Q, k)``,
    larger is better; pass negated distances for L2 indices) applies the
    module's tie rule within the returned list; without it the rank is
    the position in the list (ties broken by the index's order).  Ties that
    straddle the k-th result cannot be seen.

    Returns ``(query, item, rank)`` arrays, one entry per relevant pair,
    sorted by query then item; ``rank`` is ``inf`` for items not returned.
    """
    ids = np.asarray(result_ids)
    if ids.ndim != 2:
        raise ValueError(f"result_ids must be a 2-D array (queries, k), got shape {ids.shape}")
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"result_ids must hold integer ids, got dtype {ids.dtype}")
    n_queries, k = ids.shape
    if n_queries == 0 or k == 0:
        raise ValueError(f"result_ids must not be empty, got shape {ids.shape}")
    scores = None
    if result_scores is not None:
        scores = np.asarray(result_scores)
        if scores.shape != ids.shape:
            raise ValueError(
                f"result_scores has shape {scores.shape}, result_ids has shape {ids.shape}"
            )
        if scores.dtype == np.bool_ or not (
            np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
        ):
            raise ValueError(f"result_scores must hold real numbers, got dtype {scores.dtype}")

    queries, items, _ = _relevant_pairs(relevant, n_queries)
    ranks = np.full(queries.shape[0], np.inf)
    own_scores = np.zeros(queries.shape[0], dtype=np.float64 if scores is None else scores.dtype)
    pair_start = np.searchsorted(queries, np.arange(n_queries + 1), side="left")
    chunk_rows = max(1, _CHUNK_ELEMENTS // k)
    for q0 in range(0, n_queries, chunk_rows):
        q1 = min(q0 + chunk_rows, n_queries)
        p0, p1 = int(pair_start[q0]), int(pair_start[q1])
        local = queries[p0:p1] - q0
        wanted = items[p0:p1]
        id_block = ids[q0:q1]
        if scores is not None:
            score_block = scores[q0:q1]
            valid = id_block >= 0
            all_valid = bool(valid.all())
            _check_finite(score_block if all_valid else score_block[valid], "result_scores of returned ids")
        # the j-th relevant item of every query at once (see _dense_counts)
        slot = np.arange(p0, p1) - pair_start[queries[p0:p1]]
        for j in range(int(slot.max()) + 1 if slot.size else 0):
            sel = np.flatnonzero(slot == j)
            whole = sel.shape[0] == q1 - q0
            rows = id_block if whole else id_block[local[sel]]
            hit = rows == wanted[sel, None]
            found = hit.any(axis=1)
            pos = np.argmax(hit, axis=1)
            if scores is None:
                r = pos + 1
            else:
                srows = score_block if whole else score_block[local[sel]]
                own = srows[np.arange(sel.shape[0]), pos]
                own_scores[p0 + sel] = own
                ge = srows >= own[:, None]
                if not all_valid:
                    ge &= valid if whole else valid[local[sel]]
                r = np.count_nonzero(ge, axis=1)
            ranks[p0 + sel] = np.where(found, r, np.inf)
    if scores is not None:
        found = np.isfinite(ranks)
        ranks[found] = _break_ties(
            queries[found], items[found], own_scores[found], ranks[found].astype(np.int64)
        )
    return queries, items, ranks


def metrics_from_search(
    result_ids: np.ndarray,
    relevant,
    ks: Sequence[int] = DEFAULT_KS,
    result_scores: np.ndarray | None = None,
) -> dict:
    """Retrieval metrics from top-k search results (see :func:`ranks_from_search`).

    Relevant items not among the k results count as not found: they add 0 to
    AP (which stays divided by the full number of relevant items) and a query
    that finds none has best rank ``inf``.  Every K in ``ks`` must be ``<= k``.
    With k equal to the gallery size the result equals :func:`text_to_image`
    / :func:`image_to_text` on the dense score matrix.

    For text -> image pass ``relevant=text_to_image``; for image -> text pass
    ``relevant=captions_by_image(text_to_image, n_images)``.
    """
    ks = _check_ks(ks)
    ids = np.asarray(result_ids)
    if ids.ndim == 2 and max(ks) > ids.shape[1]:
        raise ValueError(
            f"recall@{max(ks)} cannot be computed from {ids.shape[1]} results per query; "
            f"use ks <= {ids.shape[1]} or search with a larger k"
        )
    queries, _, ranks = ranks_from_search(ids, relevant, result_scores)
    counts = np.bincount(queries, minlength=ids.shape[0])
    found = np.isfinite(ranks)
    return _summarise(ids.shape[0], queries[found], ranks[found].astype(np.int64), counts, ks)


def match_calibration(
    text_embeddings: np.ndarray,
    image_embeddings: np.ndarray,
    text_to_image: np.ndarray,
    scale: float,
    bias: float,
    bins: int = 10,
    chunk: int = 1024,
) -> dict:
    """How well σ(scale · cosine + bias) works as the probability that a caption describes an
    image, over every caption × image pair (a caption's own image is its one positive).

    Returns ``ece`` (expected calibration error: the pair-weighted mean of
    |positive rate − mean probability| over equal-width probability bins), ``pairs``,
    ``positives`` and ``bins``: for each bin its bounds, pairs, mean probability and positive
    rate (None for an empty bin) — the points of a reliability diagram. Pairs are streamed in
    chunks of captions, so the caption × image matrix is never held whole.
    """
    text = _check_embeddings(text_embeddings, "text_embeddings")
    images = _check_embeddings(image_embeddings, "image_embeddings")
    mapping = _check_mapping(text_to_image, text.shape[0], images.shape[0])
    if not (np.isfinite(scale) and np.isfinite(bias)):
        raise ValueError("scale and bias must be finite numbers")
    if int(bins) < 1:
        raise ValueError("bins must be at least 1")
    bins = int(bins)
    count = np.zeros(bins, dtype=np.int64)
    probability_sum = np.zeros(bins, dtype=np.float64)
    positive_sum = np.zeros(bins, dtype=np.int64)
    for start in range(0, text.shape[0], chunk):
        cosines = text[start : start + chunk].astype(np.float64) @ images.T.astype(np.float64)
        probabilities = 1.0 / (1.0 + np.exp(-(scale * cosines + bias)))
        positive = np.zeros_like(probabilities, dtype=bool)
        positive[np.arange(probabilities.shape[0]), mapping[start : start + chunk]] = True
        which = np.minimum((probabilities * bins).astype(np.int64), bins - 1).ravel()
        count += np.bincount(which, minlength=bins)
        probability_sum += np.bincount(which, weights=probabilities.ravel(), minlength=bins)
        positive_sum += np.bincount(which, weights=positive.ravel(), minlength=bins).astype(np.int64)
    pairs = int(count.sum())
    filled = count > 0
    mean_probability = np.divide(probability_sum, count, out=np.zeros(bins), where=filled)
    positive_rate = np.divide(positive_sum, count, out=np.zeros(bins), where=filled)
    ece = float(np.sum(count[filled] / pairs * np.abs(positive_rate[filled] - mean_probability[filled])))
    return {
        "ece": ece,
        "pairs": pairs,
        "positives": int(positive_sum.sum()),
        "bins": [
            {"low": i / bins, "high": (i + 1) / bins, "pairs": int(count[i]),
             "mean_probability": float(mean_probability[i]) if filled[i] else None,
             "positive_rate": float(positive_rate[i]) if filled[i] else None}
            for i in range(bins)
        ],
    }
