"""Query latency benchmark: the search API over HTTP on gunicorn, as deployed.

    python -m portal.localservices exec -- python manage.py bench_queries --model DIR_OR_HUB_ID

What it does (see docs/performance.md for the figures and how to read them):

1. Gallery: ``--images`` image assets (default 31,000) with ``--captions``
   captions each (default 5, so 155,000) in the collection ``bench-synthetic``,
   and for each a synthetic unit vector, stored as the model's ``Embedding``
   rows and indexed by the normal index sync (``evaluation.bench.galleries``),
   so the index files and their loading and swapping by the web processes are
   the portal's own. Reused when already there.
2. The model is registered and activated; its encoder is loaded once here, so
   the ONNX export (if the backend needs one) is ready before the server starts.
3. gunicorn starts as deployed (``portal.wsgi``, ``--workers 2 --threads 4``)
   on a free loopback port and is warmed up; or ``--url`` targets one already
   running.
4. Phases, each bounded in count and time, all on loopback:
   text→image with one client (distinct queries, so the query cache misses),
   the same queries again (cache hits), text→image with ``--concurrency``
   clients, image→text+image with an uploaded 640×480 JPEG.
5. In-process breakdown of where a query's time goes, the cosine of the
   backend's embeddings against float32 torch, and (with a trained model, e.g.
   ``embeddings/demo_model``) Recall@K of both on the synthetic shapes test split.
6. Prints p50/p95/p99, q/s and the breakdowns; stores the run as a
   ``BenchmarkRun`` of kind ``query-latency`` (numbers in ``extra``) and writes
   the same JSON under ``STATE_DIR/bench/``.

Run it in its own state folder (``PORTAL_STATE_DIR=/tmp/bench``): it fills the
database with 31,000 synthetic assets and activates the benchmarked model. It
refuses a database holding other assets unless ``--allow-shared-db``.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from embeddings.core.siglip import default_device
from evaluation.bench.query_checks import compare_backends
from evaluation.bench.query_latency import QueryLatencyBenchmark, inference_backend, save_query_results
from evaluation.bench.reporting import print_backend_comparison, print_query_report


class Command(BaseCommand):
    help = "Benchmark text→image and image→text query latency over HTTP on gunicorn (loopback only)."

    def add_arguments(self, parser):
        parser.add_argument("--model", help="checkpoint directory or hub id (default: the active model)")
        parser.add_argument("--images", type=int, default=31_000, help="gallery images (default 31000)")
        parser.add_argument("--captions", type=int, default=5, help="captions per image (default 5)")
        parser.add_argument("--queries", type=int, default=300, help="text queries with one client")
        parser.add_argument("--cached-queries", type=int, default=100, help="repeated (cached) text queries")
        parser.add_argument("--concurrent-queries", type=int, default=400,
                            help="text queries spread over the concurrent clients")
        parser.add_argument("--concurrency", type=int, default=4, help="clients in the concurrent phase")
        parser.add_argument("--image-queries", type=int, default=40, help="image→text queries (640×480 JPEG)")
        parser.add_argument("--page-queries", type=int, default=20,
                            help="text queries asked for page 1 and (others) for page 10 of their results")
        parser.add_argument("--max-seconds", type=float, default=240.0, help="time limit of each phase")
        parser.add_argument("--url", help="benchmark this running server (http://127.0.0.1:PORT) instead")
        parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (deployed: 2)")
        parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker (deployed: 4)")
        parser.add_argument("--inference", default=None,
                            help="SIGLIP_INFERENCE for the server and the checks (default: the setting)")
        parser.add_argument("--intra-op-threads", type=int, default=None,
                            help="SIGLIP_THREADS for the server (default: its own default)")
        parser.add_argument("--omp-threads", type=int, default=None,
                            help="OMP_NUM_THREADS for the server (FAISS; default: unset, i.e. all cores)")
        parser.add_argument("--variant", action="append", default=[], metavar="LABEL:VAR=VALUE[,VAR=VALUE]",
                            help="run one server per variant with these environment settings (e.g. "
                                 "t1:SIGLIP_THREADS=1) at the same time, and interleave their queries in small "
                                 "blocks, so that they share the machine's load alike; repeatable")
        parser.add_argument("--recall-model", default=None,
                            help="trained checkpoint for the Recall@K check (default: embeddings/demo_model "
                                 "when present; 'none' skips it)")
        parser.add_argument("--compare-backends", action="store_true",
                            help="only time every inference backend's towers in this process (no server)")
        parser.add_argument("--skip-quality", action="store_true", help="skip the cosine and Recall checks")
        parser.add_argument("--seed", default=None, help="query seed (default: a new one per run)")
        parser.add_argument("--output", help="also write the results JSON here")
        parser.add_argument("--no-save", action="store_true", help="do not store a BenchmarkRun")
        parser.add_argument("--allow-shared-db", action="store_true",
                            help="run even though the database holds assets other than the benchmark's")

    def handle(self, *args, **opts):
        device = settings.SIGLIP_DEVICE or default_device()
        backend = inference_backend(opts["inference"], device)
        seed = opts["seed"] or uuid.uuid4().hex[:8]
        if opts["compare_backends"]:
            comparison = compare_backends(opts["model"] or settings.SIGLIP_MODEL, device, seed)
            print_backend_comparison(comparison, self.stdout.write)
            if opts["output"]:
                Path(opts["output"]).write_text(json.dumps(
                    {"source": comparison["source"], "backends": comparison["backends"]}, indent=2))
            return
        benchmark = QueryLatencyBenchmark(opts, device, backend, seed, self.stdout.write, self.stderr.write)
        results, model = benchmark.run()
        print_query_report(results, self.stdout.write)
        save_query_results(results, model, opts["output"], opts["no_save"], self.stdout.write)
