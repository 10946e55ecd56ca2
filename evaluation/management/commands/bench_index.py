"""Recall / latency / build-time / memory benchmark of the vector index backends
on synthetic, clustered unit vectors.

    python manage.py bench_index --backend faiss-hnsw --n 1000000 --sweep ef_search=16,32,64,128
    python manage.py bench_index --backend faiss-ivfpq --n 2000000 --sweep nprobe=8,16,32,64
    python manage.py bench_index --backend pgvector --n 250000 --sweep ef_search=20,40,80,160

The data imitate image embeddings: a mixture of ``--clusters`` Gaussian
clusters on the unit sphere with uneven sizes, in an anisotropic space (the
variance of the directions decays like ``1 / (i + 10)`` in a random basis, so
a few hundred directions carry most of it, as with real embeddings). Queries
are fresh draws from the same mixture. The exact top-k (``faiss-flat``
semantics) is the reference for recall@k.

Latency is per single query (one query per call, as the search API issues
them), measured after a warm-up, reported as p50 / p95. Build time includes
training. Memory is the growth of this process's resident set while building
(for pgvector: the table and index sizes in PostgreSQL). Results are printed
as a table and stored in the benchmark history (kind ``index-scale``, through
``evaluation.records``); if the database refuses them they are written as JSON
under ``STATE_DIR/benchmarks/`` instead.

Vectors are generated in chunks and never all held at once unless the backend
needs them, so ``--n`` is bounded by the index's memory, not the data's.
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

CHUNK = 50_000


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


class ClusteredSphere:
    """A reproducible mixture of anisotropic Gaussian clusters on the unit sphere.

    Row ``i`` of the corpus is always the same vector for a given seed,
    whatever the chunking, so corpus, training sample and ground truth can be
    regenerated instead of stored.
    """

    def __init__(self, dim: int, clusters: int, spread: float, seed: int):
        self.dim, self.clusters, self.spread, self.seed = dim, clusters, spread, seed
        rng = np.random.default_rng([seed, 0])
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        variance = 1.0 / (np.arange(dim) + 10.0)
        scale = np.sqrt(variance / variance.sum())
        self._mix = (basis * scale[None, :]).T.astype(np.float32)  # (dim, dim): h @ mix
        centres = rng.standard_normal((clusters, dim)).astype(np.float32) @ self._mix
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.weights = rng.dirichlet(np.full(clusters, 2.0))

    def _draw(self, n: int, stream: int, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, index])
        members = rng.choice(self.clusters, size=n, p=self.weights)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) @ self._mix
        x = self.centres[members] + np.float32(self.spread) * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Corpus rows [start, stop); ``start`` must be a multiple of CHUNK."""
        if start % CHUNK:
            raise ValueError("chunks start at multiples of CHUNK")
        parts = []
        for first in range(start, stop, CHUNK):
            parts.append(self._draw(CHUNK, 1, first // CHUNK)[: min(CHUNK, stop - first)])
        return np.concatenate(parts) if parts else np.empty((0, self.dim), np.float32)

    def queries(self, n: int) -> np.ndarray:
        return self._draw(n, 2, 0)


def chunks(n: int, size: int = CHUNK):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def exact_top_k(data: ClusteredSphere, n: int, queries: np.ndarray, k: int, progress=None) -> np.ndarray:
    """Exact inner-product top-k ids over the whole corpus, chunk by chunk."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start, stop in chunks(n):
        scores = queries @ data.chunk(start, stop).T
        kk = min(k, stop - start)
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
        cand_ids = np.concatenate([best_ids, part + start], axis=1)
        order = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(cand_scores, order, axis=1)
        best_ids = np.take_along_axis(cand_ids, order, axis=1)
        if progress is not None:
            progress.update(stop - start)
    return best_ids


def recall_at_k(got: np.ndarray, want: np.ndarray) -> float:
    k = want.shape[1]
    hits = [len(set(g[:k].tolist()) & set(w.tolist())) for g, w in zip(got, want)]
    return float(np.mean(hits) / k)


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (``VmHWM``: its peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _parse_sweep(text: str | None) -> list[dict]:
    """"nprobe=16,32;k_factor=8,16" -> every combination, as parameter dicts."""
    if not text:
        return [{}]
    combos: list[dict] = [{}]
    for part in text.split(";"):
        name, _, values = part.partition("=")
        name = name.strip()
        if not name or not values:
            raise CommandError("--sweep takes NAME=V1,V2[;NAME2=...], e.g. ef_search=16,32,64")
        parsed = []
        for value in values.split(","):
            value = value.strip()
            try:
                parsed.append(int(value))
            except ValueError:
                parsed.append(value)
        combos = [{**combo, name: value} for combo in combos for value in parsed]
    return combos


DEFAULT_SWEEPS = {
    "faiss-flat": None,
    "faiss-hnsw": "ef_search=16,32,64,128",
    "faiss-ivfpq": "nprobe=8,16,32,64",
    "pgvector": "ef_search=20,40,80,160",
}


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
        parser.add_argument("--keep-table", action="store_true", help="pgvector: keep the benchmark table")
        parser.add_argument("--no-store", action="store_true", help="print only; store nothing")
        parser.add_argument("--refine-study", type=int, default=None, metavar="K_FACTOR",
                            help="faiss-ivfpq: build without re-ranking, then re-score the same k × K_FACTOR "
                                 "PQ candidates with each re-ranking code and report recall@k per code")

    # -- main --------------------------------------------------------------------

    def handle(self, *args, **opts):
        from tqdm import tqdm

        from search.core.vector_index import create_index, get_backend

        backend = opts["backend"] or settings.VECTOR_INDEX_BACKEND
        cls = get_backend(backend)
        if opts["params"] is not None:
            try:
                params = json.loads(opts["params"])
            except ValueError as exc:
                raise CommandError(f"--params is not JSON: {exc}") from exc
        else:
            params = dict(getattr(settings, "VECTOR_INDEX_PARAMS", {}) or {})
        sweep_text = opts["sweep"] or DEFAULT_SWEEPS.get(backend)
        sweep = _parse_sweep(sweep_text)
        for name in sweep[0]:
            if name not in cls.search_param_names:
                raise CommandError(
                    f"{name!r} is not a search parameter of {backend!r} "
                    f"({', '.join(sorted(cls.search_param_names)) or 'none'})"
                )
        n, dim, k = opts["n"], opts["dim"], opts["k"]
        if n < k or n < 1:
            raise CommandError("--n must be at least --k")
        if opts["threads"]:
            import faiss

            faiss.omp_set_num_threads(opts["threads"])
        if backend == "pgvector":
            params = cls.params_for_scope(params, f"bench_{n}_{dim}")
        if opts["refine_study"] is not None:
            if backend != "faiss-ivfpq":
                raise CommandError("--refine-study is for the faiss-ivfpq backend")
            params = {**params, "refine": "none"}

        data = ClusteredSphere(dim, opts["clusters"], opts["spread"], opts["seed"])
        queries = data.queries(opts["queries"])
        self.stdout.write(
            f"{backend}: n={n:,} dim={dim} queries={len(queries)} k={k} "
            f"clusters={opts['clusters']} spread={opts['spread']}"
        )
        started = time.perf_counter()
        with tqdm(total=n, desc="exact top-k", unit="vec", unit_scale=True, disable=None) as bar:
            truth = exact_top_k(data, n, queries, k, bar)
        truth_s = time.perf_counter() - started

        index = create_index(backend, dim, **params)
        if backend == "pgvector":
            index.drop()  # a fresh table
            index = create_index(backend, dim, **params)
        rss_before = rss_bytes()
        build_started = time.perf_counter()
        train_s = 0.0
        if backend == "faiss-ivfpq":
            size = min(n, opts["train_size"] or index.params["train_size"])
            t0 = time.perf_counter()
            index.train(data.chunk(0, size))
            train_s = time.perf_counter() - t0
        add_chunk = n if backend == "pgvector" else CHUNK * 4  # pgvector: one bulk load
        with tqdm(total=n, desc=f"build {backend}", unit="vec", unit_scale=True, disable=None) as bar:
            for start, stop in chunks(n, add_chunk):
                index.add(np.arange(start, stop, dtype=np.int64), data.chunk(start, stop))
                bar.update(stop - start)
        build_s = time.perf_counter() - build_started
        growth = max(0, rss_bytes() - rss_before)
        memory = {"rss_growth_bytes": growth, "bytes_per_vector": round(growth / n, 1),
                  # includes the chunk of generated vectors being added
                  "peak_rss_growth_bytes": max(0, rss_bytes("VmHWM") - rss_before)}
        if backend == "pgvector":
            memory.update(self._pg_sizes(index))

        rows = []
        for combo in tqdm(sweep, desc="sweep", disable=None):
            if combo:
                index.set_search_params(**combo)
            rows.append(self._measure(index, queries, truth, k, combo))

        study = None
        if opts["refine_study"] is not None:
            study = self._refine_study(index, data, n, queries, truth, k, opts["refine_study"],
                                       min(n, opts["train_size"] or index.params["train_size"]))
        result = {
            "backend": backend,
            "params": index.params,
            "n": n,
            "dim": dim,
            "k": k,
            "queries": len(queries),
            "data": {"kind": "clustered-sphere", "clusters": opts["clusters"], "spread": opts["spread"],
                     "seed": opts["seed"]},
            "build_seconds": round(build_s, 2),
            "train_seconds": round(train_s, 2),
            "ground_truth_seconds": round(truth_s, 2),
            "memory": memory,
            "sweep": rows,
            **({"refine_study": study} if study is not None else {}),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "finished": datetime.now(timezone.utc).isoformat(),
        }
        self._print(result, ", ".join(sweep[0]) or None)
        if backend == "pgvector" and not opts["keep_table"]:
            index.drop()
        if not opts["no_store"]:
            self._store(result)
        return None

    # -- measuring -----------------------------------------------------------------

    def _measure(self, index, queries, truth, k, combo: dict) -> dict:
        for q in queries[: min(20, len(queries))]:  # warm-up: caches, prepared plans
            index.search(q, k)
        found = np.empty((len(queries), k), dtype=np.int64)
        latencies = np.empty(len(queries))
        for row, q in enumerate(queries):
            t0 = time.perf_counter()
            ids, _ = index.search(q, k)
            latencies[row] = time.perf_counter() - t0
            found[row] = ids[0]
        return {
            "search_params": combo,
            "value": ", ".join(str(v) for v in combo.values()) or None,
            f"recall@{k}": round(recall_at_k(found, truth), 4),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
            "p95_ms": round(float(np.percentile(latencies, 95)) * 1e3, 3),
            "mean_ms": round(float(latencies.mean()) * 1e3, 3),
        }

    def _refine_study(self, index, data, n, queries, truth, k, k_factor, sample_size) -> dict:
        """Recall@k of the same PQ candidates re-scored with each re-ranking code."""
        from search.core.vector_index.faiss_ivfpq import decode_rerank, encode_rerank, train_rerank_codec

        candidates = index.candidates(queries, k * k_factor)
        wanted = np.unique(candidates[candidates >= 0])
        vectors = np.empty((len(wanted), data.dim), dtype=np.float32)
        for start, stop in chunks(n):  # regenerate the candidates' rows
            inside = (wanted >= start) & (wanted < stop)
            if inside.any():
                vectors[inside] = data.chunk(start, stop)[wanted[inside] - start]
        sample = data.chunk(0, sample_size)
        sample_centroids, centroids = index.list_centroids(sample), index.list_centroids(vectors)
        rows = np.searchsorted(wanted, np.where(candidates >= 0, candidates, wanted[0]))

        def recall_with(decoded):
            scores = np.einsum("qcd,qd->qc", decoded[rows], queries)
            scores[candidates < 0] = -np.inf
            top = np.take_along_axis(candidates, np.argsort(-scores, axis=1)[:, :k], axis=1)
            return round(recall_at_k(top, truth), 4)

        out = {"k_factor": k_factor, "PQ codes only": round(recall_at_k(candidates[:, :k], truth), 4)}
        for kind in ("sq6", "sq8", "flat"):
            for residual in (False, True) if kind != "flat" else (False,):
                codec = train_rerank_codec(kind, sample, sample_centroids if residual else None)
                base = centroids if residual else None
                decoded = decode_rerank(codec, encode_rerank(codec, vectors, base), data.dim, base)
                out[f"{kind}{' residual' if residual else ''}"] = recall_with(decoded)
        self.stdout.write(f"re-ranking codes, the same {k * k_factor} PQ candidates per query (recall@{k}):")
        for name, value in out.items():
            if name != "k_factor":
                self.stdout.write(f"  {name:>14}: {value:.4f}")
        return out

    def _pg_sizes(self, index) -> dict:
        conn = index._connection()
        table = index.params["table"]
        heap, idx = conn.execute(
            "SELECT pg_table_size(to_regclass(%s)), pg_indexes_size(to_regclass(%s))",
            [f'"{table}"', f'"{table}"'],
        ).fetchone()
        return {"table_bytes": int(heap), "index_bytes": int(idx)}

    # -- output ----------------------------------------------------------------------

    def _print(self, result: dict, sweep_name: str | None) -> None:
        gib = 1024**3
        mem = result["memory"]
        line = (
            f"build {result['build_seconds']:.1f} s (training {result['train_seconds']:.1f} s), "
            f"RSS growth {mem['rss_growth_bytes'] / gib:.2f} GiB ({mem['bytes_per_vector']:.0f} B per vector; "
            f"peak {mem['peak_rss_growth_bytes'] / gib:.2f} GiB while adding)"
        )
        if "table_bytes" in mem:
            line += f", table {mem['table_bytes'] / gib:.2f} GiB, HNSW index {mem['index_bytes'] / gib:.2f} GiB"
        self.stdout.write(line)
        k = result["k"]
        header = f"{(sweep_name or '-'):>12} | recall@{k} | p50 ms | p95 ms | mean ms"
        self.stdout.write(header)
        self.stdout.write("-" * len(header))
        for row in result["sweep"]:
            self.stdout.write(
                f"{str(row['value'] if row['value'] is not None else '-'):>12} | "
                f"{row[f'recall@{k}']:>9.4f} | {row['p50_ms']:>6.2f} | {row['p95_ms']:>6.2f} | {row['mean_ms']:>7.2f}"
            )

    def _store(self, result: dict) -> None:
        from evaluation.records import record_index_scale

        try:
            run = record_index_scale(result)
            self.stdout.write(f"stored as benchmark run {run.pk} (kind index-scale)")
            return
        except Exception as exc:  # the figures are not lost when the database refuses them
            self.stderr.write(f"could not store in the benchmark history ({exc}); writing JSON instead")
        folder = Path(settings.STATE_DIR) / "benchmarks"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = folder / f"index-scale-{result['backend']}-{result['n']}-{stamp}.json"
        path.write_text(json.dumps(result, indent=2))
        self.stdout.write(f"results written to {path}")
