"""Filtered search benchmark: recall@k and latency of searches inside a subset of
the rows, per selectivity and per strategy of the backend.

    python manage.py bench_filters --backend faiss-flat --size 31000
    python manage.py bench_filters --backend faiss-hnsw --size 1000000 --index-file /tmp/hnsw-1m.vidx
    python manage.py bench_filters --backend pgvector --size 200000

The rows are the clustered synthetic embeddings of ``bench_index`` (same
generator, options and seed). For each selectivity (``--selectivities``, in
percent) one subset is drawn at random and one is made of whole clusters; each is
searched with every strategy of the backend (``auto`` is the configured switch
point; the others force one side of it), one query per call, after a warm-up.
Recall@k is against the exact top-k over the subset's rows. The table is printed
and stored in the benchmark history (``evaluation.bench.filtered_search``).

``--index-file`` keeps a built FAISS index in that file and reuses it on the
next run with the same ``--size`` (the exact answers are still recomputed);
``--keep-table`` does the same for pgvector's table.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from evaluation.bench.filtered_search import (
    plan_filter_benchmark,
    print_filter_table,
    run_filter_benchmark,
    save_filter_results,
)


class Command(BaseCommand):
    help = "Benchmark filtered vector search: recall@k and latency per selectivity and strategy."

    def add_arguments(self, parser):
        parser.add_argument("--backend", default=None, help="backend name (default: VECTOR_INDEX_BACKEND)")
        parser.add_argument("--size", type=int, default=31_000, help="rows in the index")
        parser.add_argument("--dim", type=int, default=768)
        parser.add_argument("--queries", type=int, default=200)
        parser.add_argument("--k", type=int, default=10)
        parser.add_argument("--selectivities", default="50,10,1,0.1", help="percent of the rows each subset keeps")
        parser.add_argument("--strategies", default="",
                            help="comma-separated strategies to measure (default: all of the backend's)")
        parser.add_argument("--params", default=None, help="JSON backend parameters")
        parser.add_argument("--clusters", type=int, default=4096)
        parser.add_argument("--spread", type=float, default=0.75)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
        parser.add_argument("--index-file", default=None,
                            help="FAISS: reuse the index saved in this file, or save the one built to it")
        parser.add_argument("--keep-table", action="store_true",
                            help="pgvector: keep the table afterwards and reuse one kept before")
        parser.add_argument("--no-store", action="store_true", help="print only; store nothing")

    def handle(self, *args, **opts):
        plan = plan_filter_benchmark(opts)
        result, index = run_filter_benchmark(plan)
        print_filter_table(result, self.stdout.write)
        if plan.backend == "pgvector" and not opts["keep_table"]:
            index.drop()
        if not opts["no_store"]:
            save_filter_results(result, self.stdout.write, self.stderr.write)
