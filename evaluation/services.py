"""Benchmark jobs: create a run, then measure retrieval through the portal's own search path.

A retrieval run

1. imports the dataset split into its collection (idempotent, ``datasets``);
2. embeds, in this process, every gallery asset that lacks vectors for the
   run's model (``search.asset_vectors.embed_asset``);
3. brings the model's indices in line with the stored vectors
   (``search.index_sync.sync_indices``);
4. retrieves through the same indices and code as the portal's searches:
   ``loaded_indices.get(model, modality)`` and the index's ``search()``. Text
   queries are encoded as ``search.queries.search_text`` encodes them: the
   caption text through ``clean_text_query`` and
   ``encoder_for(model).encode_texts``, one query per call (int8 inference
   quantises activations per call, so batching would change the vectors);
   image queries use each image's stored vector, like a search for an asset
   already in the collection;
5. computes the metrics of ``evaluation.core.metrics`` over the gallery only.

Restricting to the gallery: the indices hold every asset of the model, not just
the dataset's. Each query searches its index with ``k`` equal to the number of
vectors in the index, so the whole index is ranked; the results are then
filtered down to the gallery's ids, keeping their order and scores. That gives
every query the full ranking of the gallery, so recall@K, mAP and the
median / mean ranks are exact, the same as the dense computation over the
gallery's vectors. Queries go in chunks, so memory stays bounded.

The gallery is the dataset split itself: the assets its images resolve to and,
for each, the captions the dataset gives it (an asset may carry other captions,
from an upload or another dataset; those are not part of the gallery).
"""

from __future__ import annotations

import logging
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from embeddings.core.siglip import TEXT_MAX_LENGTH
from embeddings.models import Embedding, EmbeddingModel
from embeddings.services import active_model, encoder_for
from evaluation import datasets
from evaluation.bench.machine import machine_description
from evaluation.bench.stats import p50_p95
from evaluation.core import metrics, plots
from evaluation.models import BenchmarkRun
from search.asset_vectors import assets_missing_vectors, embed_asset
from search.index_sync import stored_vectors, sync_indices
from search.models import Caption, ImageAsset, IndexBuild, normalise_text
from search.queries import clean_text_query
from search.serving import loaded_indices

log = logging.getLogger(__name__)

KS = metrics.DEFAULT_KS
TOP_K = 10  # the k of the latency queries, as a portal search
LATENCY_SAMPLE = 100  # queries per direction
THROUGHPUT_IMAGES = 32
THROUGHPUT_CAPTIONS = 256
SAMPLE_QUERIES = 3  # per direction, in the sample grid
SAMPLE_TOP = 5
SEARCH_CHUNK_ELEMENTS = 1 << 21  # result slots per search chunk

ProgressCallback = Callable[[float, str], None]


# --- Creating runs -----------------------------------------------------------------


def prepare_run(
    *,
    dataset: str = "auto",
    path: str,
    split: str = "",
    limit: int | None = None,
    collection: str = "",
    model: EmbeddingModel | None = None,
    user=None,
) -> BenchmarkRun:
    """An unsaved retrieval run, after checking what can be checked quickly.

    Raises ``DatasetError`` for an unknown kind or a path that is not there,
    ``NoActiveModel`` when no model is given and none is active. The dataset's
    contents are read by the job itself.
    """
    kind, json_path = datasets.resolve(dataset, path)
    if limit is not None and limit < 1:
        raise datasets.DatasetError("The limit must be at least 1 image.")
    model = model or active_model()
    split = (split or "").strip()
    if kind == "coco2017":
        stem = json_path.stem
        file_split = stem[len("captions_"):] if stem.startswith("captions_") else stem
        if split and split != file_split:
            raise datasets.DatasetError(f"{json_path} holds only the {file_split!r} split, not {split!r}.")
        split = file_split
    split = split or datasets.DEFAULT_SPLIT
    return BenchmarkRun(
        kind=BenchmarkRun.Kind.RETRIEVAL,
        dataset=kind,
        dataset_path=str(json_path),
        split=split,
        limit=limit,
        collection=(collection or "").strip() or datasets.default_collection(kind, split),
        model=model,
        model_name=model.name,
        model_source=model.source,
        image_size=model.image_size,
        text_length=TEXT_MAX_LENGTH,
        requested_by=user if getattr(user, "is_authenticated", False) else None,
    )


def save_queued(run: BenchmarkRun) -> BenchmarkRun:
    """Save the run as queued; the caller hands it to a worker (``evaluation.tasks.queue_benchmark``)."""
    run.status = BenchmarkRun.Status.QUEUED
    run.save()
    return run


def rerun_of(run: BenchmarkRun, user=None) -> BenchmarkRun:
    """A new run (not saved yet) with the parameters of ``run``, on the currently active model."""
    return prepare_run(dataset=run.dataset, path=run.dataset_path, split=run.split, limit=run.limit,
                       collection=run.collection, user=user)


# --- Progress ----------------------------------------------------------------------


class Reporter:
    """Writes progress to the run (at most every ``interval`` seconds, and at each new
    stage) and passes it on to a callback."""

    def __init__(self, run: BenchmarkRun, callback: ProgressCallback | None = None, interval: float = 0.5):
        self.run = run
        self.callback = callback
        self.interval = interval
        self.percent = 0
        self.stage = ""
        self.label = ""
        self._written = 0.0

    def __call__(self, percent: float, stage: str, detail: str = "", *, force: bool = False) -> None:
        self.percent = max(self.percent, int(max(0, min(100, percent))))
        new_stage = stage != self.label
        self.label = stage
        self.stage = f"{stage} {detail}".strip()[:200]
        now = time.monotonic()
        if force or new_stage or now - self._written >= self.interval:
            BenchmarkRun.objects.filter(pk=self.run.pk).update(progress=self.percent, stage=self.stage)
            self._written = now
        if self.callback is not None:
            self.callback(self.percent, self.stage)

    def span(self, start: float, end: float, stage: str) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback mapping onto ``start..end`` percent."""

        def update(done: int, total: int) -> None:
            fraction = done / total if total else 1.0
            self(start + (end - start) * fraction, stage, f"{done}/{total}", force=done == total)

        return update


# --- Running -----------------------------------------------------------------------


def run_benchmark(run_id: int, progress: ProgressCallback | None = None) -> dict:
    """Run a queued benchmark to the end; store its results, or its error if it fails.

    A run is claimed once (queued → running), so a message delivered twice does
    not run it twice. Errors are stored on the run and raised again.
    """
    claimed = BenchmarkRun.objects.filter(pk=run_id, status=BenchmarkRun.Status.QUEUED).update(
        status=BenchmarkRun.Status.RUNNING, started=timezone.now(), progress=0, stage="starting", error=""
    )
    if not claimed:
        status = BenchmarkRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
        log.warning("benchmark run %s not started: its status is %s", run_id, status or "unknown (deleted)")
        return {"run": run_id, "skipped": True, "status": status}
    run = BenchmarkRun.objects.get(pk=run_id)
    report = Reporter(run, progress)
    try:
        if run.kind != BenchmarkRun.Kind.RETRIEVAL:
            raise ValueError(f"No job runs benchmarks of kind {run.kind!r}.")
        _run_retrieval(run, report)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not isinstance(exc, (datasets.DatasetError, KeyboardInterrupt)):
            message += "\n\n" + "".join(traceback.format_exception(exc)[-6:])
        BenchmarkRun.objects.filter(pk=run_id).update(
            status=BenchmarkRun.Status.FAILED, error=message[:20000], finished=timezone.now(),
            stage=f"failed while {report.label or 'starting'}"[:200],
        )
        raise
    return {"run": run_id, "status": BenchmarkRun.Status.SUCCEEDED,
            "text_to_image": run.text_to_image, "image_to_text": run.image_to_text}


@dataclass
class Gallery:
    """The images and captions one run retrieves among, in a fixed order."""

    image_ids: np.ndarray  # asset ids
    caption_ids: np.ndarray  # caption ids
    caption_texts: list[str]
    text_to_image: np.ndarray  # caption position -> image position
    captions_of_image: list[np.ndarray] = field(default_factory=list)  # caption ids per image


def build_gallery(dataset: datasets.Dataset, asset_ids: list[int]) -> Gallery:
    """The gallery of a dataset import: unique assets in dataset order, and per asset
    the caption rows whose text the dataset gives it."""
    wanted: dict[int, set[str]] = {}
    order: list[int] = []
    for item, asset_id in zip(dataset.items, asset_ids):
        if asset_id not in wanted:
            wanted[asset_id] = set()
            order.append(asset_id)
        wanted[asset_id].update(normalise_text(text) for text in item.captions)
    position = {asset_id: i for i, asset_id in enumerate(order)}
    rows = Caption.objects.filter(asset_id__in=order).order_by("id").values_list(
        "id", "asset_id", "normalized_text", "text")
    chosen = [(position[a], cid, text) for cid, a, norm, text in rows if norm in wanted[a]]
    chosen.sort(key=lambda row: (row[0], row[1]))
    mapping = np.array([p for p, _, _ in chosen], dtype=np.int64)
    caption_ids = np.array([cid for _, cid, _ in chosen], dtype=np.int64)
    missing = sorted(set(range(len(order))) - set(mapping.tolist()))
    if missing:
        raise ValueError(f"{len(missing)} gallery image(s) have no caption stored, e.g. asset {order[missing[0]]}.")
    return Gallery(
        image_ids=np.array(order, dtype=np.int64),
        caption_ids=caption_ids,
        caption_texts=[text for _, _, text in chosen],
        text_to_image=mapping,
        captions_of_image=[caption_ids[idx] for idx in metrics.captions_by_image(mapping, len(order))],
    )


def unembedded_among(model: EmbeddingModel, asset_ids) -> list[int]:
    """Of the given assets, those whose image or any caption has no vector for the model, in order."""
    wanted = [int(i) for i in asset_ids]
    missing = set(assets_missing_vectors(model).filter(pk__in=wanted).values_list("pk", flat=True))
    return [i for i in wanted if i in missing]


def _finite(value):
    """JSON-safe numbers: non-finite floats become None (Postgres JSON has no inf)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _save(run: BenchmarkRun, *fields: str) -> None:
    BenchmarkRun.objects.filter(pk=run.pk).update(**{f: getattr(run, f) for f in fields})


def _run_retrieval(run: BenchmarkRun, report: Reporter) -> None:
    model = run.model
    if model is None:
        raise ValueError("The run's embedding model no longer exists.")
    encoder = encoder_for(model)
    run.model_name, run.model_source = model.name, model.source
    run.image_size, run.text_length = model.image_size, TEXT_MAX_LENGTH
    run.machine = machine_description(encoder)
    _save(run, "model_name", "model_source", "image_size", "text_length", "machine")

    # 1. The dataset, imported into its collection.
    report(0, "reading the dataset")
    dataset = datasets.load(run.dataset, run.dataset_path, split=run.split or None, limit=run.limit)
    run.split = dataset.split
    imported = datasets.import_dataset(
        dataset, run.collection or None, progress=report.span(1, 15, "importing images"),
    )
    run.collection = imported.collection
    gallery = build_gallery(dataset, imported.asset_ids)
    run.gallery_images, run.gallery_captions = len(gallery.image_ids), len(gallery.caption_ids)
    run.extra = {**run.extra, "import": {"created": imported.created, "existing": imported.existing,
                                         "new_captions": imported.new_captions}}
    _save(run, "split", "collection", "gallery_images", "gallery_captions", "extra")

    # 2. Vectors for every gallery asset.
    missing = unembedded_among(model, gallery.image_ids)
    embed_progress = report.span(15, 45, "embedding images")
    started = time.perf_counter()
    for done, asset_id in enumerate(missing, 1):
        embed_asset(asset_id, model)
        embed_progress(done, len(missing))
    run.extra["embedded_in_run"] = {"assets": len(missing), "seconds": round(time.perf_counter() - started, 3)}

    # 3. Indices in line with the stored vectors.
    report(45, "updating the indices")
    sync_indices(model)
    image_index = loaded_indices.get(model, IndexBuild.Modality.IMAGE)
    caption_index = loaded_indices.get(model, IndexBuild.Modality.CAPTION)
    for name, index, ids in (("image", image_index, gallery.image_ids), ("caption", caption_index, gallery.caption_ids)):
        if index is None:
            raise ValueError(f"The {name} index of {model.name} is not available.")
        absent = np.setdiff1d(ids, index.ids())
        if absent.size:
            raise ValueError(f"The {name} index lacks {absent.size} gallery vectors (e.g. id {int(absent[0])}).")
    run.index_backend, run.index_params = image_index.backend, image_index.params
    _save(run, "index_backend", "index_params", "extra")

    # 4. Text → image: each caption is a text query, encoded on its own as a portal search
    #    encodes one (with int8 inference the vectors depend a little on the batch).
    text_sample = _spread(len(gallery.caption_ids), SAMPLE_QUERIES, starts=_first_captions(gallery))
    queries = [clean_text_query(text) for text in gallery.caption_texts]
    encoder.encode_texts(queries[:1])  # warm-up
    encode_progress = report.span(47, 62, "encoding text queries")
    text_vectors = np.empty((len(queries), model.dimension), dtype=np.float32)
    for position, query in enumerate(queries):
        text_vectors[position] = encoder.encode_texts([query])[0]
        encode_progress(position + 1, len(queries))
    stored_text = stored_vectors(model, IndexBuild.Modality.CAPTION, gallery.caption_ids)
    run.extra["query_vs_stored_caption_max_abs_diff"] = float(np.abs(text_vectors - stored_text).max())

    t2i, text_tops = ranked_search(
        image_index, text_vectors, gallery.image_ids, gallery.image_ids[gallery.text_to_image],
        keep=text_sample, progress=report.span(62, 75, "text → image queries"),
    )

    # 5. Image → text: each image's stored vector queries the caption index.
    image_vectors = stored_vectors(model, IndexBuild.Modality.IMAGE, gallery.image_ids)
    image_sample = _spread(len(gallery.image_ids), SAMPLE_QUERIES)
    i2t, image_tops = ranked_search(
        caption_index, image_vectors, gallery.caption_ids, gallery.captions_of_image,
        keep=image_sample, progress=report.span(75, 87, "image → text queries"),
    )
    run.text_to_image, run.image_to_text = _finite(t2i), _finite(i2t)
    if model.calibrated:  # how far the match probabilities the portal shows can be trusted
        run.extra["calibration"] = metrics.match_calibration(
            text_vectors, image_vectors, gallery.text_to_image, model.logit_scale, model.logit_bias)
    _save(run, "text_to_image", "image_to_text", "extra")

    # 6. Latency of single queries, as the portal serves them.
    report(87, "timing single queries")
    t2i_ms, i2t_ms = measure_latency(model, encoder, gallery)
    run.t2i_latency_p50_ms, run.t2i_latency_p95_ms = p50_p95(t2i_ms)
    run.i2t_latency_p50_ms, run.i2t_latency_p95_ms = p50_p95(i2t_ms)
    run.extra["latency_queries"] = {"text_to_image": len(t2i_ms), "image_to_text": len(i2t_ms), "k": TOP_K}

    # 7. Embedding throughput, batched as when assets are embedded, on a sample of the gallery.
    report(93, "timing embedding")
    run.images_per_second, run.extra["throughput_images"] = measure_image_throughput(encoder, gallery.image_ids)
    run.captions_per_second, run.extra["throughput_captions"] = measure_text_throughput(encoder, queries)

    # 8. The sample grid.
    report(96, "drawing sample queries")
    run.sample_grid.name = save_sample_grid(run, gallery, text_tops, image_tops)

    run.status, run.progress, run.stage, run.finished = BenchmarkRun.Status.SUCCEEDED, 100, "done", timezone.now()
    _save(run, "t2i_latency_p50_ms", "t2i_latency_p95_ms", "i2t_latency_p50_ms", "i2t_latency_p95_ms",
          "images_per_second", "captions_per_second", "extra", "sample_grid", "status", "progress", "stage", "finished")
    report(100, "done", force=True)


def _first_captions(gallery: Gallery) -> np.ndarray:
    """Position of the first caption of every image."""
    return np.searchsorted(gallery.text_to_image, np.arange(len(gallery.image_ids)))


def _spread(n: int, count: int, starts: np.ndarray | None = None) -> list[int]:
    """``count`` positions spread evenly over ``n`` (over images, when ``starts`` is given)."""
    if starts is not None:
        chosen = np.linspace(0, len(starts) - 1, min(count, len(starts))).round().astype(int)
        return sorted({int(starts[i]) for i in chosen})
    return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round().astype(int)})


def ranked_search(index, query_vectors, gallery_ids, relevant, *, keep=(), progress=None):
    """Metrics of queries searched in ``index``, counting only the ``gallery_ids`` rows.

    Each query ranks the whole index (k = its size) and keeps the gallery ids
    in order, so each query sees the full ranking of the gallery. Returns the
    metrics and the top ``SAMPLE_TOP`` (ids, scores) of the queries in ``keep``.
    """
    gallery_ids = np.asarray(gallery_ids, dtype=np.int64)
    total, width = index.count(), len(gallery_ids)
    n_queries = len(query_vectors)
    padded = max(width, max(KS))  # recall@K for K above the gallery size is 1, as in the dense form
    rows = max(1, SEARCH_CHUNK_ELEMENTS // max(total, 1))
    is_relevant_array = isinstance(relevant, np.ndarray) and relevant.dtype != object
    sums: dict[str, float] = {}
    best_ranks = np.empty(n_queries)
    tops = {}
    for q0 in range(0, n_queries, rows):
        q1 = min(q0 + rows, n_queries)
        ids, scores = index.search(query_vectors[q0:q1], total)
        mask = np.isin(ids, gallery_ids)
        if not (mask.sum(axis=1) == width).all():
            raise ValueError("A search did not return every gallery item; is the index complete?")
        found_ids = np.full((q1 - q0, padded), -1, dtype=np.int64)
        found_scores = np.full((q1 - q0, padded), -np.inf, dtype=np.float32)
        found_ids[:, :width] = ids[mask].reshape(q1 - q0, width)
        found_scores[:, :width] = scores[mask].reshape(q1 - q0, width)
        chunk_relevant = relevant[q0:q1] if is_relevant_array else list(relevant[q0:q1])
        chunk = metrics.metrics_from_search(found_ids, chunk_relevant, KS, found_scores)
        for key, value in chunk.items():
            if key not in ("median_rank", "queries"):
                sums[key] = sums.get(key, 0.0) + value * (q1 - q0)
        query, _, rank = metrics.ranks_from_search(found_ids, chunk_relevant, found_scores)
        best = np.full(q1 - q0, np.inf)
        np.minimum.at(best, query, rank)
        best_ranks[q0:q1] = best
        for q in keep:
            if q0 <= q < q1:
                tops[q] = (found_ids[q - q0, :SAMPLE_TOP].copy(), found_scores[q - q0, :SAMPLE_TOP].copy())
        if progress is not None:
            progress(q1, n_queries)
    result = {f"recall@{k}": sums[f"recall@{k}"] / n_queries for k in KS}
    result["mAP"] = sums["mAP"] / n_queries
    result["median_rank"] = float(np.median(best_ranks))
    result["mean_rank"] = sums["mean_rank"] / n_queries
    result["queries"] = int(n_queries)
    return result, tops


def measure_latency(model, encoder, gallery: Gallery) -> tuple[list[float], list[float]]:
    """Milliseconds per single query (top-``TOP_K``), on an even sample of each direction.

    Text → image: clean and encode the text, get the serving image index, search.
    Image → text: read the image's stored vector, get the serving caption index, search.
    """
    text_sample = _spread(len(gallery.caption_texts), LATENCY_SAMPLE)
    image_sample = _spread(len(gallery.image_ids), LATENCY_SAMPLE)

    def text_query(position: int) -> None:
        vector = encoder.encode_texts([clean_text_query(gallery.caption_texts[position])])[0]
        index = loaded_indices.get(model, IndexBuild.Modality.IMAGE)
        index.search(vector.reshape(1, -1), min(TOP_K, index.count()))

    def image_query(position: int) -> None:
        row = Embedding.objects.filter(model=model, asset_id=int(gallery.image_ids[position])).first()
        index = loaded_indices.get(model, IndexBuild.Modality.CAPTION)
        index.search(row.array.reshape(1, -1), min(TOP_K, index.count()))

    timings = []
    for query, sample in ((text_query, text_sample), (image_query, image_sample)):
        query(sample[0])  # warm-up, not timed
        measured = []
        for position in sample:
            started = time.perf_counter()
            query(position)
            measured.append((time.perf_counter() - started) * 1000)
        timings.append(measured)
    return timings[0], timings[1]


def measure_image_throughput(encoder, image_ids) -> tuple[float | None, dict]:
    """Images per second from stored bytes to vectors (decode, preprocess, encode), on a sample."""
    sample = [int(image_ids[i]) for i in _spread(len(image_ids), THROUGHPUT_IMAGES)]
    assets = ImageAsset.objects.in_bulk(sample)
    blobs = []
    for asset_id in sample:
        with assets[asset_id].file.open("rb") as handle:
            blobs.append(handle.read())
    encoder.encode_images(blobs[:1])  # warm-up, not timed
    started = time.perf_counter()
    encoder.encode_images(blobs)
    seconds = time.perf_counter() - started
    return (len(blobs) / seconds if seconds > 0 else None), {"images": len(blobs), "seconds": round(seconds, 4)}


def measure_text_throughput(encoder, texts) -> tuple[float | None, dict]:
    """Captions per second, tokenised and encoded in one batched call, on a sample."""
    sample = [texts[i] for i in _spread(len(texts), THROUGHPUT_CAPTIONS)]
    started = time.perf_counter()
    encoder.encode_texts(sample)
    seconds = time.perf_counter() - started
    return (len(sample) / seconds if seconds > 0 else None), {"captions": len(sample), "seconds": round(seconds, 4)}


def save_sample_grid(run: BenchmarkRun, gallery: Gallery, text_tops: dict, image_tops: dict) -> str:
    """Draw the sampled queries with their top results; returns the media path of the PNG."""

    assets = ImageAsset.objects.in_bulk(
        {int(i) for ids, _ in text_tops.values() for i in ids if i >= 0}
        | {int(gallery.image_ids[q]) for q in image_tops}
    )
    captions = dict(Caption.objects.filter(
        pk__in={int(i) for ids, _ in image_tops.values() for i in ids if i >= 0}).values_list("id", "text"))
    text_rows = []
    for q, (ids, scores) in sorted(text_tops.items()):
        correct = int(gallery.image_ids[gallery.text_to_image[q]])
        hits = [(assets[int(i)], int(i) == correct, float(s)) for i, s in zip(ids, scores) if i >= 0]
        text_rows.append((gallery.caption_texts[q], hits))
    image_rows = []
    for q, (ids, scores) in sorted(image_tops.items()):
        own = set(gallery.captions_of_image[q].tolist())
        hits = [(captions[int(i)], int(i) in own, float(s)) for i, s in zip(ids, scores) if i >= 0]
        image_rows.append((assets[int(gallery.image_ids[q])], hits))
    title = textwrap.shorten(
        f"{run.dataset} {run.split} · {run.gallery_images} images, {run.gallery_captions} captions · {run.public_model_name}",
        140,
    )
    png = plots.sample_grid(text_rows, image_rows, title=title)
    name = f"benchmarks/{run.pk}/samples.png"
    default_storage.delete(name)
    return default_storage.save(name, ContentFile(png))
