"""The vector index benchmark: recall@k against exact search, per-query latency, build
time and memory of one index backend on synthetic, clustered unit vectors.

The data imitate image embeddings (``ClusteredSphere``); the exact top-k is the
reference for recall. ``plan_index_benchmark`` checks the options,
``run_index_benchmark`` measures, ``save_index_results`` stores the figures in the
history (or as JSON under ``STATE_DIR/benchmarks/`` when the database refuses them).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import CommandError

from evaluation.bench.machine import machine_description
from evaluation.bench.records import record_index_scale
from evaluation.bench.stats import percentile, recall_at_k
from evaluation.bench.synthetic_vectors import CHUNK, ClusteredSphere, exact_top_k, rss_bytes, vector_chunks
from search.core.vector_index import create_index, get_backend
from search.index_sync import database_connection

DEFAULT_SWEEPS = {
    "faiss-flat": None,
    "faiss-hnsw": "ef_search=16,32,64,128",
    "faiss-ivfpq": "nprobe=8,16,32,64",
    "pgvector": "ef_search=20,40,80,160",
    "milvus": "ef=16,32,64,128",
}


def parse_sweep(text: str | None) -> list[dict]:
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


@dataclass
class IndexBenchmarkPlan:
    backend: str
    params: dict
    sweep: list[dict]
    data: ClusteredSphere
    queries: np.ndarray
    opts: dict

    @property
    def sweep_name(self) -> str | None:
        return ", ".join(self.sweep[0]) or None


def plan_index_benchmark(opts: dict) -> IndexBenchmarkPlan:
    """The backend, parameters, sweep and data the command's options ``opts`` ask for."""
    backend = opts["backend"] or settings.VECTOR_INDEX_BACKEND
    cls = get_backend(backend)
    if opts["params"] is not None:
        try:
            params = json.loads(opts["params"])
        except ValueError as exc:
            raise CommandError(f"--params is not JSON: {exc}") from exc
    else:
        params = dict(getattr(settings, "VECTOR_INDEX_PARAMS", {}) or {})
    sweep = parse_sweep(opts["sweep"] or DEFAULT_SWEEPS.get(backend))
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
    if not cls.snapshot_files:  # a table or collection of its own (pgvector, milvus)
        params = cls.params_for_scope(params, f"bench_{n}_{dim}")
    if opts["refine_study"] is not None:
        if backend != "faiss-ivfpq":
            raise CommandError("--refine-study is for the faiss-ivfpq backend")
        params = {**params, "refine": "none"}
    data = ClusteredSphere(dim, opts["clusters"], opts["spread"], opts["seed"])
    return IndexBenchmarkPlan(backend, params, sweep, data, data.queries(opts["queries"]), opts)


def run_index_benchmark(plan: IndexBenchmarkPlan):
    """Measure; returns the results and the index (a pgvector table or milvus collection is
    still there)."""
    from tqdm import tqdm

    opts, backend, data, queries = plan.opts, plan.backend, plan.data, plan.queries
    n, dim, k = opts["n"], opts["dim"], opts["k"]
    started = time.perf_counter()
    with tqdm(total=n, desc="exact top-k", unit="vec", unit_scale=True, disable=None) as bar:
        truth = exact_top_k(data, n, queries, k, bar)
    truth_s = time.perf_counter() - started

    index = create_index(backend, dim, **plan.params)
    if not index.snapshot_files:
        index.drop()  # a fresh table or collection
        index = create_index(backend, dim, **plan.params)
    server = _milvus_server() if backend == "milvus" else None
    server_before = _process_bytes(server, "VmRSS")
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
        for start, stop in vector_chunks(n, add_chunk):
            index.add(np.arange(start, stop, dtype=np.int64), data.chunk(start, stop))
            bar.update(stop - start)
    if backend == "milvus":  # sealed and indexed before searching, as pgvector indexes after its bulk load
        index.flush()
        _wait_until_idle(server)  # Milvus Lite builds its segments' graphs in the background
    build_s = time.perf_counter() - build_started
    growth = max(0, rss_bytes() - rss_before)
    memory = {"rss_growth_bytes": growth, "bytes_per_vector": round(growth / n, 1),
              # includes the chunk of generated vectors being added
              "peak_rss_growth_bytes": max(0, rss_bytes("VmHWM") - rss_before)}
    if backend == "pgvector":
        memory.update(_pg_sizes(index))
    if server is not None:  # a local Milvus Lite server: it holds the rows, not this process
        memory.update({"server_rss_growth_bytes": max(0, _process_bytes(server, "VmRSS") - server_before),
                       "server_data_bytes": _folder_bytes(server["data_dir"])})

    rows = []
    for combo in tqdm(plan.sweep, desc="sweep", disable=None):
        if combo:
            index.set_search_params(**combo)
        rows.append(measure_search(index, queries, truth, k, combo))

    study = None
    if opts["refine_study"] is not None:
        study = refine_study(index, data, n, queries, truth, k, opts["refine_study"],
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
        **({"engine": index.server_version()} if backend == "milvus" else {}),
        **({"refine_study": study} if study is not None else {}),
        "machine": machine_description(detail="brief"),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    return result, index


def measure_search(index, queries, truth, k, combo: dict) -> dict:
    """Recall@k and single-query latency of ``index`` with the search parameters ``combo``."""
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
        "p50_ms": round(percentile(latencies, 50) * 1e3, 3),
        "p95_ms": round(percentile(latencies, 95) * 1e3, 3),
        "mean_ms": round(float(latencies.mean()) * 1e3, 3),
    }


def refine_study(index, data, n, queries, truth, k, k_factor, sample_size) -> dict:
    """Recall@k of the same PQ candidates re-scored with each re-ranking code."""
    from search.core.vector_index.faiss_ivfpq import decode_rerank, encode_rerank, train_rerank_codec

    candidates = index.candidates(queries, k * k_factor)
    wanted = np.unique(candidates[candidates >= 0])
    vectors = np.empty((len(wanted), data.dim), dtype=np.float32)
    for start, stop in vector_chunks(n):  # regenerate the candidates' rows
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
    return out


def _pg_sizes(index) -> dict:
    """Bytes of a pgvector index's table and of its HNSW index in PostgreSQL."""
    table = index.params["table"]
    heap, idx = database_connection(index.params["alias"]).execute(
        "SELECT pg_table_size(to_regclass(%s)), pg_indexes_size(to_regclass(%s))",
        [f'"{table}"', f'"{table}"'],
    ).fetchone()
    return {"table_bytes": int(heap), "index_bytes": int(idx)}


def _milvus_server() -> dict | None:
    """The local Milvus Lite server the milvus backend talks to (its pid and data folder),
    found by the port of ``MILVUS_URI``; None for any other server."""
    port = str(getattr(settings, "MILVUS_URI", "")).rstrip("/").rsplit(":", 1)[-1]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "milvus-lite" in args and "--port" in args and args[args.index("--port") + 1:][:1] == [port]:
            data_dir = args[args.index("--data-dir") + 1] if "--data-dir" in args else ""
            return {"pid": int(proc.name), "data_dir": data_dir}
    return None


def _process_bytes(server: dict | None, field: str) -> int:
    if server is None:
        return 0
    try:
        for line in Path(f"/proc/{server['pid']}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_seconds(server: dict) -> float:
    fields = Path(f"/proc/{server['pid']}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_until_idle(server: dict | None, quiet_s: float = 10.0, busy: float = 0.05,
                     limit_s: float = 7200.0) -> None:
    """Wait until a local Milvus Lite server has used under ``busy`` of a core for
    ``quiet_s``: it reports its indexes built while its background thread still compacts
    segments and builds their graphs, and searches meanwhile would scan unindexed rows."""
    if server is None:
        return
    deadline = time.monotonic() + limit_s
    last, last_cpu, quiet_since = time.monotonic(), _cpu_seconds(server), None
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now, cpu = time.monotonic(), _cpu_seconds(server)
        if (cpu - last_cpu) / (now - last) < busy:
            quiet_since = quiet_since or last
            if now - quiet_since >= quiet_s:
                return
        else:
            quiet_since = None
        last, last_cpu = now, cpu


def _folder_bytes(folder: str) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file()) if folder else 0


def save_index_results(result: dict, write, warn) -> None:
    """Store ``result`` in the benchmark history; as JSON under ``STATE_DIR/benchmarks/`` if refused."""
    try:
        run = record_index_scale(result)
        write(f"stored as benchmark run {run.pk} (kind index-scale)")
        return
    except Exception as exc:  # the figures are not lost when the database refuses them
        warn(f"could not store in the benchmark history ({exc}); writing JSON instead")
    folder = Path(settings.STATE_DIR) / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = folder / f"index-scale-{result['backend']}-{result['n']}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    write(f"results written to {path}")
