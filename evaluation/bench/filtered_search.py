"""The filtered search benchmark: latency and recall@k of vector searches inside a
``Subset`` (what a text→image search with filters runs), per selectivity and per
strategy of the backend, on the synthetic clustered vectors of ``bench_index``.

Subsets: for each selectivity one drawn at random, and one made of whole clusters
(drawn at random until they hold the wanted share of the rows), the hard case for
a graph: a query's neighbourhood is then mostly outside the subset. The reference
for recall is the exact top-k over the subset's rows, computed in the same pass
over the generated rows that builds the index.

Strategies (the backend's switch points forced one way, ``auto`` as configured):
``faiss-flat`` scores the subset's rows one by one (``rows``) or scans with a
selector (``selector``); ``faiss-hnsw`` scores the subset exactly (``exact``) or
walks the graph with a selector (``graph``); ``faiss-ivfpq`` scores the subset
from its re-ranking codes (``exact``) or probes the lists (``lists``); ``pgvector``
filters with an SQL condition over a membership table (``sql``, the product's
form) or with the ids as a parameter (``ids``).

``plan_filter_benchmark`` checks the options, ``run_filter_benchmark`` measures,
``print_filter_table`` prints, ``save_filter_results`` stores the figures in the
history (kind ``index-scale``, stage ``manage.py bench_filters``; as JSON under
``STATE_DIR/benchmarks/`` when the database refuses them).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import CommandError

from evaluation.bench.machine import machine_description
from evaluation.bench.records import record_index_scale
from evaluation.bench.stats import percentile, recall_at_k
from evaluation.bench.synthetic_vectors import CHUNK, ClusteredSphere, vector_chunks
from evaluation.models import BenchmarkRun
from search.core.vector_index import Subset, create_index, get_backend, load_index
from search.index_sync import database_connection

SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)
STRATEGIES = {
    "faiss-flat": ("auto", "rows", "selector"),
    "faiss-hnsw": ("auto", "exact", "graph"),
    "faiss-ivfpq": ("auto", "exact", "lists"),
    "pgvector": ("sql", "ids"),
}
WARM_UP = 5


@dataclass
class SubsetCase:
    """One filter of the benchmark: its label, kind, wanted share and row ids."""

    label: str
    kind: str
    selectivity: float
    ids: np.ndarray  # sorted int64


@dataclass
class FilterBenchmarkPlan:
    backend: str
    params: dict
    strategies: tuple[str, ...]
    data: ClusteredSphere
    queries: np.ndarray
    subsets: list[SubsetCase]
    opts: dict


def cluster_of_rows(data: ClusteredSphere, n: int) -> np.ndarray:
    """The cluster each of the first ``n`` corpus rows was drawn from: the first draw
    ``ClusteredSphere`` makes for each chunk, replayed (cheap: no vectors)."""
    parts = []
    for start, stop in vector_chunks(n):
        rng = np.random.default_rng([data.seed, 1, start // CHUNK])
        parts.append(rng.choice(data.clusters, size=CHUNK, p=data.weights)[: stop - start])
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def draw_subsets(data: ClusteredSphere, n: int, selectivities, seed: int) -> list[SubsetCase]:
    """For each selectivity a random subset and one of whole clusters."""
    rng = np.random.default_rng([seed, 7])
    clusters = cluster_of_rows(data, n)
    sizes = np.bincount(clusters, minlength=data.clusters)
    cases = []
    for share in selectivities:
        size = max(1, round(share * n))
        cases.append(SubsetCase(f"random {share:.1%}", "random", share,
                                np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)))
        order = rng.permutation(data.clusters)
        taken = order[: int(np.searchsorted(np.cumsum(sizes[order]), size)) + 1]
        cases.append(SubsetCase(f"clusters {share:.1%}", "clusters", share,
                                np.flatnonzero(np.isin(clusters, taken)).astype(np.int64)))
    return cases


def plan_filter_benchmark(opts: dict) -> FilterBenchmarkPlan:
    """The backend, parameters, strategies, data, queries and subsets ``opts`` ask for."""
    backend = opts["backend"] or settings.VECTOR_INDEX_BACKEND
    cls = get_backend(backend)
    if backend not in STRATEGIES:
        raise CommandError(f"no filter strategies known for {backend!r}: {', '.join(STRATEGIES)}")
    try:
        params = json.loads(opts["params"]) if opts["params"] else {}
    except ValueError as exc:
        raise CommandError(f"--params is not JSON: {exc}") from exc
    strategies = tuple(s.strip() for s in opts["strategies"].split(",")) if opts["strategies"] else STRATEGIES[backend]
    unknown = sorted(set(strategies) - set(STRATEGIES[backend]))
    if unknown:
        raise CommandError(f"{unknown} are not strategies of {backend!r} ({', '.join(STRATEGIES[backend])})")
    n, k = opts["size"], opts["k"]
    try:
        selectivities = [float(s) / 100 for s in opts["selectivities"].split(",")]
    except ValueError as exc:
        raise CommandError("--selectivities takes percentages: 50,10,1,0.1") from exc
    if n < k or any(not 0 < s <= 1 for s in selectivities):
        raise CommandError("--size must be at least --k, and selectivities in (0, 100]")
    if opts["threads"]:
        import faiss

        faiss.omp_set_num_threads(opts["threads"])
    if backend == "pgvector":
        params = {"table": f"vecidx_bench_filters_{n}_{opts['dim']}_{opts['seed']}", **params}
    data = ClusteredSphere(opts["dim"], opts["clusters"], opts["spread"], opts["seed"])
    return FilterBenchmarkPlan(backend, cls.params_for_scope(params, "bench_filters"), strategies, data,
                               data.queries(opts["queries"]), draw_subsets(data, n, selectivities, opts["seed"]),
                               opts)


# --------------------------------------------------------------------------
# Building the index and the exact answers in one pass
# --------------------------------------------------------------------------


class _SubsetTopK:
    """The exact top-k of every query over each subset, kept up to date chunk by chunk."""

    def __init__(self, queries: np.ndarray, subsets: list[SubsetCase], k: int):
        self.queries, self.subsets, self.k = queries, subsets, k
        self.ids = [np.full((len(queries), k), -1, dtype=np.int64) for _ in subsets]
        self.scores = [np.full((len(queries), k), -np.inf, dtype=np.float32) for _ in subsets]

    def update(self, start: int, vectors: np.ndarray) -> None:
        scores = self.queries @ vectors.T
        for i, case in enumerate(self.subsets):
            lo, hi = np.searchsorted(case.ids, [start, start + len(vectors)])
            rows = case.ids[lo:hi] - start
            if not len(rows):
                continue
            part = scores[:, rows]
            ids = np.concatenate([self.ids[i], np.broadcast_to(rows + start, part.shape)], axis=1)
            both = np.concatenate([self.scores[i], part], axis=1)
            order = np.argsort(-both, axis=1, kind="stable")[:, : self.k]
            self.ids[i], self.scores[i] = np.take_along_axis(ids, order, 1), np.take_along_axis(both, order, 1)


def _build(plan: FilterBenchmarkPlan, truth: _SubsetTopK):
    """The index of the first ``size`` corpus rows (ids 0..size-1) and the seconds it took;
    ``truth`` is filled in the same pass. A file named by ``--index-file`` is reused
    (pgvector: the table with ``--keep-table``) instead of building again."""
    from tqdm import tqdm

    opts, backend, n = plan.opts, plan.backend, plan.opts["size"]
    reuse = _reusable(plan)
    index = reuse or create_index(backend, plan.data.dim, **plan.params)
    if backend == "pgvector" and reuse is None:
        index.drop()
    held = []  # pgvector: one bulk load at the end
    seconds = 0.0
    with tqdm(total=n, desc=f"{'exact top-k' if reuse else 'build ' + backend}", unit="vec",
              unit_scale=True, disable=None) as bar:
        for start, stop in vector_chunks(n):
            vectors = plan.data.chunk(start, stop)
            truth.update(start, vectors)
            if reuse is None:
                t0 = time.perf_counter()
                if backend == "pgvector":
                    held.append(vectors)
                else:
                    index.add(np.arange(start, stop, dtype=np.int64), vectors)
                seconds += time.perf_counter() - t0
            bar.update(stop - start)
    if held:
        t0 = time.perf_counter()
        index.add(np.arange(n, dtype=np.int64), np.concatenate(held))
        seconds += time.perf_counter() - t0
    if reuse is None and opts["index_file"] and backend != "pgvector":
        index.save(opts["index_file"])
    return index, seconds, reuse is not None


def _reusable(plan: FilterBenchmarkPlan):
    """A previously built index of the same rows, or None."""
    opts = plan.opts
    if plan.backend == "pgvector":
        if not opts["keep_table"]:
            return None
        index = create_index("pgvector", plan.data.dim, **plan.params)
        return index if index.count() == opts["size"] else None
    path = opts["index_file"]
    if not path or not os.path.exists(path):
        return None
    index = load_index(path)
    if index.backend != plan.backend or index.count() != opts["size"] or index.dim != plan.data.dim:
        raise CommandError(f"{path} holds another index ({index!r}); remove it or name another file")
    if plan.params:
        index.set_search_params(**{k: v for k, v in plan.params.items() if k in type(index).search_param_names})
    return index


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _strategy(index, name: str, n: int):
    """The index set to use one strategy for the duration of the block."""
    if index.backend == "faiss-flat" and name != "auto":
        index.gather_max_fraction = 1.0 if name == "rows" else 0.0
        try:
            yield
        finally:
            del index.gather_max_fraction
    elif index.backend in ("faiss-hnsw", "faiss-ivfpq") and name != "auto":
        before = index.params["exact_subset_max"]
        index.set_search_params(exact_subset_max=n if name == "exact" else 0)
        try:
            yield
        finally:
            index.set_search_params(exact_subset_max=before)
    else:
        yield


class _MembershipTable:
    """pgvector's SQL form: each subset's ids in a table ``(subset, id)``, the
    condition a sub-select of it, as a filter by collection or tag would be."""

    def __init__(self, index, subsets: list[SubsetCase]):
        self.conn = database_connection(index.params["alias"])
        self.name = f"{index.params['table']}_members"
        self.conn.execute(f'DROP TABLE IF EXISTS "{self.name}"')
        self.conn.execute(f'CREATE TABLE "{self.name}" (subset int NOT NULL, id bigint NOT NULL, '
                          f'PRIMARY KEY (subset, id))')
        with self.conn.cursor() as cur, cur.copy(f'COPY "{self.name}" (subset, id) FROM STDIN') as copy:
            for number, case in enumerate(subsets):
                for row_id in case.ids.tolist():
                    copy.write_row((number, row_id))
        self.conn.execute(f'ANALYZE "{self.name}"')

    def subset(self, number: int) -> Subset:
        return Subset(sql=f'id IN (SELECT id FROM "{self.name}" WHERE subset = %s)', sql_params=(number,))

    def drop(self) -> None:
        self.conn.execute(f'DROP TABLE IF EXISTS "{self.name}"')


def measure_filtered(index, queries: np.ndarray, subset: Subset | None, truth: np.ndarray, k: int) -> dict:
    """Recall@k against ``truth`` and single-query latency of searches inside ``subset``."""
    for q in queries[:WARM_UP]:
        index.search(q, k, subset)
    found = np.empty((len(queries), k), dtype=np.int64)
    latencies = np.empty(len(queries))
    for row, q in enumerate(queries):
        t0 = time.perf_counter()
        ids, _ = index.search(q, k, subset)
        latencies[row] = time.perf_counter() - t0
        found[row] = ids[0]
    return {
        f"recall@{k}": round(recall_at_k(found, truth), 4),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 3),
        "p95_ms": round(percentile(latencies, 95) * 1e3, 3),
        "mean_ms": round(float(latencies.mean()) * 1e3, 3),
        "short_queries": int(np.count_nonzero((found < 0).any(axis=1))),
    }


def run_filter_benchmark(plan: FilterBenchmarkPlan) -> tuple[dict, object]:
    """Build (or reuse) the index, then measure every subset with every strategy."""
    from tqdm import tqdm

    opts, n, k = plan.opts, plan.opts["size"], plan.opts["k"]
    machine = machine_description(detail="host")
    # First the unfiltered search, for comparison: its reference is the top-k over every row.
    every_row = SubsetCase("none (unfiltered)", "none", 1.0, np.arange(n, dtype=np.int64))
    truth = _SubsetTopK(plan.queries, [every_row, *plan.subsets], k)
    started = time.perf_counter()
    index, build_s, reused = _build(plan, truth)
    pass_s = time.perf_counter() - started
    rows = [{"subset": every_row.label, "kind": every_row.kind, "selectivity": 1.0, "rows": n, "strategy": "-",
             **measure_filtered(index, plan.queries, None, truth.ids[0], k)}]
    members = _MembershipTable(index, plan.subsets) if "sql" in plan.strategies else None
    try:
        steps = [(i, s) for i in range(len(plan.subsets)) for s in plan.strategies]
        for number, name in tqdm(steps, desc="filtered searches", disable=None):
            case = plan.subsets[number]
            subset = members.subset(number) if name == "sql" else Subset(case.ids)
            with _strategy(index, name, n):
                figures = measure_filtered(index, plan.queries, subset, truth.ids[number + 1], k)
            rows.append({"subset": case.label, "kind": case.kind, "selectivity": case.selectivity,
                         "rows": len(case.ids), "strategy": name, **figures})
    finally:
        if members is not None:
            members.drop()
    result = {
        "benchmark": "filtered-search",
        "backend": plan.backend,
        "params": index.params,
        "n": n,
        "dim": plan.data.dim,
        "k": k,
        "queries": len(plan.queries),
        "data": {"kind": "clustered-sphere", "clusters": opts["clusters"], "spread": opts["spread"],
                 "seed": opts["seed"]},
        "build_seconds": round(build_s, 2),
        "index_reused": reused,
        "ground_truth_seconds": round(pass_s - build_s, 2),
        "sweep": rows,
        "machine": machine,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "finished": datetime.now(UTC).isoformat(),
    }
    return result, index


# --------------------------------------------------------------------------
# Printing and storing
# --------------------------------------------------------------------------


def print_filter_table(result: dict, write) -> None:
    """One row per subset and strategy: rows kept, recall@k, p50 / p95 / mean latency."""
    k, machine = result["k"], result["machine"]
    write(f"{result['backend']}: {result['n']:,} rows, dim {result['dim']}, {result['queries']} single queries, "
          f"k={k}; {machine.get('cpu', '?')}, {machine.get('cpu_count')} cores")
    write(f"load average at start {machine.get('load_average')}, at the end {result['load_average_end']}")
    built = "reused" if result["index_reused"] else f"built in {result['build_seconds']:.0f} s"
    write(f"index {built}; parameters {json.dumps(result['params'], sort_keys=True)}")
    header = f"{'subset':>18} | {'rows':>9} | {'strategy':>8} | recall@{k} | p50 ms | p95 ms | mean ms | short"
    write(header)
    write("-" * len(header))
    previous = None
    for row in result["sweep"]:
        first = row["subset"] != previous
        previous = row["subset"]
        write(f"{row['subset'] if first else '':>18} | {format(row['rows'], ',') if first else '':>9} | "
              f"{row['strategy']:>8} | {row[f'recall@{k}']:>9.4f} | {row['p50_ms']:>6.2f} | {row['p95_ms']:>6.2f} | "
              f"{row['mean_ms']:>7.2f} | {row['short_queries']:>5}")
    write("(short: queries that got fewer than k hits)")


def save_filter_results(result: dict, write, warn) -> None:
    """Store ``result`` in the benchmark history; as JSON under ``STATE_DIR/benchmarks/`` if refused."""
    try:
        run = record_index_scale(result)
        BenchmarkRun.objects.filter(pk=run.pk).update(stage="manage.py bench_filters")
        write(f"stored as benchmark run {run.pk} (kind index-scale, filtered search)")
        return
    except Exception as exc:  # the figures are not lost when the database refuses them
        warn(f"could not store in the benchmark history ({exc}); writing JSON instead")
    folder = Path(settings.STATE_DIR) / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = folder / f"filtered-search-{result['backend']}-{result['n']}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    write(f"results written to {path}")
