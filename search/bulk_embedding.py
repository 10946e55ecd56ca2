"""Bulk embedding: image files on disk -> vectors in PostgreSQL -> one index sync.

``embed_assets_bulk(asset_ids, model)`` embeds many assets at once, the way a
dataset import or ``embed_missing`` wants it, instead of one task per image:

* **read + decode** in worker processes (a torch ``DataLoader``): each worker
  reads the file, decodes it and resizes it with the checkpoint's own
  preprocessing (:class:`embeddings.core.siglip.ImagePreprocessor`, picklable), so
  the main process only batches ready pixels;
* **model** in large batches; on CUDA (torch backend) the workers hand over
  ``uint8`` pixels (a quarter of the bytes) in pinned memory, copied to the
  GPU asynchronously and normalised there, and the model runs in bfloat16;
  otherwise the workers hand over the exact float32 pixels of the per-asset
  path and the encoder's own ``encode_pixels`` runs them (whatever inference
  backend it uses);
* **store** in bulk: ``COPY`` into PostgreSQL in chunks (:func:`insert_vectors`)
  and one ``UPDATE`` of the statuses per chunk, no per-image round trip;
* **index**: one index sync at the end (or none: the caller schedules one).

Captions without a vector are embedded too (batched texts), as
:func:`search.asset_vectors.embed_asset` does. The vectors are those of the
per-asset path: the same pixels and the same model; only the batching
differs, which moves float32 results by a rounding step at most (with
``batch_size=1`` they are bit-identical).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, Value, When
from django.utils import timezone

from embeddings.core.batches import (
    ImageFiles,
    collate,
    default_batch_size,
    default_workers,
    lower_priority,
    normalise_on_device,
)
from embeddings.models import Embedding
from embeddings.services import active_model, encoder_for
from search.asset_vectors import mark_complete
from search.index_sync import sync_indices
from search.locking import lock_assets
from search.models import Caption, ImageAsset

log = logging.getLogger(__name__)


__all__ = ["BulkEmbeddingResult", "default_batch_size", "default_workers", "embed_assets_bulk", "insert_vectors"]


STAGES = ("read", "decode", "model", "text", "store", "index")


@dataclass
class BulkEmbeddingResult:
    """What a bulk run did, and where its time went.

    ``seconds`` holds the busy time of each stage: for ``read`` and ``decode``
    summed over the worker processes, so ``images_per_second`` divides by the
    number of workers to give the rate that stage sustains.
    """

    images: int = 0
    captions: int = 0
    skipped: int = 0
    failed: dict = field(default_factory=dict)  # asset id -> reason
    seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall_seconds: float = 0.0
    first_batch_seconds: float | None = None  # from the call to the first decoded batch (start-up)
    workers: int = 0
    batch_size: int = 0
    device: str = "cpu"

    def images_per_second(self) -> dict:
        rates = {}
        for stage in STAGES:
            busy = self.seconds[stage]
            if stage in ("read", "decode"):
                busy /= max(1, self.workers)
            rates[stage] = (self.images / busy) if busy > 0 and self.images else None
        rates["end_to_end"] = self.images / self.wall_seconds if self.wall_seconds else None
        return rates


_BULK_TABLE = "bulk_embedding_in"


def insert_vectors(model, target: str, rows: list[tuple[int, bytes]]) -> None:
    """Insert vectors of ``model`` for ``rows`` of (asset or caption id, packed
    float32 bytes); ``target`` is ``"asset"`` or ``"caption"``. A vector that
    is already stored stays (like ``bulk_create(ignore_conflicts=True)``).

    On PostgreSQL the rows travel by ``COPY … (FORMAT BINARY)`` into a
    temporary table and one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` moves
    them: about three times the rows per second of a multi-row ``INSERT``
    (the vectors are not escaped, the statement is not parsed per row). Must
    run inside a transaction (the temporary table is emptied in it).
    """


    if target not in ("asset", "caption"):
        raise ValueError(f"target must be 'asset' or 'caption', got {target!r}")
    if not rows:
        return
    if connection.vendor != "postgresql":
        Embedding.objects.bulk_create(
            [Embedding(model=model, vector=v, **{f"{target}_id": i}) for i, v in rows], ignore_conflicts=True
        )
        return
    meta = Embedding._meta
    column = meta.get_field(target).column
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {_BULK_TABLE} (row_id bigint, vector bytea)")
        with cursor.cursor.copy(f"COPY {_BULK_TABLE} (row_id, vector) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "bytea"])
            for row in rows:
                copy.write_row(row)
        cursor.execute(
            f"INSERT INTO {qn(meta.db_table)} ({qn(meta.get_field('model').column)}, {qn(column)}, "
            f"{qn(meta.get_field('vector').column)}, {qn(meta.get_field('created').column)}) "
            f"SELECT %s, row_id, vector, %s FROM {_BULK_TABLE} ON CONFLICT DO NOTHING",
            [model.pk, timezone.now()],
        )
        cursor.execute(f"TRUNCATE {_BULK_TABLE}")


def _source_of(asset) -> str | bytes:
    """A path the workers can open, or the bytes when the storage has no paths."""
    try:
        return asset.file.path
    except NotImplementedError:
        with asset.file.open("rb") as fh:
            return fh.read()


def embed_assets_bulk(
    asset_ids,
    model=None,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    store_chunk: int = 2000,
    index: str = "none",
    progress=None,
    jpeg_draft: bool | None = None,
) -> BulkEmbeddingResult:
    """Embed the images (and captions) of ``asset_ids`` that have no vector for
    ``model`` (default: the active model); returns a :class:`BulkEmbeddingResult`.

    ``index``: ``"sync"`` brings the indices up to date before returning,
    ``"none"`` leaves that to the caller (``search.tasks.schedule_index_sync``).
    ``workers=0`` decodes in this process. ``progress`` is called with the
    number of images done after each batch. ``jpeg_draft`` (default: the
    ``INGEST_JPEG_DRAFT`` setting) decodes JPEGs at a reduced scale on the GPU
    path (see :func:`resized_uint8`). Idempotent, like ``embed_asset``:
    assets deleted meanwhile are skipped and unreadable images are marked
    failed with their reason.
    """
    if index not in ("sync", "none"):
        raise ValueError(f"index must be 'sync' or 'none', got {index!r}")
    started = time.perf_counter()
    model = model or active_model()
    encoder = encoder_for(model)
    device = str(encoder.device)
    batch_size = int(batch_size or default_batch_size(device))
    workers = default_workers(device) if workers is None else max(0, int(workers))
    result = BulkEmbeddingResult(workers=workers, batch_size=batch_size, device=device)

    wanted = sorted({int(i) for i in asset_ids})
    items = _images_to_embed(model, wanted)
    result.skipped = len(wanted) - len(items)
    writer = _ImageVectorWriter(model, store_chunk, result)
    if items:
        for batch in _read_batches(encoder, items, result, jpeg_draft, started):
            result.failed.update(batch["failed"])
            if batch["pixels"] is not None:
                writer.add(batch["ids"], _encode_batch(encoder, batch["pixels"], result))
                result.images += len(batch["ids"])
            if progress is not None:
                progress(len(batch["ids"]) + len(batch["failed"]))
        writer.flush()
        if not workers:  # decoding ran in this process: it is not parallel time
            result.workers = 1
    _mark_failed(result.failed)
    result.captions = _embed_captions(model, encoder, wanted, store_chunk, result)
    # Assets complete now: their image had a vector already, or their captions just got theirs.
    for start in range(0, len(wanted), store_chunk):
        with transaction.atomic():
            mark_complete(model, lock_assets(wanted[start : start + store_chunk]))

    if writer.embedded or result.captions:
        t0 = time.perf_counter()
        if index == "sync":
            sync_indices(model)
        result.seconds["index"] = time.perf_counter() - t0
    result.wall_seconds = time.perf_counter() - started
    if result.failed:
        failures = defaultdict(int)
        for reason in result.failed.values():
            failures[reason.split(":", 1)[0]] += 1
        log.warning("bulk embedding: %d images failed (%s)", len(result.failed), dict(failures))
    return result


# --- Stages ------------------------------------------------------------------------


def _gpu_path(encoder) -> bool:
    """On CUDA with the torch backend, pixels travel as uint8 and are normalised on the GPU;
    otherwise the encoder's own entry point runs the model."""
    return str(encoder.device).startswith("cuda") and getattr(encoder, "backend", "torch") == "torch"


def _images_to_embed(model, wanted: list[int]) -> list[tuple[int, str | bytes]]:
    """(asset id, file) of the wanted assets whose image has no vector of the model yet."""
    done = set(Embedding.objects.filter(model=model, asset_id__in=wanted).values_list("asset_id", flat=True))
    assets = ImageAsset.objects.filter(pk__in=[i for i in wanted if i not in done]).order_by("pk")
    return [(asset.pk, _source_of(asset)) for asset in assets.only("pk", "file")]


def _read_batches(encoder, items, result: BulkEmbeddingResult, jpeg_draft: bool | None, started: float):
    """Reader: batches of decoded pixels from the worker processes (``embeddings.core.batches``),
    with their read and decode time added to the result."""
    import torch

    encoder.load()
    gpu_path = _gpu_path(encoder)
    dataset = ImageFiles(
        items, encoder.preprocessor, uint8=gpu_path,
        max_bytes=getattr(settings, "UPLOAD_MAX_BYTES", None),
        max_pixels=getattr(settings, "UPLOAD_MAX_PIXELS", None),
        draft=gpu_path and bool(getattr(settings, "INGEST_JPEG_DRAFT", False) if jpeg_draft is None else jpeg_draft),
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=result.batch_size,
        num_workers=result.workers,
        collate_fn=collate,
        pin_memory=gpu_path,
        prefetch_factor=4 if result.workers else None,
        persistent_workers=False,
        worker_init_fn=None if str(encoder.device).startswith("cuda") else lower_priority,
    )
    for batch in loader:
        if result.first_batch_seconds is None:
            result.first_batch_seconds = time.perf_counter() - started
        result.seconds["read"] += batch["read"]
        result.seconds["decode"] += batch["decode"]
        yield batch


def _encode_batch(encoder, pixels, result: BulkEmbeddingResult):
    """Encoder: one batch of pixels -> unit vectors."""
    t0 = time.perf_counter()
    if _gpu_path(encoder):
        pixels = pixels.to(encoder.device, non_blocking=True)
        pixels = normalise_on_device(pixels, encoder.preprocessor, next(encoder.model.parameters()).dtype)
        vectors = encoder.encode_device_pixels(pixels)
    else:
        vectors = encoder.encode_pixels(pixels.numpy(), batch_size=len(pixels))
    result.seconds["model"] += time.perf_counter() - t0
    return vectors


class _ImageVectorWriter:
    """Writer: image vectors into PostgreSQL in chunks of ``store_chunk``, under the asset
    locks (assets deleted meanwhile get nothing)."""

    def __init__(self, model, store_chunk: int, result: BulkEmbeddingResult):
        self.model, self.store_chunk, self.result = model, store_chunk, result
        self.pending: list = []
        self.embedded: list[int] = []

    def add(self, ids, vectors) -> None:
        self.pending.extend(zip(ids, (Embedding.pack(v) for v in vectors)))
        if len(self.pending) >= self.store_chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        t0 = time.perf_counter()
        rows, self.pending = self.pending, []
        with transaction.atomic():
            live = set(lock_assets([r[0] for r in rows]))
            rows = [r for r in rows if r[0] in live]
            insert_vectors(self.model, "asset", rows)
            mark_complete(self.model, live)  # those whose captions are done too; the rest after the text stage
        self.embedded.extend(r[0] for r in rows)
        self.result.seconds["store"] += time.perf_counter() - t0


def _mark_failed(failed: dict[int, str]) -> None:
    if not failed:
        return
    reasons = {i: r[:2000] for i, r in failed.items()}
    with transaction.atomic():
        ImageAsset.objects.filter(pk__in=lock_assets(reasons)).update(
            status=ImageAsset.Status.FAILED,
            error=Case(*[When(pk=i, then=Value(r)) for i, r in reasons.items()], default=Value("")),
        )


def _embed_captions(model, encoder, wanted: list[int], store_chunk: int, result: BulkEmbeddingResult) -> int:
    """Text stage: the captions of these assets without a vector for the model; how many stored
    (only captions still there with the text they were encoded from)."""
    t0 = time.perf_counter()
    captions = list(
        Caption.objects.filter(asset_id__in=wanted).exclude(embeddings__model=model).order_by("id")
        .values_list("id", "asset_id", "text")
    )
    if not captions:
        return 0
    cuda = str(encoder.device).startswith("cuda")
    vectors = encoder.encode_texts([text for _, _, text in captions], batch_size=256 if cuda else 64)
    result.seconds["text"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    with transaction.atomic():
        lock_assets({asset_id for _, asset_id, _ in captions})
        texts = dict(Caption.objects.filter(pk__in=[c for c, _, _ in captions]).values_list("pk", "text"))
        rows = [(cid, Embedding.pack(v)) for (cid, _, text), v in zip(captions, vectors) if texts.get(cid) == text]
        for start in range(0, len(rows), store_chunk):
            insert_vectors(model, "caption", rows[start : start + store_chunk])
    result.seconds["store"] += time.perf_counter() - t0
    return len(rows)
