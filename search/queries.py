"""Search services: text→image, image→text and image→image over the active model's indices."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings

from embeddings.models import Embedding, EmbeddingModel
from embeddings.services import encoder_for
from search import cursors, serving
from search.filters import SearchFilters, facets, parse_sort, subset_for
from search.models import Caption, ImageAsset, IndexBuild
from search.serving import ServingCheck, _on_serving_model, _signature_sql, loaded_indices, serving_model
from search.errors import InvalidQuery
from search.validation import inspect_image

log = logging.getLogger(__name__)


TEXT_QUERY_MAX_CHARS = 1000


class _Judged:
    probability: float | None
    match: bool | None

    @property
    def percent(self) -> str:
        """The match probability as people read it ("87 %"), or "" when there is none."""
        if self.probability is None:
            return ""
        return f"{self.probability:.0%}" if self.probability >= 0.01 else "<1%"


@dataclass
class ImageHit(_Judged):
    asset: ImageAsset
    score: float  # the cosine
    # Text↔image hits of a model whose sigmoid head is known: the probability that query and hit
    # match, and whether it reaches the threshold. None for image→image, which the head never saw.
    probability: float | None = None
    match: bool | None = None


@dataclass
class CaptionHit(_Judged):
    caption: Caption
    score: float
    probability: float | None = None
    match: bool | None = None


@dataclass
class SearchResult:
    model: EmbeddingModel
    images: list[ImageHit] = field(default_factory=list)
    captions: list[CaptionHit] = field(default_factory=list)
    took_ms: float = 0.0
    timings: dict = field(default_factory=dict)
    no_good_match: bool = False  # no text↔image hit reaches the threshold: the nearest are shown
    reason: str = ""
    next_cursor: str | None = None  # the page after this one (text search), or None at the end


def validate_min_score(min_score) -> float | None:
    """A match-probability threshold in [0, 1], or None for none."""
    if min_score is None or min_score == "":
        return None
    try:
        value = float(min_score)
    except (TypeError, ValueError):
        raise InvalidQuery("min_score must be a number between 0 and 1.") from None
    if not 0.0 <= value <= 1.0:
        raise InvalidQuery("min_score must be a number between 0 and 1 (a match probability).")
    return value


def _judge(model: EmbeddingModel, hits: list, min_score: float | None) -> tuple[list, str]:
    """Give text↔image hits their match probability (``EmbeddingModel.match_probability``).
    With ``min_score`` only the hits that reach it stay; when none does, the nearest stay,
    marked as no match. The hits, and the reason when nothing matched ("" otherwise)."""
    if not model.calibrated or not hits:
        return hits, ""
    threshold = settings.SEARCH_MATCH_THRESHOLD if min_score is None else min_score
    for hit in hits:
        hit.probability = model.match_probability(hit.score)
        hit.match = hit.probability >= threshold
    if any(hit.match for hit in hits):
        return ([hit for hit in hits if hit.match] if min_score is not None else hits), ""
    best = max(hit.probability for hit in hits)
    return hits, (f"No good match: no result reaches a match probability of {threshold:.0%} "
                  f"(the best has {best:.1%}); the nearest are shown.")


def validate_k(k) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise InvalidQuery("k must be a whole number.") from None
    if not 1 <= k <= settings.SEARCH_MAX_K:
        raise InvalidQuery(f"k must be between 1 and {settings.SEARCH_MAX_K}.")
    return k


def clean_text_query(query) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InvalidQuery("The query is empty; type what you are looking for.")
    # The tokenizer truncates to the model's 64 tokens; this bounds the work before it.
    return query.strip()[:TEXT_QUERY_MAX_CHARS]


def _nearest(model, modality, vector: np.ndarray, k: int, fetch_rows, cache_use: list | None = None,
             shared: tuple[bool, bool] = (False, False), filters: SearchFilters | None = None):
    """Top-k rows that still exist in Postgres, best first (``fetch_rows(ids)`` ->
    ``{id: row}``), among the images a filter keeps (``filters``, image index only).

    Rows deleted since the index was written are skipped (and the search widened),
    so a deletion disappears from results at once. A vector asked about before of
    the same index version gets its neighbours from the result cache
    (``ServedIndex.nearest``; ``shared``: read and write its shared level);
    ``cache_use`` collects where each lookup's answer came from. A filter is applied inside
    the vector search (``filters.subset_for``), and checked again on the rows read.
    """
    served = loaded_indices.served(model, modality)
    total = served.index.count() if served is not None else 0
    if not total:
        return []
    subset = subset_for(filters, served.index, served.version) if filters is not None else None
    if subset is not None and subset.ids is not None:
        total = min(total, len(subset))
        if not total:
            return []
    fetch = min(total, k)
    while True:
        ids, scores, where = served.nearest(vector, fetch, shared_read=shared[0], shared_write=shared[1],
                                            subset=subset)
        if cache_use is not None:
            cache_use.append(where)
        pairs = [(int(i), float(s)) for i, s in zip(ids, scores) if i >= 0]
        rows = fetch_rows([i for i, _ in pairs])
        hits = [(rows[i], s) for i, s in pairs if i in rows]
        # Fewer ids than asked: the index (or the filter's rows in it) has no more.
        if len(hits) >= k or fetch >= total or len(pairs) < fetch:
            return hits[:k]
        fetch = min(total, fetch * 2 + (k - len(hits)))


def _result_cache(cache_use: list) -> str:
    """Where a search's neighbours came from: a miss if any index was searched."""
    if not cache_use or serving.MISS in cache_use:
        return serving.MISS
    return serving.HIT_SHARED if serving.HIT_SHARED in cache_use else serving.HIT_LOCAL


def _rows_by_id(model_cls, columns: str, ids, check: ServingCheck | None, join: str = "") -> dict:
    """``model_cls`` rows (alias ``a``) with ``columns`` for these ids; the first query of
    a search also returns the serving model's signature for ``check``."""
    table = model_cls._meta.db_table
    if check is None or not check.pending:
        sql = f"SELECT {columns} FROM {table} a {join} WHERE a.id = ANY(%s)"
        return {row.pk: row for row in model_cls.objects.raw(sql, [list(ids)])}
    signature, params = _signature_sql()
    # One row even when no id matches, so the signature always comes back.
    sql = (f"SELECT {signature} AS serving_signature, {columns} "
           f"FROM (SELECT 1) one LEFT JOIN {table} a ON a.id = ANY(%s) {join}")
    rows = list(model_cls.objects.raw(sql, [*params, list(ids)]))
    check.verify(rows[0].serving_signature)
    return {row.pk: row for row in rows if row.pk is not None}


def _admitted(rows: dict, filters: SearchFilters | None, exclude: int | None = None) -> dict:
    if filters is None and exclude is None:
        return rows
    return {i: row for i, row in rows.items() if i != exclude and (filters is None or filters.admits(row))}


def fetch_assets(ids, check: ServingCheck | None = None, filters: SearchFilters | None = None,
                 exclude: int | None = None) -> dict[int, ImageAsset]:
    """Image rows by id, each with its caption texts (``caption_texts``, in caption
    order) gathered by the same query; with ``filters`` only those it admits, without
    ``exclude``."""
    columns = (f"a.*, ARRAY(SELECT c.text FROM {Caption._meta.db_table} c WHERE c.asset_id = a.id "
               f"ORDER BY c.id) AS caption_texts")
    return _admitted(_rows_by_id(ImageAsset, columns, ids, check), filters, exclude)


def fetch_captions(ids, check: ServingCheck | None = None, filters: SearchFilters | None = None) -> dict[int, Caption]:
    """Caption rows by id; with ``filters``, read with their image's attributes and kept only
    when the filter admits that image (what a user may not see included)."""
    if filters is None or not filters.restricts:
        return _rows_by_id(Caption, "a.*", ids, check)
    columns = "a.*, i.collection, i.uploaded_by_id, i.created AS asset_created, i.format, i.width, i.height"
    rows = _rows_by_id(Caption, columns, ids, check, join=f"JOIN {ImageAsset._meta.db_table} i ON i.id = a.asset_id")
    return {i: row for i, row in rows.items() if filters.admits(_AssetColumns(row))}


@dataclass
class _AssetColumns:
    """A caption row seen as its image's attributes, for ``SearchFilters.admits``."""

    row: Caption

    def __getattr__(self, name):
        return getattr(self.row, "asset_created" if name == "created" else name)


@dataclass
class _Page:
    """One page of a search's image hits."""

    hits: list
    reason: str = ""
    next_cursor: str | None = None


def _indexed(model) -> int:
    served = loaded_indices.served(model, IndexBuild.Modality.IMAGE)
    return served.index.count() if served is not None else 0


def _no_rows_reason(filters: SearchFilters | None) -> str:
    return "No picture matches these filters." if filters is not None and filters.asked else ""


def _ranked_page(model, vector, k: int, digest: str, after: cursors.Cursor | None, fetch, *, judge: bool,
                 min_score: float | None = None, filters: SearchFilters | None = None,
                 cache_use: list | None = None, shared=(False, False)) -> _Page:
    """The page of image hits after the cursor ``after`` in relevance order (score descending,
    then id), the whole search bounded by SEARCH_MAX_RESULTS. ``judge``: text↔image hits, which
    get their match probability and may end in "no good match"."""
    seen = after.seen if after else 0
    # The page after the cursor's hit: the ranking down to seen + k, and one page more for the
    # pictures added since the page before (they may rank above the cursor's hit).
    wanted = seen + 2 * k if after else k
    hits = _nearest(model, IndexBuild.Modality.IMAGE, vector, wanted, fetch, cache_use, shared, filters)
    if after is not None:
        hits = [(a, s) for a, s in hits if after.after(cursors.relevance_key(s, a.pk))]
    more = len(hits) >= k and seen + k < min(_indexed(model), settings.SEARCH_MAX_RESULTS)
    page, reason = [ImageHit(a, s) for a, s in hits[:k]], ""
    if judge:
        page, reason = _judge(model, page, min_score)
        if after is not None:
            reason = ""  # "no good match" speaks of a whole search, said on its first page
        if (min_score is not None and len(page) < k) or reason:
            more = False  # the rest ranks lower still: none of it reaches the threshold
    if not page and after is None:
        reason = reason or _no_rows_reason(filters)
    last = page[-1] if page else None
    next_cursor = cursors.encode(cursors.Cursor(digest, seen + len(page), cursors.relevance_key(last.score, last.asset.pk))) \
        if more and last is not None else None
    return _Page(page, reason, next_cursor)


def _sort_key(sort: str, row) -> tuple:
    """The key a hit ascends by when sorted by date or name (then id)."""
    if sort == "newest":
        return (-row.created.timestamp(), -row.pk)
    if sort == "oldest":
        return (row.created.timestamp(), row.pk)
    return ((row.original_name or "").lower(), row.pk)


def _sorted_page(model, check, vector, k: int, digest: str, after: cursors.Cursor | None, sort: str,
                 min_score: float | None, filters: SearchFilters | None, cache_use: list) -> _Page:
    """The page after the cursor ``after`` of the matches sorted by date or name. The matches are the hits
    whose match probability reaches the threshold (``min_score``, else SEARCH_MATCH_THRESHOLD),
    among the best SEARCH_MAX_RESULTS; only their dates and names are read to sort them, and
    then the page's rows. When nothing matches, the nearest are shown by relevance."""
    columns = "a.id, a.created, a.original_name, a.collection, a.uploaded_by_id, a.format, a.width, a.height"

    def light_rows(ids):
        return _admitted(_rows_by_id(ImageAsset, columns, ids, check), filters)

    candidates = _nearest(model, IndexBuild.Modality.IMAGE, vector, settings.SEARCH_MAX_RESULTS, light_rows,
                          cache_use, filters=filters)
    threshold = settings.SEARCH_MATCH_THRESHOLD if min_score is None else min_score
    matches = [(row, score) for row, score in candidates
               if not model.calibrated or model.match_probability(score) >= threshold]
    if not matches:
        if after is not None:
            return _Page([])
        nearest = candidates[:k]
        rows = fetch_assets([row.pk for row, _ in nearest])
        page, reason = _judge(model, [ImageHit(rows[row.pk], s) for row, s in nearest if row.pk in rows], min_score)
        return _Page(page, reason or _no_rows_reason(filters))
    ordered = sorted(matches, key=lambda hit: _sort_key(sort, hit[0]))
    if after is not None:
        ordered = [hit for hit in ordered if after.after(_sort_key(sort, hit[0]))]
    chosen = ordered[:k]
    rows = fetch_assets([row.pk for row, _ in chosen])
    page, _ = _judge(model, [ImageHit(rows[row.pk], s) for row, s in chosen if row.pk in rows], min_score)
    seen = (after.seen if after else 0) + len(page)
    more = len(ordered) > k and bool(page)
    next_cursor = cursors.encode(cursors.Cursor(digest, seen, _sort_key(sort, chosen[-1][0]))) if more else None
    return _Page(page, next_cursor=next_cursor)


def search_text(query, k=10, min_score=None, cursor: str | None = None, filters: SearchFilters | None = None,
                sort: str = "relevance") -> SearchResult:
    """The k images nearest a text; with ``min_score`` only those whose match probability
    reaches it (or, when none does, the nearest, marked ``no_good_match``). ``cursor``: the
    ``next_cursor`` of the page before, for the next k (up to SEARCH_MAX_RESULTS in all).
    ``filters``: only the images it keeps (``search.filters``). ``sort``: relevance, or newest,
    oldest, name among the matches."""
    k = validate_k(k)
    query = clean_text_query(query)
    min_score = validate_min_score(min_score)
    sort = parse_sort(sort)
    started = time.perf_counter()
    return _on_serving_model(
        lambda model, check: _search_text(model, check, query, k, started, min_score, cursor, filters, sort))


def _search_text(model, check, query: str, k: int, started: float, min_score: float | None = None,
                 cursor: str | None = None, filters: SearchFilters | None = None,
                 sort: str = "relevance") -> SearchResult:
    # A bad cursor is refused before any work; a repeated query (same model, same tokens)
    # skips the text tower: see search/serving.py.
    filter_key = filters.key() if filters is not None and filters.restricts else ""
    digest = cursors.search_digest(model.pk, query, min_score, filter_key, sort)
    after = cursors.decode(cursor, digest) if cursor else None
    encoder = encoder_for(model)
    vector, cache = serving.text_embedding(model, encoder, query)
    encoded = time.perf_counter()
    cache_use: list[str] = []
    if sort == "relevance":
        # Neighbours go to the shared cache too; they can only be there if the vector was.
        shared_level = serving.shared_level(encoder)
        shared = (shared_level and cache != serving.MISS, shared_level)
        fetch = functools.partial(fetch_assets, check=check, filters=filters)
        page = _ranked_page(model, vector, k, digest, after, fetch, judge=True, min_score=min_score,
                            filters=filters, cache_use=cache_use, shared=shared)
    else:
        page = _sorted_page(model, check, vector, k, digest, after, sort, min_score, filters, cache_use)
    done = time.perf_counter()
    return SearchResult(
        model=model,
        images=page.hits,
        took_ms=(done - started) * 1000,
        timings={"encode_ms": (encoded - started) * 1000, "search_ms": (done - encoded) * 1000,
                 "query_cache": cache, "result_cache": _result_cache(cache_use)},
        no_good_match=bool(page.reason) and bool(page.hits),
        reason=page.reason,
        next_cursor=page.next_cursor,
    )


def _image_results(model, check, vector, k, started, encoded, digest: str, after: cursors.Cursor | None = None,
                   exclude_asset: int | None = None, min_score: float | None = None,
                   filters: SearchFilters | None = None) -> SearchResult:
    """Captions and similar images of an image vector; ``exclude_asset``: the image searched
    from, which is not its own similar image. The first page has the captions; the cursor
    ``after`` pages on through the similar images."""
    cache_use: list[str] = []
    caption_hits, reason = [], ""
    if after is None:
        captions = _nearest(model, IndexBuild.Modality.CAPTION, vector, k,
                            functools.partial(fetch_captions, check=check, filters=filters), cache_use)
        caption_hits, reason = _judge(model, [CaptionHit(c, s) for c, s in captions], min_score)
    fetch = functools.partial(fetch_assets, check=check, filters=filters, exclude=exclude_asset)
    page = _ranked_page(model, vector, k, digest, after, fetch, judge=False, filters=filters, cache_use=cache_use)
    done = time.perf_counter()
    return SearchResult(
        model=model,
        images=page.hits,
        captions=caption_hits,
        no_good_match=bool(reason),
        reason=reason or (page.reason if not caption_hits else ""),
        next_cursor=page.next_cursor,
        took_ms=(done - started) * 1000,
        timings={"encode_ms": (encoded - started) * 1000, "search_ms": (done - encoded) * 1000,
                 "result_cache": _result_cache(cache_use)},
    )


def _image_digest(model, source: str, min_score, filters: SearchFilters | None) -> str:
    return cursors.search_digest(model.pk, "image", source, min_score,
                                 filters.key() if filters is not None and filters.restricts else "")


def search_image(data: bytes, k=10, min_score=None, cursor: str | None = None,
                 filters: SearchFilters | None = None) -> SearchResult:
    """Captions (image→text) and similar images (image→image) for uploaded image bytes;
    ``min_score`` as for text search, applied to the captions; ``cursor`` and ``filters`` as for
    text search, applied to the similar images (send the same image again for the next page)."""
    k = validate_k(k)
    min_score = validate_min_score(min_score)
    decoded = inspect_image(data, keep_decoded=True).image
    source = hashlib.sha256(data).hexdigest()
    started = time.perf_counter()

    def search(model, check):
        digest = _image_digest(model, source, min_score, filters)
        after = cursors.decode(cursor, digest) if cursor else None
        vector = encoder_for(model).encode_images([decoded])[0]
        return _image_results(model, check, vector, k, started, time.perf_counter(), digest, after,
                              min_score=min_score, filters=filters)

    return _on_serving_model(search)


def search_asset(asset_id, k=10, min_score=None, cursor: str | None = None,
                 filters: SearchFilters | None = None) -> SearchResult:
    """The same for an image already in the collection, using its stored vector: its best
    captions, and the images most like it (itself left out)."""
    k = validate_k(k)
    min_score = validate_min_score(min_score)
    started = time.perf_counter()
    try:
        asset_id = int(asset_id)
    except (TypeError, ValueError):
        raise InvalidQuery("asset_id must be a whole number.") from None
    source = ImageAsset.objects.filter(pk=asset_id).only("pk", "collection").first()
    if source is None or (filters is not None and source.collection in filters.hidden):
        raise ImageAsset.DoesNotExist(f"No image with id {asset_id}.")

    def search(model, check):
        digest = _image_digest(model, f"asset:{asset_id}", min_score, filters)
        after = cursors.decode(cursor, digest) if cursor else None
        row = Embedding.objects.filter(model=model, asset_id=asset_id).first()
        if row is None:
            raise InvalidQuery(f"Image {asset_id} has not been embedded yet; try again shortly.")
        return _image_results(model, check, row.array, k, started, time.perf_counter(), digest, after,
                              exclude_asset=asset_id, min_score=min_score, filters=filters)

    return _on_serving_model(search)


def warm_up() -> bool:
    """Load what the first searches of a process would otherwise wait for: the active
    model's towers (ONNX sessions, CUDA graph), its two indices and their scan copies, and the
    table the filters read.
    Run by each web worker as it starts (``portal/gunicorn.py``). Never raises: a
    portal without an active model, or with its database away, still starts."""
    from PIL import Image

    try:
        model = serving_model()
        encoder = encoder_for(model)
        vector = encoder.encode_texts(["a photo"])[0]
        encoder.encode_images([Image.new("RGB", (model.image_size or 224,) * 2)])
        for modality in IndexBuild.Modality.values:
            served = loaded_indices.served(model, modality)
            if served is not None and served.index.count():
                served.index.search(vector.reshape(1, -1), 1)  # makes the index's scan copy
        images = loaded_indices.served(model, IndexBuild.Modality.IMAGE)
        if images is not None:
            facets.table(images.version)  # the filterable attributes, read whole the first time
        return True
    except Exception as exc:
        log.warning("warm-up skipped: %s", exc)
        return False
