"""How soon an upload is searchable, what a sync writes for it, web workers' memory while
they swap index versions, search with deltas and tombstones, and a merge under searches.

    PORTAL_STATE_DIR=/tmp/bench-live python -m portal.localservices exec -- \\
        python manage.py bench_live_index --backend faiss-flat --n 30000
    ... bench_live_index --backend faiss-hnsw --n 1000000
    ... bench_live_index --backend pgvector --n 1000000 --phases uploads

See ``evaluation/bench/live_index.py`` for what each phase measures, and docs/scaling.md
for the figures. Run it in its own state folder: it fills the database with ``--n``
synthetic assets and activates a model of its own. The collection and the base index are
kept for the next run of the same size and backend. Results are printed and stored in the
benchmark history (kind ``live-index``) and as JSON under ``STATE_DIR/bench/``.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from evaluation.bench.live_index import PHASES, LiveIndexBenchmark, save_live_results
from search.tasks import merge_index_task, schedule_index_sync


class Command(BaseCommand):
    help = "Benchmark upload → searchable, bytes per sync, RSS during swaps, deltas against a merged index, merges."

    def add_arguments(self, parser):
        parser.add_argument("--backend", default=None, help="index backend (default: VECTOR_INDEX_BACKEND)")
        parser.add_argument("--params", default=None, help="JSON backend parameters (default: VECTOR_INDEX_PARAMS)")
        parser.add_argument("--n", type=int, default=30_000, help="vectors in the collection")
        parser.add_argument("--dim", type=int, default=768)
        parser.add_argument("--k", type=int, default=10)
        parser.add_argument("--uploads", type=int, default=30, help="uploads timed one after another")
        parser.add_argument("--upload-gap", type=float, default=0.5, help="seconds between two uploads")
        parser.add_argument("--queries", type=int, default=200, help="queries for latency and recall")
        parser.add_argument("--delta-share", type=float, default=0.01,
                            help="share of the rows added as deltas, and removed, before measuring search")
        parser.add_argument("--merge-baseline", type=float, default=10.0,
                            help="seconds of searches measured before the merge and after the swap")
        parser.add_argument("--phases", default=",".join(PHASES), help=f"of {', '.join(PHASES)}")
        parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (deployed: 2)")
        parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker (deployed: 4)")
        parser.add_argument("--clusters", type=int, default=4096)
        parser.add_argument("--spread", type=float, default=0.75)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--rebuild", action="store_true", help="build the base again even if one is kept")
        parser.add_argument("--output", help="also write the results JSON here")
        parser.add_argument("--no-store", action="store_true", help="do not store a benchmark run")
        parser.add_argument("--allow-shared-db", action="store_true",
                            help="run even though the database holds assets other than the benchmark's")

    def handle(self, *args, **opts):
        benchmark = LiveIndexBenchmark(opts, self.stdout.write, self.stderr.write, schedule_index_sync,
                                       lambda model_id, modality: merge_index_task.delay(model_id, modality))
        self.stdout.write(f"{benchmark.backend}: n={opts['n']:,} dim={opts['dim']} phases={opts['phases']}")
        results = benchmark.run()
        save_live_results(results, opts["output"], opts["no_store"], self.stdout.write, self.stderr.write)
