"""The live index benchmark: how soon an upload is searchable through the running web
server, what a sync writes for it, the web workers' memory while they swap versions,
search with deltas and tombstones against a merged index, and a merge under searches.

On a collection of ``n`` synthetic image vectors (``ClusteredSphere``, the index
benchmark's data) of a model of its own, with the portal's own index sync, Celery worker
and gunicorn server:

1. **upload → searchable**: a new asset's vector is stored (as the embedding task stores
   it, and scheduling the sync as it does) next to a sentinel asset already indexed, and
   the clock runs from the commit to the first answer of the web server's "similar images
   of the sentinel" that returns the new asset. Per upload: the sync's share (until its
   ``IndexBuild`` is committed), the bytes the version added, and the gunicorn workers'
   resident memory around the swap (sampled every 10 ms);
2. **segments**: 1 % of the rows added as new vectors and 1 % of the base's removed, written
   by one sync as a delta; single-query latency (p50, p95) and recall@k of that version, in
   this process, against the exact top-k;
3. **merge**: the deltas folded into a new base by a Celery worker (``merge_index_task``, the
   merge the thresholds make due; ``INDEX_MERGE_MIN_ROWS`` aside, so that small collections
   merge too) while a client searches the web server without a pause; its latency before,
   during and after,
   the workers' memory while they open the new base, then the merged version measured as
   in 2 (and, for an exact backend, its answers compared with the segmented ones).

``LiveIndexBenchmark(opts, write, warn).run()`` returns the figures (stored in the
history as kind ``live-index``, or as JSON under ``STATE_DIR/bench/`` when refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from celery import current_app
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction

from embeddings.models import Embedding, EmbeddingModel
from evaluation.bench.http_client import SearchClient
from evaluation.bench.index_scale import measure_search
from evaluation.bench.machine import machine_description
from evaluation.bench.records import record_live_index
from evaluation.bench.servers import start_server, stop_server
from evaluation.bench.stats import latency_summary, percentile
from evaluation.bench.synthetic_vectors import CHUNK, ClusteredSphere, vector_chunks
from search import asset_vectors, index_changes, index_merge, index_sync
from search.bulk_embedding import insert_vectors
from search.core.vector_index import get_backend
from search.core.vector_index.segment_files import Manifest, read_manifest
from search.core.vector_index.segments import MergePlan, plan_merge
from search.curation import ensure_collection
from search.models import ImageAsset, IndexBuild

LIVE_COLLECTION = "bench-live"
IMAGE = IndexBuild.Modality.IMAGE
ROW_CHUNK = 20_000
PHASES = ("uploads", "segments", "merge")


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def worker_pids(pgid: int) -> list[int]:
    """The gunicorn workers of a server's process group (its master excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pgid:
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry))
    return sorted(pids)


def maps_file(pid: int, name: str) -> bool:
    """Whether process ``pid`` has the file ``name`` mapped."""
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as fh:
            return any(line.rstrip().endswith(name) for line in fh)
    except OSError:
        return False


class RssSampler:
    """The resident memory of some processes, every ``interval`` seconds, in a thread."""

    def __init__(self, pids: list[int], interval: float = 0.01):
        self.pids, self.interval = pids, interval
        self.samples: list[tuple[float, int, int]] = []  # (time, pid, KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            now = time.monotonic()
            for pid in self.pids:
                kib = _rss_kib(pid)
                if kib is not None:
                    self.samples.append((now, pid, kib))
            self._stop.wait(self.interval)

    def window(self, start: float, stop: float) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for t, pid, kib in list(self.samples):
            if start <= t <= stop:
                out.setdefault(pid, []).append(kib)
        return out

    def swap_ratio(self, before: tuple[float, float], during: tuple[float, float]) -> dict:
        """Per worker: steady (median before), peak (max during) and their ratio; the worst."""
        steady, peak = self.window(*before), self.window(*during)
        rows = {pid: (statistics.median(steady[pid]), max(peak[pid])) for pid in peak if steady.get(pid)}
        ratios = {pid: p / s for pid, (s, p) in rows.items() if s}
        worst = max(ratios, key=ratios.get) if ratios else None
        return {"steady_mib": round(rows[worst][0] / 1024, 1) if worst else None,
                "peak_mib": round(rows[worst][1] / 1024, 1) if worst else None,
                "peak_over_steady": round(ratios[worst], 4) if worst else None}


class LiveIndexBenchmark:
    """One run with the command's options ``opts``. The caller gives the queueing (services
    queue no tasks): ``schedule_sync(model_id)`` queues an index sync after the commit, as the
    embedding task does; ``queue_merge(model_id, modality)`` queues the merge that is due and
    returns its Celery result."""

    def __init__(self, opts: dict, write, warn, schedule_sync, queue_merge):
        self.opts, self.write, self.warn = opts, write, warn
        self.schedule_sync, self.queue_merge = schedule_sync, queue_merge
        self.backend = opts["backend"] or settings.VECTOR_INDEX_BACKEND
        self.n, self.dim, self.k = opts["n"], opts["dim"], opts["k"]
        self.data = ClusteredSphere(self.dim, opts["clusters"], opts["spread"], opts["seed"])
        self.phases = [p.strip() for p in opts["phases"].split(",") if p.strip()]
        unknown = set(self.phases) - set(PHASES)
        if unknown:
            raise CommandError(f"--phases: unknown {sorted(unknown)}; known: {', '.join(PHASES)}")
        if opts["params"] is not None:
            try:
                self.params = json.loads(opts["params"])
            except ValueError as exc:
                raise CommandError(f"--params is not JSON: {exc}") from exc
        else:
            self.params = dict(settings.VECTOR_INDEX_PARAMS or {})
        self.env = {"VECTOR_INDEX_BACKEND": self.backend, "VECTOR_INDEX_PARAMS": json.dumps(self.params),
                    "OMP_WAIT_POLICY": "PASSIVE"}

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict:
        started = time.time()
        call_command("migrate", interactive=False, verbosity=0)
        self._check_database()
        settings.VECTOR_INDEX_BACKEND, settings.VECTOR_INDEX_PARAMS = self.backend, self.params
        results: dict = {
            "kind": "live-index", "backend": self.backend, "params": self.params, "n": self.n, "dim": self.dim,
            "k": self.k, "seed": self.opts["seed"], "collection": LIVE_COLLECTION,
            "machine": machine_description(detail="host"),
        }
        self.write(f"load average at the start: {results['machine'].get('load_average')}")
        model = self._model()
        self.rows = self._collection(model)
        results["base"] = self._base(model)
        server = worker = None
        try:
            server = start_server("torch", self.opts["workers"], self.opts["threads"], self.env, self.write)
            self.url, self.pgid = server.url, server.pgid
            self._warm()
            if "uploads" in self.phases:
                worker = self._start_worker()
                results["upload_to_searchable"] = self._uploads(model)
                self._stop_worker(worker)
                worker = None
            if "segments" in self.phases and index_sync.latest_version(model, IMAGE).manifest.base.table:
                self.warn("a table-backed backend has no segments to measure; skipping segments and merge")
            elif "segments" in self.phases:
                results["segments"], context = self._segments(model)
                if "merge" in self.phases:
                    results["merge"] = self._merge(model, context)
        finally:
            if worker is not None:
                self._stop_worker(worker)
            if server is not None:
                stop_server(server)
        results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results["duration_s"] = round(time.time() - started, 1)
        results["finished"] = datetime.now(timezone.utc).isoformat()
        return results

    def _check_database(self) -> None:
        if self.opts["allow_shared_db"]:
            return
        if ImageAsset.objects.exclude(collection=LIVE_COLLECTION).exists():
            raise CommandError(
                "This database holds assets other than the benchmark's. Run the benchmark in its own state folder "
                "(PORTAL_STATE_DIR=/tmp/bench-live python -m portal.localservices exec -- python manage.py "
                "bench_live_index ...) or pass --allow-shared-db.")

    def _model(self) -> EmbeddingModel:
        """The benchmark's model (no checkpoint: nothing is encoded), active."""
        model, _ = EmbeddingModel.objects.get_or_create(
            name=f"bench-live-{self.dim}",
            defaults={"source": "/nonexistent/bench-live", "kind": EmbeddingModel.Kind.RANDOM, "dimension": self.dim,
                      "image_size": 224})
        model.activate()
        return model

    def _collection(self, model) -> np.ndarray:
        """The asset id of each corpus row (row r has vector r of the data), stored once."""
        from tqdm import tqdm

        assets = ImageAsset.objects.filter(collection=LIVE_COLLECTION, original_name__startswith="row-")
        if assets.count() != self.n:
            if ImageAsset.objects.filter(collection=LIVE_COLLECTION).exists() or Embedding.objects.filter(
                    model=model).exists():
                self.write("Replacing the benchmark collection …")
                IndexBuild.objects.filter(model=model).delete()
                Embedding.objects.filter(model=model).delete()
                ImageAsset.objects.filter(collection=LIVE_COLLECTION).delete()
            ensure_collection(LIVE_COLLECTION)
            with tqdm(total=self.n, desc="collection", unit="vec", unit_scale=True, file=sys.stderr) as bar:
                for start, stop in vector_chunks(self.n, CHUNK):
                    vectors = self.data.chunk(start, stop)
                    for first in range(start, stop, ROW_CHUNK):
                        last = min(stop, first + ROW_CHUNK)
                        with transaction.atomic():
                            made = ImageAsset.objects.bulk_create(
                                [ImageAsset(**self._asset(f"row-{r:09d}")) for r in range(first, last)])
                            insert_vectors(model, "asset", [(a.pk, Embedding.pack(v)) for a, v in
                                                            zip(made, vectors[first - start: last - start])])
                        bar.update(last - first)
        ids = np.fromiter(assets.order_by("original_name").values_list("pk", flat=True), dtype=np.int64)
        self._restore(model, ids)
        return ids

    def _restore(self, model, ids: np.ndarray) -> None:
        """What an earlier run changed, undone: its uploads and added rows deleted, the rows it
        removed stored again, and the index folded back into one base."""
        extra = ImageAsset.objects.filter(collection=LIVE_COLLECTION).exclude(original_name__startswith="row-")
        changed = extra.exists()
        extra.delete()
        have = np.fromiter(Embedding.objects.filter(model=model, asset__isnull=False).values_list("asset_id", flat=True),
                           dtype=np.int64)
        missing = np.flatnonzero(~np.isin(ids, have))
        for start, stop in vector_chunks(self.n):
            rows = missing[(missing >= start) & (missing < stop)]
            if len(rows):
                vectors = self.data.chunk(start, stop)[rows - start]
                with transaction.atomic():
                    insert_vectors(model, "asset", [(int(ids[r]), Embedding.pack(v)) for r, v in zip(rows, vectors)])
        if not (changed or len(missing)) or index_sync.latest_build(model, IMAGE) is None:
            return
        self.write(f"Undoing an earlier run ({len(missing)} rows stored again), then one base again …")
        index_sync.sync_index(model, IMAGE)
        version = index_sync.latest_version(model, IMAGE)
        if version.manifest is not None and version.manifest.deltas:
            index_merge.merge_index(model, IMAGE, plan=MergePlan("base", ((0, len(version.manifest.segments)),),
                                                                 "the benchmark starts from one base"))

    @staticmethod
    def _asset(name: str) -> dict:
        return {"file": f"bench-live/{name}.jpg", "sha256": hashlib.sha256(name.encode()).hexdigest(),
                "original_name": name, "width": 640, "height": 480, "format": "JPEG", "collection": LIVE_COLLECTION,
                "status": ImageAsset.Status.EMBEDDED}

    def _base(self, model) -> dict:
        """A base version of the whole collection (built once; kept for later runs)."""
        build = index_sync.latest_build(model, IMAGE)
        if (build is not None and build.backend == self.backend and index_sync.is_manifest(build)
                and build.vector_count == self.n and not self.opts["rebuild"]):
            self.write(f"Reusing {build} ({build.vector_count} vectors)")
            return {"version": build.version, "built_seconds": None}
        began = time.perf_counter()
        if get_backend(self.backend).snapshot_files:
            self.write(f"Building a {self.backend} base of {self.n:,} vectors (the sync's own build) …")
            result = index_sync.sync_index(model, IMAGE, rebuild=True)
            build, written = result.build, result.bytes_written
        else:
            build, written = self._bulk_table(model)
        index_sync.sync_index(model, IndexBuild.Modality.CAPTION, rebuild=True)
        seconds = round(time.perf_counter() - began, 1)
        self.write(f"  built in {seconds} s, {written / 1e6:.1f} MB written")
        return {"version": build.version, "built_seconds": seconds, "bytes": written}

    def _bulk_table(self, model):
        """A table-backed index loaded in one go (pgvector copies the rows, then builds its
        graph once; a sync adds rows as they come), recorded as a base version."""
        self.write(f"Loading {self.n:,} vectors into a {self.backend} table in one bulk load …")
        cursor = index_changes.settled_position()
        index = index_sync._new_index(model, IMAGE)
        index.drop()
        index = index_sync._new_index(model, IMAGE)
        index.add(self.rows, self.data.chunk(0, self.n))
        number = index_sync.next_version(model, IMAGE)
        ref = index_sync.write_base(index_sync.index_dir(model, IMAGE), f"base-{number:06d}-bulk.vidx", index)
        manifest = Manifest(index.backend, index.dim, index.params, ref.live, (ref,), cursor.as_json())
        return index_sync.commit_version(model, IMAGE, number, manifest), ref.bytes

    # -- processes ------------------------------------------------------------------------------

    def _start_worker(self, **extra_env) -> subprocess.Popen:
        env = dict(os.environ, DJANGO_SETTINGS_MODULE="portal.settings", PORTAL_STATE_DIR=str(settings.STATE_DIR),
                   **self.env, **extra_env)
        log_path = Path(settings.STATE_DIR) / "bench" / "live-worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "celery", "-A", "portal", "worker", "--loglevel=WARNING", "--concurrency=2",
                   "--without-gossip", "--without-mingle", "-n", f"bench-live-{os.getpid()}@localhost"]
        self.write(f"Starting a Celery worker (--concurrency=2; log: {log_path})")
        proc = subprocess.Popen(command, cwd=settings.BASE_DIR, env=env, stdout=open(log_path, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not current_app.control.ping(destination=[f"bench-live-{os.getpid()}@localhost"], timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CommandError(f"the Celery worker did not start; see {log_path}")
        return proc

    @staticmethod
    def _stop_worker(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _similar(self, client: SearchClient, asset_id: int, k: int = 1) -> tuple[list[int], float]:
        """The ids of the similar images of ``asset_id`` the server answers, and the wall ms."""
        answer = client.request("/api/search/image/", json.dumps({"asset_id": int(asset_id), "k": k}).encode(),
                                "application/json")
        if answer["status"] != 200:
            raise CommandError(f"the server answered {answer['status']}: {answer['body'][:300]!r}")
        return [hit["asset"]["id"] for hit in json.loads(answer["body"])["images"]], answer["wall_ms"]

    def _warm(self) -> None:
        """Every worker has opened the index (a few rounds of concurrent searches)."""
        deadline = time.monotonic() + 600
        while True:
            try:
                client = SearchClient(self.url, timeout=600)
                self._similar(client, self.rows[0])
                client.close()
                break
            except (OSError, CommandError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        threads = [threading.Thread(target=self._search_some, args=(20, i)) for i in range(2 * self.opts["workers"])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _warm_all(self) -> None:
        """Concurrent searches, so that every web worker opens the newest version."""
        threads = [threading.Thread(target=self._search_some, args=(10, 100 + i)) for i in range(2 * self.opts["workers"])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _search_some(self, count: int, seed: int) -> None:
        client = SearchClient(self.url, timeout=600)
        rng = np.random.default_rng(seed)
        for asset in rng.choice(getattr(self, "live_rows", self.rows), count):
            self._similar(client, asset)
        client.close()

    # -- 1. upload -> searchable ---------------------------------------------------------------------

    def _uploads(self, model) -> dict:
        from tqdm import tqdm

        rng = np.random.default_rng(self.opts["seed"] + 1)
        client = SearchClient(self.url)
        samples = []
        pids = worker_pids(self.pgid)
        with RssSampler(pids) as rss, tqdm(total=self.opts["uploads"], desc="uploads", file=sys.stderr) as bar:
            time.sleep(1.0)
            for i in range(self.opts["uploads"]):
                sentinel = int(rng.choice(self.rows))
                vector = index_sync.stored_vectors(model, IMAGE, [sentinel])[0]
                vector = vector + 0.01 * rng.standard_normal(self.dim).astype(np.float32) / np.sqrt(self.dim)
                vector /= np.linalg.norm(vector)
                previous = index_sync.latest_build(model, IMAGE)
                with transaction.atomic():
                    asset = ImageAsset.objects.create(**self._asset(f"upload-{time.time_ns()}"))
                    asset_vectors.store_vectors(model, asset.pk, vector, [])
                    self.schedule_sync(model.pk)  # as the embedding task does, after the commit
                stored, stored_at = time.monotonic(), time.time()
                searches = 0
                while True:
                    ids, _ = self._similar(client, sentinel)
                    searches += 1
                    if ids and ids[0] == asset.pk:
                        break
                    if time.monotonic() - stored > 120:
                        raise CommandError(f"upload {asset.pk} was not searchable after 120 s")
                searchable = time.monotonic()
                build = index_sync.latest_build(model, IMAGE)
                samples.append({
                    "seconds": searchable - stored, "sync_seconds": max(0.0, build.created.timestamp() - stored_at),
                    "searches": searches,
                    "bytes": self._bytes_added(previous, build), "version": build.version,
                    "rss": rss.swap_ratio((stored - 1.0, stored), (stored, searchable + 0.3)),
                })
                bar.update(1)
                time.sleep(self.opts["upload_gap"])
        client.close()
        seconds = [s["seconds"] for s in samples]
        ratios = [s["rss"]["peak_over_steady"] for s in samples if s["rss"]["peak_over_steady"]]
        summary = {
            "uploads": len(samples),
            "seconds": latency_summary([1000 * s for s in seconds]),
            "p95_s": round(percentile(seconds, 95), 3),
            "sync_seconds_p50": round(statistics.median(s["sync_seconds"] for s in samples), 3),
            "bytes_per_upload": {"median": int(statistics.median(s["bytes"] for s in samples)),
                                 "max": max(s["bytes"] for s in samples)},
            "rss_peak_over_steady_max": round(max(ratios), 4) if ratios else None,
            "rss_steady_mib": samples[-1]["rss"]["steady_mib"],
            "samples": samples,
        }
        self.write(f"upload → searchable: p50 {summary['seconds']['p50']:.0f} ms, p95 {summary['p95_s'] * 1000:.0f} ms, "
                   f"max {summary['seconds']['max']:.0f} ms over {len(samples)} uploads; sync p50 "
                   f"{summary['sync_seconds_p50'] * 1000:.0f} ms; {summary['bytes_per_upload']['median']} bytes written "
                   f"per upload (max {summary['bytes_per_upload']['max']}); web worker RSS peak/steady "
                   f"{summary['rss_peak_over_steady_max']}")
        return summary

    @staticmethod
    def _bytes_added(previous: IndexBuild | None, build: IndexBuild) -> int:
        """Bytes of the files a version added to the one before it (its manifest included)."""
        path = Path(build.file_path)
        if not index_sync.is_manifest(build):
            return path.stat().st_size
        old = set(read_manifest(previous.file_path).files()) if previous is not None and index_sync.is_manifest(
            previous) else set()
        new = [name for name in read_manifest(path).files() if name not in old]
        return path.stat().st_size + sum((path.parent / name).stat().st_size for name in new)

    # -- 2. segments against the merged index ----------------------------------------------------------

    def _segments(self, model):
        share = self.opts["delta_share"]
        extra, removed = int(round(share * self.n)), int(round(share * self.n))
        self.write(f"Adding {extra:,} vectors and removing {removed:,} ({share:.0%} each), one sync …")
        rng = np.random.default_rng(self.opts["seed"] + 2)
        gone_rows = np.sort(rng.choice(self.n, removed, replace=False))
        start = (self.n // CHUNK) * CHUNK
        added_vectors = self.data.chunk(start, self.n + extra)[self.n - start:]
        with transaction.atomic():
            made = ImageAsset.objects.bulk_create([ImageAsset(**self._asset(f"added-{r:09d}")) for r in range(extra)])
            added_ids = np.asarray([a.pk for a in made], dtype=np.int64)
            for first in range(0, extra, ROW_CHUNK):
                insert_vectors(model, "asset", [(int(i), Embedding.pack(v)) for i, v in
                                                zip(added_ids[first:first + ROW_CHUNK], added_vectors[first:first + ROW_CHUNK])])
            for first in range(0, removed, ROW_CHUNK):
                Embedding.objects.filter(model=model, asset_id__in=self.rows[gone_rows[first:first + ROW_CHUNK]].tolist()).delete()
        began = time.perf_counter()
        synced = index_sync.sync_index(model, IMAGE)
        sync_seconds = time.perf_counter() - began
        gone = np.zeros(self.n, dtype=bool)
        gone[gone_rows] = True
        self.live_rows = self.rows[~gone]
        self._warm_all()  # the web workers open the version with the deltas
        queries = self.data.queries(self.opts["queries"])
        truth = self._truth(queries, gone_rows, added_ids, added_vectors)
        version = index_sync.open_version(synced.build, mapped=True)
        after_sync = measure_search(version, queries, truth, self.k, {})
        self.write(f"  sync of the {share:.0%}/{share:.0%} change: {sync_seconds:.2f} s, {synced.bytes_written / 1e6:.1f} MB; "
                   f"searched right after it: recall@{self.k} {after_sync[f'recall@{self.k}']}, p50 "
                   f"{after_sync['p50_ms']} ms, p95 {after_sync['p95_ms']} ms")
        # What the worker does next, before the deltas reach a base merge: fold small deltas
        # together and give a large one of an approximate backend a graph.
        delta_merge = None
        policy = replace(index_sync.merge_policy(), delta_fraction=float("inf"), tombstone_fraction=float("inf"))
        plan = plan_merge(version.manifest, policy)  # what it does short of a base merge
        if plan is not None and plan.kind == "deltas":
            delta_merge = index_merge.merge_index(model, IMAGE, plan=plan).as_dict()
            version = index_sync.open_version(index_sync.latest_build(model, IMAGE), mapped=True)
            self._warm_all()
        manifest = version.manifest
        figures = measure_search(version, queries, truth, self.k, {})
        found = np.stack([version.search(q, self.k)[0][0] for q in queries])
        out = {
            "added": extra, "removed": removed, "sync_seconds": round(sync_seconds, 3),
            "sync_bytes": synced.bytes_written, "search_after_sync": after_sync, "delta_merge": delta_merge,
            "segments": [{"kind": r.kind, "rows": r.rows, "live": r.live, "tombstones": r.tombstones,
                          "graph": bool(r.index_file)} for r in manifest.segments],
            "search": figures,
        }
        if delta_merge is not None:
            self.write(f"  the worker's delta merge ({delta_merge['reason']}): {delta_merge['seconds']} s; then recall@"
                       f"{self.k} {figures[f'recall@{self.k}']}, p50 {figures['p50_ms']} ms, p95 {figures['p95_ms']} ms")
        return out, {"queries": queries, "truth": truth, "found": found, "figures": figures,
                     "added_ids": added_ids, "index": version}

    def _truth(self, queries, gone_rows, added_ids, added_vectors) -> np.ndarray:
        """The exact top-k ids of the rows the index should hold."""
        best_scores = np.full((len(queries), self.k), -np.inf, dtype=np.float32)
        best_ids = np.full((len(queries), self.k), -1, dtype=np.int64)
        gone = np.zeros(self.n, dtype=bool)
        gone[gone_rows] = True

        def take(scores, ids):
            nonlocal best_scores, best_ids
            scores = np.concatenate([best_scores, scores], axis=1)
            ids = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
            best_scores, best_ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

        for start, stop in vector_chunks(self.n):
            keep = ~gone[start:stop]
            take((queries @ self.data.chunk(start, stop)[keep].T), self.rows[start:stop][keep])
        take(queries @ added_vectors.T, added_ids)
        return best_ids

    # -- 3. merge under searches ------------------------------------------------------------------------

    def _merge(self, model, context) -> dict:
        """The merge that is due, run by a Celery worker (its own process, as deployed) while
        a client searches the web server."""
        version = index_sync.latest_version(model, IMAGE)
        pids = worker_pids(self.pgid)
        latencies: list[tuple[float, float]] = []
        stop = threading.Event()

        def search_continuously():
            # A connection per search: each reaches whichever worker accepts it, so every
            # worker is asked (and opens the new version) as a stream of visitors would.
            rng = np.random.default_rng(self.opts["seed"] + 3)
            while not stop.is_set():
                client = SearchClient(self.url)
                began = time.monotonic()
                _, wall = self._similar(client, int(rng.choice(self.live_rows)), self.k)
                latencies.append((began, wall))
                client.close()

        current_app.control.purge()  # no merge left queued by the uploads
        worker = self._start_worker(INDEX_MERGE_MIN_ROWS="0")
        searcher = threading.Thread(target=search_continuously, daemon=True)
        try:
            with RssSampler(pids, interval=0.05) as rss:
                searcher.start()
                time.sleep(self.opts["merge_baseline"])
                self.write(f"A worker merges the {len(version.manifest.segments)} segments into a new base while a "
                           "client searches …")
                merge_start = time.monotonic()
                result = self.queue_merge(model.pk, IMAGE).get(timeout=3600)
                merge_end = time.monotonic()
                build = index_sync.latest_build(model, IMAGE)
                new_base = read_manifest(build.file_path).base.file
                deadline = time.monotonic() + 900
                while not all(maps_file(pid, new_base) for pid in pids) and time.monotonic() < deadline:
                    time.sleep(0.2)  # the web workers open the new base in the background
                swapped = time.monotonic()
                opened = all(maps_file(pid, new_base) for pid in pids)
                time.sleep(self.opts["merge_baseline"])
                stop.set()
                searcher.join()
                after_start = swapped
        finally:
            stop.set()
            self._stop_worker(worker)
        before = [w for t, w in latencies if t < merge_start]
        during = [w for t, w in latencies if merge_start <= t < merge_end]
        opening = [w for t, w in latencies if merge_end <= t < swapped]
        after = [w for t, w in latencies if t >= after_start]
        merged = index_sync.open_version(build, mapped=True)
        figures = measure_search(merged, context["queries"], context["truth"], self.k, {})
        found = np.stack([merged.search(q, self.k)[0][0] for q in context["queries"]])
        segmented = context["figures"]
        paired = paired_latency(context["index"], merged, context["queries"], self.k)
        out = {
            "kind": result["kind"], "reason": result["reason"], "skipped": result["skipped"],
            "seconds": result["seconds"], "bytes_written": result["bytes_written"],
            "swap_seconds": round(swapped - merge_end, 2) if opened else None,
            "search_ms": {"before": latency_summary(before), "during": latency_summary(during),
                          "opening": latency_summary(opening), "after": latency_summary(after)},
            "p95_during_over_before": round(percentile(during, 95) / percentile(before, 95), 3) if during and before else None,
            "rss": rss.swap_ratio((merge_start - self.opts["merge_baseline"], merge_start),
                                  (merge_end, swapped + 1.0)),
            "merged_search": figures,
            "paired_ms": paired,
            "p50_segments_over_merged": round(paired["segments"]["p50"] / paired["merged"]["p50"], 3),
            "recall_segments_minus_merged": round(segmented[f"recall@{self.k}"] - figures[f"recall@{self.k}"], 4),
            "identical_answers": round(float(np.mean(np.all(found == context["found"], axis=1))), 4),
        }
        self.write(f"  merge ({result['kind'] or result['skipped']}): {result['seconds']:.1f} s, "
                   f"{result['bytes_written'] / 1e6:.1f} MB; web workers on the new base "
                   f"{out['swap_seconds']} s later; search p95 before {out['search_ms']['before'].get('p95')} ms, "
                   f"during {out['search_ms']['during'].get('p95')} ms (×{out['p95_during_over_before']}); RSS peak/steady "
                   f"{out['rss']['peak_over_steady']}")
        self.write(f"  merged: recall@{self.k} {figures[f'recall@{self.k}']}, p50 {figures['p50_ms']} ms; timed in turns "
                   f"of 25 queries: with deltas p50 {paired['segments']['p50']} ms, merged {paired['merged']['p50']} ms "
                   f"(×{out['p50_segments_over_merged']}); recall {out['recall_segments_minus_merged']:+.4f}; "
                   f"identical answers {out['identical_answers']:.1%}")
        return out


def paired_latency(first, second, queries: np.ndarray, k: int, rounds: int = 3, block: int = 25) -> dict:
    """Single-query latency (ms) of two indices timed in turns, ``block`` queries each, so
    that the load of a shared machine falls on both alike while each searches with its own
    data in the caches, as a web process serving one version does."""
    for q in queries[: min(20, len(queries))]:
        first.search(q, k)
        second.search(q, k)
    times: dict[str, list[float]] = {"segments": [], "merged": []}
    for _ in range(rounds):
        for start in range(0, len(queries), block):
            for name, index in (("segments", first), ("merged", second)):
                for q in queries[start : start + block]:
                    began = time.perf_counter()
                    index.search(q, k)
                    times[name].append((time.perf_counter() - began) * 1000)
    return {name: {"p50": round(percentile(v, 50), 3), "p95": round(percentile(v, 95), 3)} for name, v in times.items()}


def save_live_results(results: dict, output, no_store: bool, write, warn) -> None:
    """The figures as JSON under ``STATE_DIR/bench/`` (and ``output``), and as a run in the history."""
    folder = Path(settings.STATE_DIR) / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=str)
    path = folder / f"live-index-{results['backend']}-{results['n']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(text)
    write(f"Results: {path}")
    if output:
        Path(output).write_text(text)
    if no_store:
        return
    try:
        run = record_live_index(json.loads(text))
        write(f"Stored as benchmark run #{run.pk} (kind live-index).")
    except Exception as exc:  # the figures are in the JSON file either way
        warn(f"could not store in the benchmark history ({exc})")
