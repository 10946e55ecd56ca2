"""Recall / latency / build-time / memory benchmark of the vector index backends
on synthetic, clustered unit vectors.

    python manage.py bench_index --backend faiss-hnsw --n 1000000 --sweep ef_search=16,32,64,128
    python manage.py bench_index --backend faiss-ivfpq --n 2000000 --sweep nprobe=8,16,32,64
    python manage.py bench_index --backend pgvector --n 250000 --sweep ef_search=20,40,80,160
    python manage.py bench_index --backend milvus --n 1000000 --sweep ef=16,32,64,128

The data imitate image embeddings: a mixture of ``--clusters`` Gaussian
clusters on the unit sphere with uneven sizes, in an anisotropic space (the
variance of the directions decays like ``1 / (i + 10)`` in a random basis, so
a few hundred directions carry most of it, as with real embeddings). Queries
are fresh draws from the same mixture. The exact top-k (``faiss-flat``
semantics) is the reference for recall@k.

Latency is per single query (one query per call, as the search API issues
them), measured after a warm-up, reported as p50 / p95. Build time includes
training. Memory is the growth of this process's resident set while building
(for pgvector: the table and index sizes in PostgreSQL; for milvus on the local Milvus
Lite server: that server's resident set growth and data folder; the build includes
sealing and indexing the segments). Results are printed
as a table and stored in the benchmark history (kind ``index-scale``, through
``evaluation.bench.records``); if the database refuses them they are written as JSON
under ``STATE_DIR/benchmarks/`` instead.

Vectors are generated in chunks and never all held at once unless the backend
needs them, so ``--n`` is bounded by the index's memory, not the data's.
"""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand

from evaluation.bench.index_scale import plan_index_benchmark, run_index_benchmark, save_index_results
from evaluation.bench.reporting import print_index_table, print_refine_study


class Command(BaseCommand):
    help = "Benchmark a vector index backend: recall@k against exact search, latency, build time, memory."

    def add_arguments(self, parser):
        parser.add_argument("--backend", default=None, help="backend name (default: VECTOR_INDEX_BACKEND)")
        parser.add_argument("--n", type=int, default=200_000, help="corpus size")
        parser.add_argument("--dim", type=int, default=768)
        parser.add_argument("--queries", type=int, default=500)
        parser.add_argument("--k", type=int, default=10)
        parser.add_argument("--sweep", default="",
                            help="search parameters to sweep: NAME=V1,V2[;NAME2=W1,W2] (every combination)")
        parser.add_argument("--params", default=None,
                            help="JSON backend parameters (default: VECTOR_INDEX_PARAMS)")
        parser.add_argument("--clusters", type=int, default=4096)
        parser.add_argument("--spread", type=float, default=0.75,
                            help="cluster noise scale (0.75: rows have cosine ~0.8 with their centre)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--train-size", type=int, default=None,
                            help="rows to train IVF-PQ on explicitly before adding (default: its train_size)")
        parser.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
        parser.add_argument("--keep-table", action="store_true",
                            help="pgvector, milvus: keep the benchmark table or collection")
        parser.add_argument("--no-store", action="store_true", help="print only; store nothing")
        parser.add_argument("--output", help="also write the results JSON here (manage.py record_benchmark "
                                             "FILE adds it to another portal's history)")
        parser.add_argument("--refine-study", type=int, default=None, metavar="K_FACTOR",
                            help="faiss-ivfpq: build without re-ranking, then re-score the same k × K_FACTOR "
                                 "PQ candidates with each re-ranking code and report recall@k per code")

    def handle(self, *args, **opts):
        plan = plan_index_benchmark(opts)
        self.stdout.write(
            f"{plan.backend}: n={opts['n']:,} dim={opts['dim']} queries={len(plan.queries)} k={opts['k']} "
            f"clusters={opts['clusters']} spread={opts['spread']}"
        )
        result, index = run_index_benchmark(plan)
        if "refine_study" in result:
            print_refine_study(result["refine_study"], opts["k"], self.stdout.write)
        print_index_table(result, plan.sweep_name, self.stdout.write)
        if "server_rss_growth_bytes" in result["memory"]:
            memory = result["memory"]
            self.stdout.write(
                f"{result['engine']} server: RSS growth {memory['server_rss_growth_bytes'] / 2**30:.2f} GiB, "
                f"data folder {memory['server_data_bytes'] / 2**30:.2f} GiB"
            )
        if not index.snapshot_files and not opts["keep_table"]:
            index.drop()
        if opts["output"]:
            Path(opts["output"]).write_text(json.dumps(result, indent=2))
        if not opts["no_store"]:
            save_index_results(result, self.stdout.write, self.stderr.write)
        return None
