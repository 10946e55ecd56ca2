"""The ingestion benchmark: generated JPEGs on disk -> vectors stored and indexed, with
the images per second of each stage.

The model is the real SigLIP base architecture with random weights (the compute
of ``google/siglip-base-patch16-224`` without downloading it), built once in a
cache folder. The run registers a separate, inactive model, creates the assets
in the collection ``bench-ingest`` and embeds them with
``search.bulk_embedding.embed_assets_bulk`` (one index sync at the end). It also
times decoding on one core and the model alone on ready pixels.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from django.conf import settings

from embeddings.models import EmbeddingModel
from embeddings.services import encoder_for, register_model
from evaluation.bench.ingest_images import write_numbered_jpeg
from evaluation.bench.machine import machine_description
from evaluation.bench.records import record_ingestion
from search.bulk_embedding import embed_assets_bulk
from search.models import ImageAsset, IndexBuild

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


class IngestionBenchmark:
    """One run with the command's options ``opts``; ``write`` gets the lines to print."""

    def __init__(self, opts: dict, write):
        self.opts, self.write = opts, write
        self.media = Path(settings.MEDIA_ROOT)
        self.folder = self.media / COLLECTION

    def prepare(self) -> None:
        """The model, the JPEGs and their assets, the one-core decode rate and the model-alone rate."""
        import torch
        from tqdm import tqdm

        opts, n, media, folder = self.opts, self.opts["n"], self.media, self.folder
        if opts["inference"]:
            settings.SIGLIP_INFERENCE = opts["inference"]
        cache = Path(opts["cache_dir"] or Path(settings.STATE_DIR) / "bench-cache")
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        checkpoint = Path(opts["checkpoint"]) if opts["checkpoint"] else base_checkpoint(cache)
        self.write(f"checkpoint {checkpoint} ({time.perf_counter() - t0:.0f} s)")

        self.model = register_model(str(checkpoint), name=MODEL_NAME, kind=EmbeddingModel.Kind.RANDOM,
                                    activate=False)
        self.encoder = encoder = encoder_for(self.model)
        self.write(f"device {encoder.device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")

        # Images on disk, assets in the database.
        ImageAsset.objects.filter(collection=COLLECTION).delete()
        folder.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(n) if not (media / f"{COLLECTION}/{i:07d}.jpg").exists()]
        if missing:
            # Drawing 640x480 JPEGs takes ~10 ms each: use every core on a big host.
            with multiprocessing.get_context("spawn").Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
                jobs = pool.imap_unordered(write_numbered_jpeg, [(str(folder), i) for i in missing], chunksize=64)
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
        self.ids = list(ImageAsset.objects.filter(collection=COLLECTION).values_list("pk", flat=True))
        jpeg_bytes = sum((media / a.file.name).stat().st_size for a in assets)
        self.jpeg_mean_bytes = jpeg_bytes / len(self.ids)
        self.write(f"{len(self.ids)} JPEGs 640x480, {jpeg_bytes / len(self.ids) / 1024:.0f} KiB each on average")
        self.decode_one_core = self._decode_rate(assets)
        self.alone = self._model_alone_rate(assets)

    def _decode_rate(self, assets) -> float:
        """Decoding for the GPU path (uint8, resized), one core: what each worker sustains."""
        from embeddings.core.batches import resized_uint8

        self.encoder.load()
        sample = [(self.media / a.file.name).read_bytes() for a in assets[: min(self.opts["n"], 64)]]
        t0 = time.perf_counter()
        for data in sample:
            resized_uint8(self.encoder.preprocessor, data, draft=self.opts["jpeg_draft"])
        return len(sample) / (time.perf_counter() - t0)

    def _model_alone_rate(self, assets) -> float | None:
        if not self.opts["model_alone"]:
            return None
        encoder = self.encoder
        encoder.load()
        m = min(self.opts["model_alone"], self.opts["n"])
        pixels = encoder.preprocess([self.media / a.file.name for a in assets[:m]])
        batch = self.opts["batch_size"] or (256 if str(encoder.device).startswith("cuda") else 16)
        encoder.encode_pixels(pixels[: min(4, m)], batch_size=batch)  # warm-up
        t0 = time.perf_counter()
        encoder.encode_pixels(pixels, batch_size=batch)
        return m / (time.perf_counter() - t0)

    def ingest(self):
        """Embed, store and index the assets; the ``BulkEmbeddingResult``."""
        from tqdm import tqdm

        with tqdm(total=len(self.ids), desc="ingesting", unit="img", disable=None) as bar:
            return embed_assets_bulk(
                self.ids, self.model, batch_size=self.opts["batch_size"], workers=self.opts["workers"],
                index="sync", progress=bar.update, jpeg_draft=self.opts["jpeg_draft"] or None,
            )

    def figures(self, result) -> dict:
        """The figures stored and written as JSON."""
        rates = result.images_per_second()
        encoder, alone = self.encoder, self.alone
        return {
            "images": result.images,
            "failed": len(result.failed),
            "device": result.device,
            "batch_size": result.batch_size,
            "workers": result.workers,
            "inference": getattr(encoder, "backend", "torch"),
            "jpeg_draft": bool(self.opts["jpeg_draft"]),
            "jpeg": {"size": [640, 480], "mean_bytes": round(self.jpeg_mean_bytes)},
            "busy_seconds": {k: round(v, 3) for k, v in result.seconds.items()},
            "wall_seconds": round(result.wall_seconds, 3),
            "first_batch_seconds": round(result.first_batch_seconds or 0.0, 3),
            "images_per_second": {k: (round(v, 2) if v else None) for k, v in rates.items()},
            "model_alone_images_per_second": round(alone, 2) if alone else None,
            "decode_one_core_images_per_second": round(self.decode_one_core, 1),
            "machine": machine_description(encoder),
            "model_name": MODEL_NAME,
            "model_source": str(encoder.source),
            "image_size": encoder.image_size,
            "index_backend": settings.VECTOR_INDEX_BACKEND,
        }

    def save(self, figures: dict) -> None:
        """Write the figures as JSON (``--output``) and store them in the benchmark history."""
        if self.opts["output"]:
            Path(self.opts["output"]).write_text(json.dumps(figures, indent=2))
            self.write(f"results written to {self.opts['output']}")
        if self.opts["no_save"]:
            return
        run = record_ingestion(figures)
        self.write(f"stored as benchmark run #{run.pk} (kind ingestion)")

    def clean_up(self) -> None:
        """Remove the assets, the model's index files, the model and the JPEGs."""
        if not hasattr(self, "model"):
            return
        ImageAsset.objects.filter(collection=COLLECTION).delete()
        for build in IndexBuild.objects.filter(model=self.model):
            Path(build.file_path).unlink(missing_ok=True)
        self.model.delete()
        shutil.rmtree(self.folder, ignore_errors=True)
