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

from django.core.management.base import BaseCommand

from evaluation.bench.ingestion import IngestionBenchmark
from evaluation.bench.reporting import print_ingestion


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
        benchmark = IngestionBenchmark(opts, self.stdout.write)
        benchmark.prepare()
        try:
            result = benchmark.ingest()
            print_ingestion(result, benchmark.alone, benchmark.decode_one_core,
                            getattr(benchmark.encoder, "backend", "torch"), self.stdout.write)
            benchmark.save(benchmark.figures(result))
        finally:
            if not opts["keep"]:
                benchmark.clean_up()
