"""The query benchmark's synthetic gallery: image assets with captions, and a random
unit vector for each, stored and indexed like any embedded asset.

The assets and captions are rows in PostgreSQL (no image files); the vectors are
stored with ``search.bulk_embedding.insert_vectors`` and the model's indices
are brought in line by ``search.index_sync.sync_indices``, the same path the
workers take, so the index files, their ``IndexBuild`` records and what the web
processes load are the portal's own. A gallery of the wanted size is reused.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
from django.db import transaction

from embeddings.models import Embedding
from evaluation.bench.inputs import query_texts
from search.bulk_embedding import insert_vectors
from search.index_sync import stored_ids, sync_indices
from search.models import Caption, ImageAsset, IndexBuild

BENCH_COLLECTION = "bench-synthetic"
ROW_CHUNK = 2000
VECTOR_CHUNK = 20_000
VECTOR_SEEDS = {IndexBuild.Modality.IMAGE: 1234, IndexBuild.Modality.CAPTION: 5678}


def write_synthetic_gallery(model, n_images: int, per_image: int, write) -> dict:
    """``n_images`` assets with ``per_image`` captions each in ``BENCH_COLLECTION``, with
    vectors of ``model`` and its indices in step; ``write`` gets progress messages."""
    assets = ImageAsset.objects.filter(collection=BENCH_COLLECTION)
    have = assets.count()
    if have != n_images:
        if have:
            write(f"Replacing a gallery of {have} images …")
            assets.delete()
        _create_rows(n_images, per_image)
    image_ids = np.fromiter(assets.values_list("pk", flat=True).order_by("pk"), dtype=np.int64)
    caption_ids = np.fromiter(
        Caption.objects.filter(asset__collection=BENCH_COLLECTION).values_list("pk", flat=True).order_by("pk"),
        dtype=np.int64)
    for modality, ids in ((IndexBuild.Modality.IMAGE, image_ids), (IndexBuild.Modality.CAPTION, caption_ids)):
        _store_vectors(model, modality, ids)
    sync_indices(model)
    return {"images": int(len(image_ids)), "captions": int(len(caption_ids)),
            "vectors": "synthetic unit vectors written through IndexBuild"}


def _create_rows(n_images: int, per_image: int) -> None:
    from tqdm import tqdm

    with tqdm(total=n_images, desc="gallery rows", unit="img", file=sys.stderr) as bar:
        for start in range(0, n_images, ROW_CHUNK):
            stop = min(n_images, start + ROW_CHUNK)
            with transaction.atomic():
                rows = ImageAsset.objects.bulk_create([
                    ImageAsset(
                        file=f"bench/{i // 1000:03d}/{i:06d}.jpg",
                        sha256=hashlib.sha256(f"bench-image-{i}".encode()).hexdigest(),
                        original_name=f"bench-{i:06d}.jpg", width=640, height=480, format="JPEG",
                        collection=BENCH_COLLECTION, status=ImageAsset.Status.EMBEDDED,
                    ) for i in range(start, stop)
                ])
                captions = []
                for asset, i in zip(rows, range(start, stop)):
                    for j, text in enumerate(query_texts(per_image, f"gallery-{i}")):
                        text = f"{text} ({j})"
                        captions.append(Caption(asset=asset, text=text, normalized_text=text.lower()))
                Caption.objects.bulk_create(captions)
            bar.update(stop - start)


def _store_vectors(model, modality: str, ids: np.ndarray) -> None:
    """A random unit vector for each of ``ids`` that has none (the n-th id always gets the
    same one), stored in chunks."""
    from tqdm import tqdm

    missing = np.setdiff1d(ids, stored_ids(model, modality))
    if not len(missing):
        return
    target = "asset" if modality == IndexBuild.Modality.IMAGE else "caption"
    rng = np.random.default_rng(VECTOR_SEEDS[modality])
    for start in tqdm(range(0, len(ids), VECTOR_CHUNK), desc=f"{modality} vectors", unit="chunk",
                      file=sys.stderr):
        block = rng.standard_normal((min(VECTOR_CHUNK, len(ids) - start), model.dimension)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        chunk = ids[start : start + VECTOR_CHUNK]
        wanted = np.isin(chunk, missing)
        rows = [(int(i), Embedding.pack(v)) for i, v in zip(chunk[wanted], block[wanted])]
        with transaction.atomic():
            insert_vectors(model, target, rows)
