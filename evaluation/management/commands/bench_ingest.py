"""Ingestion benchmark: N generated JPEGs on disk -> vectors stored and indexed,
with images/s per stage.

    python manage.py bench_ingest --n 200
    python manage.py bench_ingest --n 20000 --batch-size 256 --workers 14   # a GPU host

The model is the real SigLIP base architecture (``SiglipConfig()``: ViT-B/16
at 224 px, 12 + 12 layers, 768-d embeddings) with random weights, so the
compute is that of ``google/siglip-base-patch16-224`` without downloading it.
It is built once and kept in ``--cache-dir`` (a checkpoint written with
``embeddings.core.checkpoints`` and a SentencePiece tokenizer trained here). The
images are 640x480 JPEGs drawn with Pillow (gradients, shapes and noise, so
they compress like photographs).

The run registers a separate, inactive embedding model, creates the assets in
the collection ``bench-ingest`` and embeds them with
``search.bulk_embedding.embed_assets_bulk`` (one index sync at the end); it
removes all of it afterwards unless ``--keep``. It also times the model alone
on ready pixels, the ceiling for the end-to-end rate.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand

COLLECTION = "bench-ingest"
MODEL_NAME = "bench-siglip-base-random"
WORDS = (
    "a red green blue yellow small large dog cat man woman child riding surfboard wave beach snow "
    "playing table fruit bowl wooden street car bus train city park tree sky cloud mountain river "
    "boat two three holding standing sitting next to on in under near with of the"
).split()


def tokenizer_texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(n)]


def base_checkpoint(cache_dir: Path) -> Path:
    """The SigLIP base architecture with random weights, built once."""
    from transformers import SiglipConfig

    from embeddings.core.checkpoints import build_random_checkpoint

    path = cache_dir / "siglip-base-random"
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    tmp = cache_dir / ".siglip-base-random.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_random_checkpoint(tmp, tokenizer_texts(), seed=0, config=SiglipConfig())
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def photo_like_jpeg(seed: int, size=(640, 480), quality: int = 90) -> bytes:
    """A 640x480 JPEG with smooth gradients, a few shapes and sensor-like noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        base[..., c] = 128 + 60 * np.sin(a * xx / 90 + b * yy / 70 + d * 3)
    base += rng.normal(0, 6, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, 240)), y0 + int(rng.integers(20, 200))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_jpeg(job: tuple[str, int]) -> None:
    folder, i = job
    (Path(folder) / f"{i:07d}.jpg").write_bytes(photo_like_jpeg(i))


class Command(BaseCommand):
    help = "Benchmark bulk ingestion (read, decode, model, store, index) with the SigLIP base architecture."

    def add_arguments(self, parser):
        parser.add_argument("--n", type=int, default=200, help="images")
        parser.add_argument("--batch-size", type=int, default=None)
        parser.add_argument("--workers", type=int, default=None, help="decoding processes")
        parser.add_argument("--cache-dir", default=None, help="default: STATE_DIR/bench-cache")
        parser.add_argument("--checkpoint", default=None,
                            help="an existing checkpoint directory instead of the SigLIP base architecture")
        parser.add_argument("--model-alone", type=int, default=32,
                            help="images for timing the model alone (0: skip)")
        parser.add_argument("--keep", action="store_true", help="keep the assets, vectors and model")
        parser.add_argument("--jpeg-draft", action="store_true",
                            help="GPU path: decode JPEGs at a reduced scale (INGEST_JPEG_DRAFT)")
        parser.add_argument("--output", help="also write the results JSON here")
        parser.add_argument("--no-save", action="store_true", help="do not store a BenchmarkRun")
        parser.add_argument("--inference", default=None,
                            help="inference backend for this run (default: SIGLIP_INFERENCE), e.g. torch")

    def handle(self, *args, **opts):
        from tqdm import tqdm

        from embeddings.models import EmbeddingModel
        from embeddings.services import encoder_for, register_model
        from search.bulk_embedding import embed_assets_bulk
        from search.models import ImageAsset

        n = opts["n"]
        if opts["inference"]:
            settings.SIGLIP_INFERENCE = opts["inference"]
        cache = Path(opts["cache_dir"] or Path(settings.STATE_DIR) / "bench-cache")
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        checkpoint = Path(opts["checkpoint"]) if opts["checkpoint"] else base_checkpoint(cache)
        self.stdout.write(f"checkpoint {checkpoint} ({time.perf_counter() - t0:.0f} s)")

        model = register_model(str(checkpoint), name=MODEL_NAME, kind=EmbeddingModel.Kind.RANDOM, activate=False)
        encoder = encoder_for(model)
        import torch

        self.stdout.write(
            f"device {encoder.device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
        )

        # Images on disk, assets in the database.
        ImageAsset.objects.filter(collection=COLLECTION).delete()
        media = Path(settings.MEDIA_ROOT)
        folder = media / COLLECTION
        folder.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(n) if not (media / f"{COLLECTION}/{i:07d}.jpg").exists()]
        if missing:
            # Drawing 640x480 JPEGs takes ~10 ms each: use every core on a big host.
            with multiprocessing.get_context("spawn").Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
                jobs = pool.imap_unordered(_write_jpeg, [(str(folder), i) for i in missing], chunksize=64)
                for _ in tqdm(jobs, total=len(missing), desc="writing JPEGs", unit="img", disable=None):
                    pass
        assets = []
        for i in range(n):
            name = f"{COLLECTION}/{i:07d}.jpg"
            path = media / name
            digest = hashlib.sha256(f"{COLLECTION}-{i}-{path.stat().st_size}".encode()).hexdigest()
            assets.append(ImageAsset(file=name, sha256=digest, original_name=f"{i}.jpg", width=640,
                                     height=480, format="JPEG", collection=COLLECTION))
        ImageAsset.objects.bulk_create(assets, batch_size=2000)
        ids = list(ImageAsset.objects.filter(collection=COLLECTION).values_list("pk", flat=True))
        jpeg_bytes = sum((media / a.file.name).stat().st_size for a in assets)
        self.stdout.write(f"{len(ids)} JPEGs 640x480, {jpeg_bytes / len(ids) / 1024:.0f} KiB each on average")

        # Decoding for the GPU path (uint8, resized), one core: what each worker sustains.
        from embeddings.core.batches import resized_uint8

        encoder.load()
        sample = [(media / a.file.name).read_bytes() for a in assets[: min(n, 64)]]
        t0 = time.perf_counter()
        for data in sample:
            resized_uint8(encoder.preprocessor, data, draft=opts["jpeg_draft"])
        decode_one_core = len(sample) / (time.perf_counter() - t0)

        alone = None
        if opts["model_alone"]:
            encoder.load()
            m = min(opts["model_alone"], n)
            pixels = encoder.preprocess([media / a.file.name for a in assets[:m]])
            batch = opts["batch_size"] or (256 if str(encoder.device).startswith("cuda") else 16)
            encoder.encode_pixels(pixels[: min(4, m)], batch_size=batch)  # warm-up
            t0 = time.perf_counter()
            encoder.encode_pixels(pixels, batch_size=batch)
            alone = m / (time.perf_counter() - t0)

        try:
            with tqdm(total=len(ids), desc="ingesting", unit="img", disable=None) as bar:
                result = embed_assets_bulk(
                    ids, model, batch_size=opts["batch_size"], workers=opts["workers"], index="sync",
                    progress=bar.update, jpeg_draft=opts["jpeg_draft"] or None,
                )
            rates = result.images_per_second()
            self.stdout.write(
                f"\n{result.images} images, {len(result.failed)} failed, device {result.device}, "
                f"batch {result.batch_size}, {result.workers} decoding workers"
            )
            self.stdout.write(f"{'stage':>12} | busy s | images/s")
            self.stdout.write("-" * 34)
            for stage in ("read", "decode", "model", "store", "index"):
                rate = rates[stage]
                self.stdout.write(
                    f"{stage:>12} | {result.seconds[stage]:>6.2f} | {rate:>8.1f}" if rate
                    else f"{stage:>12} | {result.seconds[stage]:>6.2f} |        -"
                )
            self.stdout.write(f"{'end to end':>12} | {result.wall_seconds:>6.2f} | {rates['end_to_end']:>8.2f}")
            if result.first_batch_seconds is not None:
                after = result.images / max(1e-9, result.wall_seconds - result.first_batch_seconds)
                self.stdout.write(f"{'first batch':>12} | {result.first_batch_seconds:>6.2f} |"
                                  f"            (start-up; {after:.1f} images/s after it)")
            if alone:
                self.stdout.write(f"{'model alone':>12} |        | {alone:>8.2f}   (ready pixels, same batch size)")
            self.stdout.write(
                f"decode to uint8 224x224 (GPU path), one core: {decode_one_core:.0f} images/s; "
                f"14 workers of a 16-core GPU host: ~{14 * decode_one_core:.0f} images/s"
            )
            self.stdout.write(f"inference backend: {getattr(encoder, 'backend', 'torch')}")
            self._record(opts, encoder, result, rates, alone, decode_one_core, jpeg_bytes / len(ids))
        finally:
            if not opts["keep"]:
                self._clean_up(model, folder)

    def _record(self, opts, encoder, result, rates, alone, decode_one_core, jpeg_mean_bytes) -> None:
        """Write the figures as JSON (``--output``) and store them in the benchmark history."""
        import json

        from evaluation.records import record_ingestion
        from evaluation.services import machine_description

        figures = {
            "images": result.images,
            "failed": len(result.failed),
            "device": result.device,
            "batch_size": result.batch_size,
            "workers": result.workers,
            "inference": getattr(encoder, "backend", "torch"),
            "jpeg_draft": bool(opts["jpeg_draft"]),
            "jpeg": {"size": [640, 480], "mean_bytes": round(jpeg_mean_bytes)},
            "busy_seconds": {k: round(v, 3) for k, v in result.seconds.items()},
            "wall_seconds": round(result.wall_seconds, 3),
            "first_batch_seconds": round(result.first_batch_seconds or 0.0, 3),
            "images_per_second": {k: (round(v, 2) if v else None) for k, v in rates.items()},
            "model_alone_images_per_second": round(alone, 2) if alone else None,
            "decode_one_core_images_per_second": round(decode_one_core, 1),
            "machine": machine_description(encoder),
            "model_name": MODEL_NAME,
            "model_source": str(encoder.source),
            "image_size": encoder.image_size,
            "index_backend": settings.VECTOR_INDEX_BACKEND,
        }
        if opts["output"]:
            Path(opts["output"]).write_text(json.dumps(figures, indent=2))
            self.stdout.write(f"results written to {opts['output']}")
        if opts["no_save"]:
            return
        run = record_ingestion(figures)
        self.stdout.write(f"stored as benchmark run #{run.pk} (kind ingestion)")

    def _clean_up(self, model, folder: Path) -> None:
        from search.models import ImageAsset, IndexBuild

        ImageAsset.objects.filter(collection=COLLECTION).delete()
        for build in IndexBuild.objects.filter(model=model):
            Path(build.file_path).unlink(missing_ok=True)
        model.delete()
        shutil.rmtree(folder, ignore_errors=True)
