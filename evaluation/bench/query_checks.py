"""The query benchmark's in-process measurements: where a query's time goes step by
step, what the query cache costs, how the inference backends compare, and how
close a backend's embeddings and Recall@K are to float32 torch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from django.conf import settings
from django.test.utils import override_settings
from rest_framework.renderers import JSONRenderer

from evaluation.bench.http_client import TOP_K
from evaluation.bench.inputs import photo_jpeg, query_texts
from evaluation.bench.stats import median
from evaluation.core import metrics
from search.api import serializers
from search.models import IndexBuild
from search.queries import CaptionHit, ImageHit, SearchResult, fetch_assets, fetch_captions
from search.serving import QueryEmbeddingCache, ServingCheck, loaded_indices, serving_model, shared_level, write_behind
from search.validation import inspect_image


def load_encoder(model, backend: str):
    """The (cached) encoder of ``model`` with ``backend``, loaded, on the configured device."""
    from embeddings.core.siglip import get_encoder

    return get_encoder(model.source, device=settings.SIGLIP_DEVICE, backend=backend,
                       onnx_cache_dir=Path(settings.STATE_DIR) / "onnx").load()


def query_breakdown(model, encoder, jpeg: bytes, texts: list[str]) -> dict:
    """Where a query's time goes, measured step by step in this process (one thread)."""
    from embeddings.core.siglip import load_image

    image_index = loaded_indices.get(model, IndexBuild.Modality.IMAGE)
    caption_index = loaded_indices.get(model, IndexBuild.Modality.CAPTION)
    steps: dict[str, list[float]] = {}
    current = serving_model()  # what each search's first row query checks it still serves

    def timed(name, fn):
        started = time.perf_counter()
        value = fn()
        steps.setdefault(name, []).append((time.perf_counter() - started) * 1000)
        return value

    for _ in range(2):  # warm caches of every step
        encoder.encode_texts(texts[:1])
    for text in texts:
        ids = timed("text.tokenize", lambda: encoder.token_ids([text]))
        vector = timed("text.tower", lambda: encoder.encode_token_ids(ids)[0])
        found, scores = timed("text.index_search", lambda: image_index.search(vector.reshape(1, -1), TOP_K))
        rows = timed("text.hydrate", lambda: fetch_assets([int(i) for i in found[0]], ServingCheck(current)))
        hits = [ImageHit(rows[int(i)], float(sc)) for i, sc in zip(found[0], scores[0]) if int(i) in rows]
        timed("text.serialise", lambda: JSONRenderer().render(serializers.search_response(
            SearchResult(model=model, images=hits), None, captions=False)))
    for _ in range(6):
        # The upload check decodes it (once) and hands the pixels on.
        checked = timed("image.validate", lambda: inspect_image(jpeg, keep_decoded=True))
        rgb = timed("image.to_rgb", lambda: load_image(checked.image))
        pixels = timed("image.preprocess", lambda: encoder.preprocessor([rgb]))
        vector = timed("image.tower", lambda: encoder.encode_pixels(pixels)[0])
        c_ids, c_scores = timed("image.caption_search", lambda: caption_index.search(vector.reshape(1, -1), TOP_K))
        i_ids, i_scores = timed("image.image_search", lambda: image_index.search(vector.reshape(1, -1), TOP_K))
        c_rows = timed("image.hydrate", lambda: fetch_captions([int(i) for i in c_ids[0]], ServingCheck(current)))
        i_rows = timed("image.hydrate", lambda: fetch_assets([int(i) for i in i_ids[0]]))
        captions = [CaptionHit(c_rows[int(i)], float(sc)) for i, sc in zip(c_ids[0], c_scores[0]) if int(i) in c_rows]
        images = [ImageHit(i_rows[int(i)], float(sc)) for i, sc in zip(i_ids[0], i_scores[0]) if int(i) in i_rows]
        timed("image.serialise", lambda: JSONRenderer().render(serializers.search_response(
            SearchResult(model=model, images=images, captions=captions), None, captions=True)))
    out = {}
    for name, values in steps.items():
        per_query = 2 if name == "image.hydrate" else 1
        merged = [sum(values[i : i + per_query]) for i in range(0, len(values), per_query)]
        out[name] = median(merged)
    out["image_index_vectors"] = image_index.count()
    out["caption_index_vectors"] = caption_index.count()
    return out


def cache_lookup_cost(model, encoder, text: str) -> dict:
    """The query cache's own cost: a local hit and a shared (Redis) hit, the latter
    measured even where the server leaves the shared level off (on CUDA, by default)."""
    local, shared = [], []
    used = shared_level(encoder)
    with override_settings(SEARCH_QUERY_CACHE_SHARED="on"):
        warm = QueryEmbeddingCache()
        warm.text_embedding(model, encoder, text)
        write_behind.flush()
        for _ in range(50):
            started = time.perf_counter()
            warm.text_embedding(model, encoder, text)
            local.append((time.perf_counter() - started) * 1000)
            fresh = QueryEmbeddingCache()  # empty local level: served by Redis
            started = time.perf_counter()
            _, where = fresh.text_embedding(model, encoder, text)
            shared.append((time.perf_counter() - started) * 1000)
    return {"local_hit_ms_p50": median(local), "shared_hit_ms_p50": median(shared), "shared_source": where,
            "shared_level_served": used}


def compare_backends(source, device: str, seed) -> dict:
    """Time the text and image towers of every backend on one model, interleaved
    round by round so that a change in machine load hits them all alike."""
    import torch
    from tqdm import tqdm

    from embeddings.core.inference import BACKENDS, default_threads
    from embeddings.core.siglip import SiglipEncoder

    source = str(Path(source).resolve()) if Path(source).is_dir() else source
    names = [b for b in BACKENDS if b == "torch" or device == "cpu"]
    encoders = {}
    for name in names:
        encoders[name] = SiglipEncoder(source, device=device, backend=name,
                                       onnx_cache_dir=Path(settings.STATE_DIR) / "onnx").load()
    texts = query_texts(40, seed)
    pixels = {name: e.preprocess([photo_jpeg(7)]) for name, e in encoders.items()}
    ids = encoders[names[0]].token_ids(texts)
    reference_t = encoders["torch"].encode_token_ids(ids)
    reference_i = encoders["torch"].encode_pixels(pixels["torch"])
    rows = {}
    for name, e in encoders.items():  # warm up (and export)
        e.encode_token_ids(ids[:1])
        e.encode_pixels(pixels[name])
        rows[name] = {"text_wall": [], "text_cpu": [], "image_wall": [], "image_cpu": []}
    rounds = 12
    for r in tqdm(range(rounds), desc="backends", unit="round", file=sys.stderr):
        for name, e in encoders.items():
            for _ in range(3):
                row = ids[(r * 3 + _) % len(ids)][None]
                wall, cpu = time.perf_counter(), time.process_time()
                e.encode_token_ids(row)
                rows[name]["text_wall"].append((time.perf_counter() - wall) * 1000)
                rows[name]["text_cpu"].append((time.process_time() - cpu) * 1000)
            wall, cpu = time.perf_counter(), time.process_time()
            e.encode_pixels(pixels[name])
            rows[name]["image_wall"].append((time.perf_counter() - wall) * 1000)
            rows[name]["image_cpu"].append((time.process_time() - cpu) * 1000)
    out = {"source": source, "device": device, "torch_threads": torch.get_num_threads(),
           "onnx_threads": default_threads(), "load_average": os.getloadavg(), "backends": {}}
    for name, e in encoders.items():
        cos_t = float(np.min(np.sum(e.encode_token_ids(ids) * reference_t, axis=1)))
        cos_i = float(np.min(np.sum(e.encode_pixels(pixels[name]) * reference_i, axis=1)))
        stats = {k: median(v) for k, v in rows[name].items()}
        out["backends"][name] = dict(stats, text_cosine_min=round(cos_t, 5), image_cosine_min=round(cos_i, 5))
    return out


def embedding_quality(model, backend: str, device: str) -> dict:
    """Cosine between this backend's embeddings and float32 torch on the same inputs."""
    from embeddings.core.siglip import SiglipEncoder

    if backend == "torch" and not device.startswith("cuda"):
        return {"backend": backend, "note": "the reference itself"}
    texts = query_texts(64, "quality")
    images = [photo_jpeg(1000 + i) for i in range(16)]
    reference = SiglipEncoder(model.source, device="cpu", backend="torch").load()
    candidate = load_encoder(model, backend)
    ref_t, got_t = reference.encode_texts(texts), candidate.encode_texts(texts)
    ref_i, got_i = reference.encode_images(images), candidate.encode_images(images)
    cos_t = np.sum(ref_t * got_t, axis=1)
    cos_i = np.sum(ref_i * got_i, axis=1)
    return {
        "backend": backend, "reference": "torch float32 on the CPU",
        "text_cosine_min": round(float(cos_t.min()), 5), "text_cosine_median": round(float(np.median(cos_t)), 5),
        "image_cosine_min": round(float(cos_i.min()), 5), "image_cosine_median": round(float(np.median(cos_i)), 5),
        "texts": len(texts), "images": len(images),
    }


def recall_comparison(source, backend: str, device: str) -> dict | None:
    """Recall@K on the synthetic shapes test split: float32 torch vs this backend."""
    from embeddings.core import synthetic
    from embeddings.core.siglip import SiglipEncoder

    if source is None:
        demo = Path(settings.BASE_DIR) / "embeddings" / "demo_model"
        if not (demo / "config.json").exists():
            return {"skipped": "no trained model: embeddings/demo_model is missing (or pass --recall-model)"}
        source = str(demo)
    if source.lower() == "none":
        return None
    items = [item for item in synthetic.plan(seed=0, n_train=0) if item.split == "test"]
    images, captions, mapping = [], [], []
    for n, item in enumerate(items):
        tag = f"0-{item.split}-{item.index}"
        images.append(synthetic.render(item.composition, 64, seed=tag))
        for text in synthetic.captions_for(item.composition, seed=tag):
            captions.append(text)
            mapping.append(n)
    mapping = np.asarray(mapping)
    out = {"model": source, "images": len(images), "captions": len(captions)}
    for name, kind in (("torch-fp32", "torch"), (backend, backend)):
        encoder = SiglipEncoder(source, device="cpu" if name == "torch-fp32" else device, backend=kind,
                                onnx_cache_dir=Path(settings.STATE_DIR) / "onnx").load()
        found = metrics.retrieval_metrics(encoder.encode_images(images), encoder.encode_texts(captions), mapping)
        out[name] = {direction: {k: round(float(v), 4) for k, v in values.items() if k.startswith("recall")}
                     for direction, values in found.items()}
    worst = 0.0
    for direction in ("text_to_image", "image_to_text"):
        for key, value in out["torch-fp32"][direction].items():
            worst = max(worst, abs(value - out[backend][direction][key]))
    out["max_recall_difference_points"] = round(100 * worst, 2)  # recall is a fraction
    return out
