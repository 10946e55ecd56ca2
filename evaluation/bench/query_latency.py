"""The query latency benchmark: text→image and image→text searches over HTTP against
the portal served by gunicorn, phase by phase, plus the in-process checks.

``QueryLatencyBenchmark(opts, device, backend, seed, write, warn).run()`` returns the
results (the JSON that is stored and reported) and the model benchmarked;
``save_query_results`` writes them under ``STATE_DIR/bench/`` and into the history.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from embeddings.core.inference import resolve_backend
from embeddings.models import EmbeddingModel
from embeddings.services import register_model
from evaluation.bench.galleries import BENCH_COLLECTION, write_synthetic_gallery
from evaluation.bench.http_client import TOP_K, run_jobs
from evaluation.bench.inputs import photo_jpeg, query_texts
from evaluation.bench.machine import machine_description
from evaluation.bench.query_checks import (
    cache_lookup_cost,
    embedding_quality,
    load_encoder,
    query_breakdown,
    recall_comparison,
)
from evaluation.bench.records import record_query_latency
from evaluation.bench.servers import process_group_cpu_seconds, start_server, stop_server, warm_server
from evaluation.bench.stats import latency_summary, median
from search.models import ImageAsset

QUERY_CACHE_PATTERNS = ("*query-embedding:*", "*query-neighbours:*")


def inference_backend(name, device: str) -> str:
    """The inference backend ``name`` (default: SIGLIP_INFERENCE) resolves to on ``device``."""
    try:
        return resolve_backend(name or settings.SIGLIP_INFERENCE, device)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def parse_variants(specs: list[str], intra_op_threads, omp_threads) -> list[dict]:
    """The servers to run: ``LABEL:VAR=VALUE[,VAR=VALUE]`` each, or one "deployed" server."""
    base = {}
    if intra_op_threads:
        base["SIGLIP_THREADS"] = str(intra_op_threads)
    if omp_threads:
        base["OMP_NUM_THREADS"] = str(omp_threads)
    if not specs:
        return [{"label": "deployed", "env": base}]
    variants = []
    for spec in specs:
        label, _, assignments = spec.partition(":")
        env = dict(base)
        for assignment in filter(None, assignments.split(",")):
            name, sep, value = assignment.partition("=")
            if not sep or not name.strip():
                raise CommandError(f"--variant {spec!r}: expected LABEL:VAR=VALUE[,VAR=VALUE]")
            env[name.strip()] = value.strip()
        variants.append({"label": label.strip() or f"v{len(variants) + 1}", "env": env})
    if len({v["label"] for v in variants}) != len(variants):
        raise CommandError("--variant labels must differ")
    return variants


def phase_summary(name, concurrency, samples, elapsed, cpu_seconds=None) -> dict:
    """The figures of one phase of one server from its samples."""
    ok = [s for s in samples if s["status"] == 200]
    timing = lambda key: [s["timing"].get(key) for s in ok]  # noqa: E731
    http_overhead = [s["wall_ms"] - s["timing"]["view"] for s in ok if "view" in s["timing"]]
    caches = dict(Counter(s["timing"]["cache"] for s in ok if "cache" in s["timing"]))
    # Whether the index's neighbours came from the served version's result cache, and
    # the requests' latency either way.
    by_results: dict = {}
    for s in ok:
        if "results" in s["timing"]:
            by_results.setdefault(s["timing"]["results"], []).append(s["wall_ms"])
    return {
        "name": name,
        "concurrency": concurrency,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "statuses": sorted({s["status"] for s in samples}),
        "seconds": round(elapsed, 2),
        "qps": round(len(ok) / elapsed, 2) if elapsed else None,
        "latency_ms": latency_summary([s["wall_ms"] for s in ok]),
        "server_ms_p50": {key: median(timing(key)) for key in ("encode", "search", "serialise", "view")},
        "http_overhead_ms_p50": median(http_overhead),
        "query_cache": caches,
        "result_cache": {where: {"n": len(walls), "p50_ms": median(walls)}
                         for where, walls in sorted(by_results.items())},
        # CPU the gunicorn processes spent per answered query: unlike latency, barely
        # affected by other work on the machine; cores / this = the server's q/s ceiling.
        "server_cpu_ms_per_query": round(1000 * cpu_seconds / len(ok), 2) if cpu_seconds and ok else None,
    }


def save_query_results(results: dict, model, output, no_save: bool, write) -> None:
    """The results as JSON under ``STATE_DIR/bench/`` (and ``output``), and as a benchmark run."""
    out_dir = Path(settings.STATE_DIR) / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"query-latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(results, indent=2, default=str)
    path.write_text(text)
    write(f"Results: {path}")
    if output:
        Path(output).write_text(text)
        write(f"Results: {output}")
    if no_save:
        return
    run = record_query_latency(json.loads(text), model=model)
    write(f"Stored as benchmark run #{run.pk} (kind query-latency).")


class QueryLatencyBenchmark:
    """One run of the benchmark with the command's options ``opts``."""

    def __init__(self, opts: dict, device: str, backend: str, seed: str, write, warn):
        self.opts, self.device, self.backend, self.seed = opts, device, backend, seed
        self.write, self.warn = write, warn

    def run(self) -> tuple[dict, EmbeddingModel | None]:
        opts, seed = self.opts, self.seed
        results: dict = {
            "kind": "query-latency",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                "backend": self.backend, "device": self.device, "workers": opts["workers"],
                "threads": opts["threads"], "intra_op_threads": opts["intra_op_threads"],
                "omp_threads": opts["omp_threads"],
                "concurrency": opts["concurrency"], "k": TOP_K, "seed": seed,
                "index_backend": settings.VECTOR_INDEX_BACKEND,
            },
            "machine": machine_description(detail="host"),
        }
        if not opts["url"]:
            call_command("migrate", interactive=False, verbosity=0)
        previous_active = EmbeddingModel.active()
        model = None
        servers: list = []
        started_at = time.time()
        try:
            if opts["url"]:
                variants = [{"label": "target", "url": opts["url"].rstrip("/"), "env": {}}]
                model = previous_active
            else:
                variants = parse_variants(opts["variant"], opts["intra_op_threads"], opts["omp_threads"])
                self._check_database()
                model = self._prepare_model(opts["model"])
                results["gallery"] = write_synthetic_gallery(model, opts["images"], opts["captions"], self.write)
                self._clear_query_cache()
                self._warm_here(model)
                for variant in variants:
                    server = start_server(self.backend, opts["workers"], opts["threads"], variant["env"], self.write)
                    variant["url"], variant["pgid"] = server.url, server.pgid
                    servers.append(server)
            results["config"]["variants"] = [{k: v[k] for k in ("label", "url", "env")} for v in variants]
            if model is not None:
                results["config"]["model"] = {"name": model.name, "source": model.source,
                                              "dimension": model.dimension, "image_size": model.image_size}
            for variant in variants:
                warm_server(variant["url"])
            # A different photo per query: a repeated one would be answered from the result cache.
            jpegs = [photo_jpeg(i) for i in range(max(1, opts["image_queries"]))]
            self._run_phases(results, variants, jpegs, seed)
            for server in servers:
                stop_server(server)
            servers = []
            if model is not None and not opts["url"]:
                texts = query_texts(40, f"{seed}-breakdown")
                encoder = load_encoder(model, self.backend)
                results["breakdown"] = query_breakdown(model, encoder, jpegs[0], texts)
                results["query_cache_lookup"] = cache_lookup_cost(model, encoder, texts[0])
            if not opts["skip_quality"] and model is not None:
                results["quality"] = embedding_quality(model, self.backend, self.device)
                results["recall"] = recall_comparison(opts["recall_model"], self.backend, self.device)
        finally:
            for server in servers:
                stop_server(server)
            if previous_active is not None and model is not None and previous_active.pk != model.pk:
                previous_active.activate()
        results["duration_s"] = round(time.time() - started_at, 1)
        return results, model

    def _run_phases(self, results: dict, variants: list[dict], jpegs: list[bytes], seed) -> None:
        opts = self.opts
        image_jobs = [("image", jpeg) for jpeg in jpegs[: opts["image_queries"]]]
        jobs: dict[str, dict[str, list]] = {}
        for n, variant in enumerate(variants):
            # Each server gets its own queries: they share Redis, so the same text would be a
            # cache hit on the second one.
            texts = query_texts(opts["queries"] + opts["concurrent_queries"] + 2 * opts["page_queries"],
                                f"{seed}-{n}")
            paged = texts[len(texts) - 2 * opts["page_queries"]:]
            single = texts[: opts["queries"]]
            repeat = (single * (1 + opts["cached_queries"] // max(1, len(single))))[: opts["cached_queries"]]
            jobs[variant["label"]] = {
                "text": [("text", t) for t in single],
                "text_cached": [("text", t) for t in repeat],
                "text_concurrent": [("text", t) for t in texts[opts["queries"]:len(texts) - len(paged)]],
                # Pages 1 and 10 (results 1-10 and 91-100) of other queries, embeddings cached.
                "page_1": [("page", (t, 1)) for t in paged[::2]],
                "page_10": [("page", (t, 10)) for t in paged[1::2]],
                "image": image_jobs,
            }
        phases = (
            ("text", "text→image, 1 client", 1, 10),
            ("text_cached", "text→image, cached", 1, 10),
            ("text_concurrent", f"text→image, {opts['concurrency']} clients", opts["concurrency"], 40),
            ("image", "image→text+image, 1 client", 1, 5),
            ("page_1", "text→image page 1, 1 client", 1, 5),
            ("page_10", "text→image page 10, 1 client", 1, 5),
        )
        results["variants"] = {v["label"]: {} for v in variants}
        for key, name, concurrency, block in phases:
            per_variant = {label: phase_jobs[key] for label, phase_jobs in jobs.items()}
            for label, summary in self._phase(name, variants, per_variant, concurrency, block).items():
                results["variants"][label][key] = summary
        first = results["variants"][variants[0]["label"]]
        results.update(first)

    def _phase(self, name, variants, jobs: dict, concurrency, block) -> dict:
        """Run each variant's ``jobs[label]``, ``block`` jobs at a time, the variants taking turns."""
        from tqdm import tqdm

        samples = {v["label"]: [] for v in variants}
        elapsed = {v["label"]: 0.0 for v in variants}
        cpu = {v["label"]: 0.0 if v.get("pgid") else None for v in variants}
        deadline = time.monotonic() + self.opts["max_seconds"]
        longest = max(len(j) for j in jobs.values())
        with tqdm(total=sum(len(j) for j in jobs.values()), desc=name, unit="q", file=sys.stderr) as bar:
            for start in range(0, longest, block):
                for variant in variants:
                    left = deadline - time.monotonic()
                    chunk = jobs[variant["label"]][start : start + block]
                    if left <= 0 or not chunk:
                        continue
                    cpu_before = process_group_cpu_seconds(variant.get("pgid"))
                    began = time.perf_counter()
                    samples[variant["label"]] += run_jobs(variant["url"], chunk, concurrency, left, bar)
                    elapsed[variant["label"]] += time.perf_counter() - began
                    cpu_after = process_group_cpu_seconds(variant.get("pgid"))
                    if cpu[variant["label"]] is not None and cpu_before is not None and cpu_after is not None:
                        cpu[variant["label"]] += cpu_after - cpu_before
        return {label: phase_summary(name, concurrency, samples[label], elapsed[label], cpu[label])
                for label in samples}

    def _check_database(self) -> None:
        if self.opts["allow_shared_db"]:
            return
        if ImageAsset.objects.exclude(collection=BENCH_COLLECTION).exists():
            raise CommandError(
                "This database holds assets other than the benchmark's. Run the benchmark in its own "
                "state folder (PORTAL_STATE_DIR=/tmp/bench python -m portal.localservices exec -- "
                "python manage.py bench_queries ...) or pass --allow-shared-db."
            )

    def _prepare_model(self, source):
        if not source:
            model = EmbeddingModel.active()
            if model is None:
                source = settings.SIGLIP_MODEL
            else:
                return model
        source = str(Path(source).resolve()) if Path(source).is_dir() else source
        existing = EmbeddingModel.objects.filter(source=source).first()
        if existing is not None:
            existing.activate()
            return existing
        self.write(f"Registering {source} …")
        name = f"bench {Path(source).name or source}"[:200]
        return register_model(source, name=name, kind=EmbeddingModel.Kind.RANDOM
                              if "random" in source else EmbeddingModel.Kind.PRETRAINED)

    def _clear_query_cache(self) -> None:
        """Drop cached query embeddings and neighbours of earlier runs from Redis, so the
        first phase misses."""
        try:
            import redis

            client = redis.Redis.from_url(settings.REDIS_URL)
            for pattern in QUERY_CACHE_PATTERNS:
                keys = list(client.scan_iter(match=pattern, count=1000))
                if keys:
                    client.delete(*keys)
        except Exception as exc:
            self.warn(f"could not clear the query cache: {exc}")

    def _warm_here(self, model) -> None:
        """Load the encoder once in this process: exports ONNX towers if the cache lacks them."""
        started = time.perf_counter()
        encoder = load_encoder(model, self.backend)
        encoder.encode_texts(["warm up"])
        encoder.encode_images([photo_jpeg(0)])
        self.write(f"Encoder ready ({self.backend}) in {time.perf_counter() - started:.1f} s")
