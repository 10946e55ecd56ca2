"""Query latency benchmark: the search API over HTTP on gunicorn, as deployed.

    python -m portal.localservices exec -- python manage.py bench_queries --model DIR_OR_HUB_ID

What it does (see docs/performance.md for the figures and how to read them):

1. Gallery: ``--images`` image assets (default 31,000) with ``--captions``
   captions each (default 5, so 155,000) in the collection ``bench-synthetic``,
   and for each a synthetic unit vector written straight into the model's
   index files through the normal ``IndexBuild`` records (same file format,
   same loading and swapping by the web processes). No ``Embedding`` rows: the
   searches never read them, and 186,000 of them would add half a gigabyte to
   PostgreSQL for nothing. Reused when already there.
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

import hashlib
import http.client
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from PIL import Image, ImageDraw, ImageFilter

BENCH_COLLECTION = "bench-synthetic"
QUERY_CACHE_PATTERNS = ("*query-embedding:*", "*query-neighbours:*")
TOP_K = 10

_SUBJECTS = ("a man", "a woman", "two children", "a dog", "a black cat", "an old car", "a red bus",
             "a surfer", "a cyclist", "three horses", "a small boat", "a chef", "a girl", "a bird",
             "a tennis player", "a group of people", "a white truck", "a brown bear", "a skier", "a baby")
_ACTIONS = ("riding", "standing next to", "walking past", "sitting on", "jumping over", "looking at",
            "running along", "parked near", "lying on", "holding", "playing with", "waiting by")
_OBJECTS = ("a wave", "the beach", "a wooden table", "a busy street", "a snowy hill", "a green field",
            "a bowl of fruit", "the river", "a stone wall", "a kitchen counter", "a park bench",
            "the train station", "a lighthouse", "a plate of pasta", "a bicycle", "a sofa")
_TAILS = ("at sunset", "in the rain", "on a sunny day", "at night", "in the snow", "under a blue sky",
          "in a city", "near the sea", "in the morning", "with trees behind", "", "")


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def query_texts(n: int, seed) -> list[str]:
    """``n`` distinct caption-like queries."""
    rng = random.Random(f"bench-queries-{seed}")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        text = " ".join(filter(None, (rng.choice(_SUBJECTS), rng.choice(_ACTIONS), rng.choice(_OBJECTS),
                                      rng.choice(_TAILS))))
        if rng.random() < 0.5:
            text += f" number {rng.randrange(10_000)}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def photo_jpeg(seed: int, size=(640, 480), quality: int = 90) -> bytes:
    """A photo-like 640×480 JPEG: smooth colour fields, shapes, fine noise."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field, "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        w, h = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noise = rng.normal(0, 6, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, content_type) in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def percentiles(values) -> dict:
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(values):
        return {}
    return {
        "n": int(len(values)),
        "p50": round(float(np.percentile(values, 50)), 2),
        "p95": round(float(np.percentile(values, 95)), 2),
        "p99": round(float(np.percentile(values, 99)), 2),
        "mean": round(float(values.mean()), 2),
        "min": round(float(values.min()), 2),
        "max": round(float(values.max()), 2),
    }


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 2) if values else None


def parse_server_timing(header: str | None) -> dict:
    """``encode;dur=1.2, cache;desc="local"`` -> ``{"encode": 1.2, "cache": "local"}``."""
    out: dict = {}
    for metric in (header or "").split(","):
        name, *params = [p.strip() for p in metric.split(";")]
        if not name:
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur":
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
            elif key == "desc":
                out[name] = value.strip('"')
    return out


# --------------------------------------------------------------------------
# HTTP client (one keep-alive connection per client, loopback only)
# --------------------------------------------------------------------------


class Client:
    def __init__(self, base_url: str, timeout: float = 120.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not _is_loopback(parts.hostname or ""):
            raise CommandError(f"only http:// on a loopback address is benchmarked, not {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, path: str, body: bytes, content_type: str) -> dict:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.perf_counter()
            try:
                self.conn.request("POST", path, body=body, headers={"Content-Type": content_type,
                                                                    "Accept": "application/json"})
                response = self.conn.getresponse()
                payload = response.read()
            except (http.client.HTTPException, ConnectionError, OSError):
                self.close()
                if attempt:
                    raise
                continue
            wall = (time.perf_counter() - started) * 1000
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return {"status": response.status, "wall_ms": wall, "bytes": len(payload),
                    "timing": parse_server_timing(response.getheader("Server-Timing")), "body": payload}
        raise RuntimeError("unreachable")

    def text(self, query: str, k: int = TOP_K) -> dict:
        return self.request("/api/search/text/", json.dumps({"query": query, "k": k}).encode(), "application/json")

    def image(self, jpeg: bytes, k: int = TOP_K) -> dict:
        body, content_type = multipart({"k": str(k)}, {"image": ("photo.jpg", jpeg, "image/jpeg")})
        return self.request("/api/search/image/", body, content_type)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def process_group_cpu_seconds(pgid: int | None) -> float | None:
    """User + system CPU seconds of every live process in a process group (Linux /proc)."""
    if not pgid:
        return None
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


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

    # -- main ----------------------------------------------------------------

    def handle(self, *args, **opts):
        from embeddings.core.siglip import _default_device
        from embeddings.models import EmbeddingModel

        self.opts = opts
        self.device = settings.SIGLIP_DEVICE or _default_device()
        self.backend = self._backend(opts["inference"])
        seed = opts["seed"] or uuid.uuid4().hex[:8]
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
            "machine": self._machine(),
        }
        if opts["compare_backends"]:
            return self._compare_backends(opts["model"] or settings.SIGLIP_MODEL, seed)
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
                variants = self._variants()
                self._check_database()
                model = self._prepare_model(opts["model"])
                results["gallery"] = self._build_gallery(model, opts["images"], opts["captions"])
                self._clear_query_cache()
                self._warm_here(model)
                for variant in variants:
                    server, variant["url"] = self._start_server(variant["env"])
                    variant["pgid"] = server.pid  # its own session: the workers share this group
                    servers.append(server)
            results["config"]["variants"] = [{k: v[k] for k in ("label", "url", "env")} for v in variants]
            if model is not None:
                results["config"]["model"] = {"name": model.name, "source": model.source,
                                              "dimension": model.dimension, "image_size": model.image_size}
            for variant in variants:
                self._warm_server(variant["url"])
            # A different photo per query: a repeated one would be answered from the result cache.
            jpegs = [photo_jpeg(i) for i in range(max(1, opts["image_queries"]))]
            image_jobs = [("image", jpeg) for jpeg in jpegs[: opts["image_queries"]]]
            jobs: dict[str, dict[str, list]] = {}
            for n, variant in enumerate(variants):
                # Each server gets its own queries: they share Redis, so the same text would be a
                # cache hit on the second one.
                texts = query_texts(opts["queries"] + opts["concurrent_queries"], f"{seed}-{n}")
                single = texts[: opts["queries"]]
                repeat = (single * (1 + opts["cached_queries"] // max(1, len(single))))[: opts["cached_queries"]]
                jobs[variant["label"]] = {
                    "text": [("text", t) for t in single],
                    "text_cached": [("text", t) for t in repeat],
                    "text_concurrent": [("text", t) for t in texts[opts["queries"]:]],
                    "image": image_jobs,
                }
            phases = (
                ("text", "text→image, 1 client", 1, 10),
                ("text_cached", "text→image, cached", 1, 10),
                ("text_concurrent", f"text→image, {opts['concurrency']} clients", opts["concurrency"], 40),
                ("image", "image→text+image, 1 client", 1, 5),
            )
            results["variants"] = {v["label"]: {} for v in variants}
            for key, name, concurrency, block in phases:
                per_variant = {label: phase_jobs[key] for label, phase_jobs in jobs.items()}
                for label, summary in self._phase(name, variants, per_variant, concurrency, block).items():
                    results["variants"][label][key] = summary
            first = results["variants"][variants[0]["label"]]
            results.update(first)
            for server in servers:
                self._stop_server(server)
            servers = []
            if model is not None and not opts["url"]:
                texts = query_texts(40, f"{seed}-breakdown")
                results["breakdown"] = self._breakdown(model, jpegs[0], texts)
                results["query_cache_lookup"] = self._cache_lookup(model, texts[0])
            if not opts["skip_quality"] and model is not None:
                results["quality"] = self._quality(model)
                results["recall"] = self._recall(opts["recall_model"])
        finally:
            for server in servers:
                self._stop_server(server)
            if previous_active is not None and model is not None and previous_active.pk != model.pk:
                previous_active.activate()
        results["duration_s"] = round(time.time() - started_at, 1)
        self._report(results)
        self._store(results, model)

    # -- setup ---------------------------------------------------------------

    def _backend(self, name) -> str:
        from embeddings.core.inference import resolve_backend

        value = name or settings.SIGLIP_INFERENCE
        try:
            return resolve_backend(value, self.device)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc

    def _machine(self) -> dict:
        info = {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        }
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
                text = fh.read()
            for line in text.splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    info["cpu_features"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                           "amx_int8", "amx_bf16", "avx512_bf16"})
                    break
        except OSError:
            pass
        try:
            import onnxruntime
            import torch

            info["torch"] = torch.__version__
            info["onnxruntime"] = onnxruntime.__version__
            info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        except Exception:
            pass
        return info

    def _check_database(self) -> None:
        from search.models import ImageAsset

        if self.opts["allow_shared_db"]:
            return
        if ImageAsset.objects.exclude(collection=BENCH_COLLECTION).exists():
            raise CommandError(
                "This database holds assets other than the benchmark's. Run the benchmark in its own "
                "state folder (PORTAL_STATE_DIR=/tmp/bench python -m portal.localservices exec -- "
                "python manage.py bench_queries ...) or pass --allow-shared-db."
            )

    def _prepare_model(self, source):
        from embeddings.models import EmbeddingModel
        from embeddings.services import register_model

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
        self.stdout.write(f"Registering {source} …")
        name = f"bench {Path(source).name or source}"[:200]
        return register_model(source, name=name, kind=EmbeddingModel.Kind.RANDOM
                              if "random" in source else EmbeddingModel.Kind.PRETRAINED)

    def _build_gallery(self, model, n_images: int, per_image: int) -> dict:
        """Assets and captions in Postgres; synthetic unit vectors in the index files."""
        from tqdm import tqdm

        from search.index_sync import latest_build
        from search.models import Caption, ImageAsset, IndexBuild

        assets = ImageAsset.objects.filter(collection=BENCH_COLLECTION)
        have = assets.count()
        if have != n_images:
            if have:
                self.stdout.write(f"Replacing a gallery of {have} images …")
                assets.delete()
            chunk = 2000
            with tqdm(total=n_images, desc="gallery rows", unit="img", file=sys.stderr) as bar:
                for start in range(0, n_images, chunk):
                    stop = min(n_images, start + chunk)
                    with transaction.atomic():
                        rows = ImageAsset.objects.bulk_create([
                            ImageAsset(
                                file=f"bench/{i // 1000:03d}/{i:06d}.jpg",
                                sha256=hashlib.sha256(f"bench-image-{i}".encode()).hexdigest(),
                                original_name=f"bench-{i:06d}.jpg", width=640, height=480, format="JPEG",
                                collection=BENCH_COLLECTION, status=ImageAsset.Status.EMBEDDED,
                            ) for i in range(start, stop)
                        ])
                        captions = []
                        for asset, i in zip(rows, range(start, stop)):
                            for j, text in enumerate(query_texts(per_image, f"gallery-{i}")):
                                text = f"{text} ({j})"
                                captions.append(Caption(asset=asset, text=text, normalized_text=text.lower()))
                        Caption.objects.bulk_create(captions)
                    bar.update(stop - start)
        image_ids = np.fromiter(assets.values_list("pk", flat=True).order_by("pk"), dtype=np.int64)
        caption_ids = np.fromiter(
            Caption.objects.filter(asset__collection=BENCH_COLLECTION).values_list("pk", flat=True).order_by("pk"),
            dtype=np.int64)
        for modality, ids in ((IndexBuild.Modality.IMAGE, image_ids), (IndexBuild.Modality.CAPTION, caption_ids)):
            build = latest_build(model, modality)
            if build is not None and build.vector_count == len(ids) and Path(build.file_path).exists():
                continue
            self._write_index(model, modality, ids)
        return {"images": int(len(image_ids)), "captions": int(len(caption_ids)),
                "vectors": "synthetic unit vectors written through IndexBuild"}

    def _write_index(self, model, modality, ids: np.ndarray) -> None:
        from tqdm import tqdm

        from search.core.vector_index import create_index
        from search.models import IndexBuild

        index = create_index(settings.VECTOR_INDEX_BACKEND, model.dimension)
        rng = np.random.default_rng(1234 if modality == "image" else 5678)
        chunk = 20_000
        for start in tqdm(range(0, len(ids), chunk), desc=f"{modality} index", unit="chunk", file=sys.stderr):
            block = rng.standard_normal((min(chunk, len(ids) - start), model.dimension)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            index.add(ids[start : start + chunk], block)
        last = IndexBuild.objects.filter(model=model, modality=modality).order_by("-version").first()
        version = (last.version if last else 0) + 1
        directory = Path(settings.INDEX_DIR) / f"model-{model.pk}" / modality
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"v{version:06d}.index"
        checksum = index.save(path)
        IndexBuild.objects.create(
            model=model, modality=modality, backend=index.backend, params=index.params, version=version,
            vector_count=index.count(), file_path=str(path), checksum=checksum, status=IndexBuild.Status.READY,
        )

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
            self.stderr.write(f"could not clear the query cache: {exc}")

    def _encoder(self, model):
        from embeddings.core.siglip import get_encoder

        return get_encoder(model.source, device=settings.SIGLIP_DEVICE, backend=self.backend,
                           onnx_cache_dir=Path(settings.STATE_DIR) / "onnx").load()

    def _warm_here(self, model) -> None:
        """Load the encoder once in this process: exports ONNX towers if the cache lacks them."""
        started = time.perf_counter()
        encoder = self._encoder(model)
        encoder.encode_texts(["warm up"])
        encoder.encode_images([photo_jpeg(0)])
        self.stdout.write(f"Encoder ready ({self.backend}) in {time.perf_counter() - started:.1f} s")

    def _variants(self) -> list[dict]:
        base = {}
        if self.opts["intra_op_threads"]:
            base["SIGLIP_THREADS"] = str(self.opts["intra_op_threads"])
        if self.opts["omp_threads"]:
            base["OMP_NUM_THREADS"] = str(self.opts["omp_threads"])
        if not self.opts["variant"]:
            return [{"label": "deployed", "env": base}]
        variants = []
        for spec in self.opts["variant"]:
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

    def _start_server(self, extra_env: dict):
        port = _free_loopback_port()
        env = dict(os.environ)
        env.update({
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "PORTAL_STATE_DIR": str(settings.STATE_DIR),
            "SIGLIP_INFERENCE": self.backend,
            # The throttles stay on (their Redis round trip is part of a request) but cannot trip.
            "THROTTLE_SEARCH_ANON": "100000000/minute",
            "THROTTLE_SEARCH_USER": "100000000/minute",
        })
        env.update(extra_env)
        log_path = Path(settings.STATE_DIR) / "bench" / f"gunicorn-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "gunicorn", "portal.wsgi", "-c", "python:portal.gunicorn",
                   "--bind", f"127.0.0.1:{port}",
                   "--workers", str(self.opts["workers"]), "--threads", str(self.opts["threads"]),
                   "--timeout", "120"]
        settings_text = " ".join(f"{k}={v}" for k, v in extra_env.items())
        self.stdout.write(f"Starting {settings_text + ' ' if settings_text else ''}{' '.join(command[2:])}  "
                          f"(log: {log_path})")
        log = open(log_path, "ab")
        proc = subprocess.Popen(command, cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc._bench_log = log  # closed with the server
        return proc, f"http://127.0.0.1:{port}"

    def _stop_server(self, proc) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc._bench_log.close()

    def _warm_server(self, base_url: str) -> None:
        """Wait for the server, then load the encoder and indices in every worker."""
        deadline = time.monotonic() + 300
        client = Client(base_url)
        while True:
            try:
                if client.text("warm up")["status"] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CommandError(f"the server at {base_url} did not answer a search within 300 s")
            time.sleep(0.5)
        client.close()
        # Several rounds of concurrent requests reach every worker; stop once a round is fast.
        jpeg = photo_jpeg(99)
        words = query_texts(200, "warm-up")
        for round_number in range(20):
            jobs = [("text", words[(round_number * 12 + i) % len(words)]) for i in range(8)]
            jobs += [("image", jpeg)] * 4
            samples = self._run(base_url, jobs, 4, 120.0, progress=None)
            slowest = max(s["timing"].get("view", s["wall_ms"]) for s in samples)
            if round_number >= 2 and slowest < 1000:
                break

    # -- measuring -----------------------------------------------------------

    def _run(self, base_url, jobs, concurrency, max_seconds, progress) -> list[dict]:
        deadline = time.monotonic() + max_seconds
        lock = threading.Lock()
        position = [0]
        samples: list[dict] = []

        def worker():
            client = Client(base_url)
            try:
                while time.monotonic() < deadline:
                    with lock:
                        if position[0] >= len(jobs):
                            return
                        kind, payload = jobs[position[0]]
                        position[0] += 1
                    sample = client.text(payload) if kind == "text" else client.image(payload)
                    sample.pop("body", None)
                    with lock:
                        samples.append(sample)
                    if progress is not None:
                        progress.update(1)
            finally:
                client.close()

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(worker) for _ in range(concurrency)]
            for future in futures:
                future.result()
        return samples

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
                    samples[variant["label"]] += self._run(variant["url"], chunk, concurrency, left, bar)
                    elapsed[variant["label"]] += time.perf_counter() - began
                    cpu_after = process_group_cpu_seconds(variant.get("pgid"))
                    if cpu[variant["label"]] is not None and cpu_before is not None and cpu_after is not None:
                        cpu[variant["label"]] += cpu_after - cpu_before
        return {label: self._summary(name, concurrency, samples[label], elapsed[label], cpu[label])
                for label in samples}

    @staticmethod
    def _summary(name, concurrency, samples, elapsed, cpu_seconds=None) -> dict:
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
            "latency_ms": percentiles([s["wall_ms"] for s in ok]),
            "server_ms_p50": {key: median(timing(key)) for key in ("encode", "search", "serialise", "view")},
            "http_overhead_ms_p50": median(http_overhead),
            "query_cache": caches,
            "result_cache": {where: {"n": len(walls), "p50_ms": median(walls)}
                             for where, walls in sorted(by_results.items())},
            # CPU the gunicorn processes spent per answered query: unlike latency, barely
            # affected by other work on the machine; cores / this = the server's q/s ceiling.
            "server_cpu_ms_per_query": round(1000 * cpu_seconds / len(ok), 2) if cpu_seconds and ok else None,
        }

    def _breakdown(self, model, jpeg: bytes, texts: list[str]) -> dict:
        """Where a query's time goes, measured step by step in this process (one thread)."""
        from rest_framework.renderers import JSONRenderer

        from embeddings.core.siglip import load_image
        from search.api import serializers as s
        from search.models import IndexBuild
        from search.queries import CaptionHit, ImageHit, SearchResult, fetch_assets, fetch_captions, serving
        from search.serving import ServingCheck, loaded_indices
        from search.validation import inspect_image

        encoder = self._encoder(model)
        image_index = loaded_indices.get(model, IndexBuild.Modality.IMAGE)
        caption_index = loaded_indices.get(model, IndexBuild.Modality.CAPTION)
        steps: dict[str, list[float]] = {}
        current = serving.lookup()  # what each search's first row query checks it still serves

        def timed(name, fn):
            started = time.perf_counter()
            value = fn()
            steps.setdefault(name, []).append((time.perf_counter() - started) * 1000)
            return value

        for _ in range(2):  # warm caches of every step
            encoder.encode_texts(texts[:1])
        for text in texts:
            ids = timed("text.tokenize", lambda: encoder.token_ids([text]))
            vector = timed("text.tower", lambda: encoder.encode_token_ids(ids)[0])
            found, scores = timed("text.index_search", lambda: image_index.search(vector.reshape(1, -1), TOP_K))
            rows = timed("text.hydrate", lambda: fetch_assets([int(i) for i in found[0]], ServingCheck(current)))
            hits = [ImageHit(rows[int(i)], float(sc)) for i, sc in zip(found[0], scores[0]) if int(i) in rows]
            timed("text.serialise", lambda: JSONRenderer().render(s.search_response(
                SearchResult(model=model, images=hits), None, captions=False)))
        for _ in range(6):
            # The upload check decodes it (once) and hands the pixels on.
            checked = timed("image.validate", lambda: inspect_image(jpeg, keep_decoded=True))
            rgb = timed("image.to_rgb", lambda: load_image(checked.image))
            pixels = timed("image.preprocess", lambda: encoder.preprocessor([rgb]))
            vector = timed("image.tower", lambda: encoder.encode_pixels(pixels)[0])
            c_ids, c_scores = timed("image.caption_search", lambda: caption_index.search(vector.reshape(1, -1), TOP_K))
            i_ids, i_scores = timed("image.image_search", lambda: image_index.search(vector.reshape(1, -1), TOP_K))
            c_rows = timed("image.hydrate", lambda: fetch_captions([int(i) for i in c_ids[0]], ServingCheck(current)))
            i_rows = timed("image.hydrate", lambda: fetch_assets([int(i) for i in i_ids[0]]))
            captions = [CaptionHit(c_rows[int(i)], float(sc)) for i, sc in zip(c_ids[0], c_scores[0]) if int(i) in c_rows]
            images = [ImageHit(i_rows[int(i)], float(sc)) for i, sc in zip(i_ids[0], i_scores[0]) if int(i) in i_rows]
            timed("image.serialise", lambda: JSONRenderer().render(s.search_response(
                SearchResult(model=model, images=images, captions=captions), None, captions=True)))
        out = {}
        for name, values in steps.items():
            per_query = 2 if name == "image.hydrate" else 1
            merged = [sum(values[i : i + per_query]) for i in range(0, len(values), per_query)]
            out[name] = median(merged)
        out["image_index_vectors"] = image_index.count()
        out["caption_index_vectors"] = caption_index.count()
        return out

    def _cache_lookup(self, model, text: str) -> dict:
        """The query cache's own cost: a local hit and a shared (Redis) hit, the latter
        measured even where the server leaves the shared level off (on CUDA, by default)."""
        from django.test.utils import override_settings

        from search.serving import QueryEmbeddingCache, shared_level, write_behind

        encoder = self._encoder(model)
        local, shared = [], []
        used = shared_level(encoder)
        with override_settings(SEARCH_QUERY_CACHE_SHARED="on"):
            warm = QueryEmbeddingCache()
            warm.text_embedding(model, encoder, text)
            write_behind.flush()
            for _ in range(50):
                started = time.perf_counter()
                warm.text_embedding(model, encoder, text)
                local.append((time.perf_counter() - started) * 1000)
                fresh = QueryEmbeddingCache()  # empty local level: served by Redis
                started = time.perf_counter()
                _, where = fresh.text_embedding(model, encoder, text)
                shared.append((time.perf_counter() - started) * 1000)
        return {"local_hit_ms_p50": median(local), "shared_hit_ms_p50": median(shared), "shared_source": where,
                "shared_level_served": used}

    def _compare_backends(self, source, seed) -> None:
        """Time the text and image towers of every backend on one model, interleaved
        round by round so that a change in machine load hits them all alike."""
        from embeddings.core.inference import BACKENDS, default_threads
        from embeddings.core.siglip import SiglipEncoder

        source = str(Path(source).resolve()) if Path(source).is_dir() else source
        names = [b for b in BACKENDS if b == "torch" or self.device == "cpu"]
        encoders = {}
        for name in names:
            encoders[name] = SiglipEncoder(source, device=self.device, backend=name,
                                           onnx_cache_dir=Path(settings.STATE_DIR) / "onnx").load()
        texts = query_texts(40, seed)
        pixels = {name: e.preprocess([photo_jpeg(7)]) for name, e in encoders.items()}
        ids = encoders[names[0]].token_ids(texts)
        reference_t = encoders["torch"].encode_token_ids(ids)
        reference_i = encoders["torch"].encode_pixels(pixels["torch"])
        rows = {}
        for name, e in encoders.items():  # warm up (and export)
            e.encode_token_ids(ids[:1])
            e.encode_pixels(pixels[name])
            rows[name] = {"text_wall": [], "text_cpu": [], "image_wall": [], "image_cpu": []}
        from tqdm import tqdm

        rounds = 12
        for r in tqdm(range(rounds), desc="backends", unit="round", file=sys.stderr):
            for name, e in encoders.items():
                for _ in range(3):
                    row = ids[(r * 3 + _) % len(ids)][None]
                    wall, cpu = time.perf_counter(), time.process_time()
                    e.encode_token_ids(row)
                    rows[name]["text_wall"].append((time.perf_counter() - wall) * 1000)
                    rows[name]["text_cpu"].append((time.process_time() - cpu) * 1000)
                wall, cpu = time.perf_counter(), time.process_time()
                e.encode_pixels(pixels[name])
                rows[name]["image_wall"].append((time.perf_counter() - wall) * 1000)
                rows[name]["image_cpu"].append((time.process_time() - cpu) * 1000)
        import torch

        self.stdout.write(f"\nTowers of {source} on {self.device}; torch threads {torch.get_num_threads()}, "
                          f"ONNX Runtime threads {default_threads()}; load average {os.getloadavg()}")
        self.stdout.write(f"{'backend':12s} {'text wall':>10s} {'text cpu':>9s} {'image wall':>11s} "
                          f"{'image cpu':>10s} {'text cos min':>13s} {'image cos min':>14s}   (ms, p50)")
        results = {}
        for name, e in encoders.items():
            cos_t = float(np.min(np.sum(e.encode_token_ids(ids) * reference_t, axis=1)))
            cos_i = float(np.min(np.sum(e.encode_pixels(pixels[name]) * reference_i, axis=1)))
            stats = {k: median(v) for k, v in rows[name].items()}
            results[name] = dict(stats, text_cosine_min=round(cos_t, 5), image_cosine_min=round(cos_i, 5))
            self.stdout.write(f"{name:12s} {stats['text_wall']:10.1f} {stats['text_cpu']:9.1f} "
                              f"{stats['image_wall']:11.1f} {stats['image_cpu']:10.1f} {cos_t:13.5f} {cos_i:14.5f}")
        self.stdout.write("(cpu = process CPU time, all threads; the reference for the cosines is torch "
                          f"{'bf16 on CUDA' if self.device.startswith('cuda') else 'float32'})")
        if self.opts["output"]:
            Path(self.opts["output"]).write_text(json.dumps({"source": source, "backends": results}, indent=2))

    # -- quality -------------------------------------------------------------

    def _quality(self, model) -> dict:
        """Cosine between this backend's embeddings and float32 torch on the same inputs."""
        from embeddings.core.siglip import SiglipEncoder

        if self.backend == "torch" and not self.device.startswith("cuda"):
            return {"backend": self.backend, "note": "the reference itself"}
        texts = query_texts(64, "quality")
        images = [photo_jpeg(1000 + i) for i in range(16)]
        reference = SiglipEncoder(model.source, device="cpu", backend="torch").load()
        candidate = self._encoder(model)
        ref_t, got_t = reference.encode_texts(texts), candidate.encode_texts(texts)
        ref_i, got_i = reference.encode_images(images), candidate.encode_images(images)
        cos_t = np.sum(ref_t * got_t, axis=1)
        cos_i = np.sum(ref_i * got_i, axis=1)
        return {
            "backend": self.backend, "reference": "torch float32 on the CPU",
            "text_cosine_min": round(float(cos_t.min()), 5), "text_cosine_median": round(float(np.median(cos_t)), 5),
            "image_cosine_min": round(float(cos_i.min()), 5), "image_cosine_median": round(float(np.median(cos_i)), 5),
            "texts": len(texts), "images": len(images),
        }

    def _recall(self, source) -> dict | None:
        """Recall@K on the synthetic shapes test split: float32 torch vs this backend."""
        from embeddings.core.siglip import SiglipEncoder
        from evaluation.core import metrics

        if source is None:
            demo = Path(settings.BASE_DIR) / "embeddings" / "demo_model"
            if not (demo / "config.json").exists():
                return {"skipped": "no trained model: embeddings/demo_model is missing (or pass --recall-model)"}
            source = str(demo)
        if source.lower() == "none":
            return None
        from embeddings.core import synthetic

        items = [item for item in synthetic.plan(seed=0, n_train=0) if item.split == "test"]
        images, captions, mapping = [], [], []
        for n, item in enumerate(items):
            tag = f"0-{item.split}-{item.index}"
            images.append(synthetic.render(item.composition, 64, seed=tag))
            for text in synthetic.captions_for(item.composition, seed=tag):
                captions.append(text)
                mapping.append(n)
        mapping = np.asarray(mapping)
        out = {"model": source, "images": len(images), "captions": len(captions)}
        for name, backend in (("torch-fp32", "torch"), (self.backend, self.backend)):
            encoder = SiglipEncoder(source, device="cpu" if name == "torch-fp32" else self.device, backend=backend,
                                    onnx_cache_dir=Path(settings.STATE_DIR) / "onnx").load()
            found = metrics.retrieval_metrics(encoder.encode_images(images), encoder.encode_texts(captions), mapping)
            out[name] = {direction: {k: round(float(v), 4) for k, v in values.items() if k.startswith("recall")}
                         for direction, values in found.items()}
        worst = 0.0
        for direction in ("text_to_image", "image_to_text"):
            for key, value in out["torch-fp32"][direction].items():
                worst = max(worst, abs(value - out[self.backend][direction][key]))
        out["max_recall_difference_points"] = round(100 * worst, 2)  # recall is a fraction
        return out

    # -- output --------------------------------------------------------------

    def _report(self, results: dict) -> None:
        w = self.stdout.write
        config = results["config"]
        w("")
        w(f"Query latency — backend {config['backend']} on {config['device']}, gunicorn "
          f"{config['workers']} workers × {config['threads']} threads, k={config['k']}")
        for variant in config.get("variants", []):
            env = " ".join(f"{k}={v}" for k, v in variant["env"].items()) or "(defaults)"
            w(f"Server [{variant['label']}] {variant['url']}: {env}")
        if "gallery" in results:
            g = results["gallery"]
            w(f"Gallery: {g['images']} images, {g['captions']} captions ({g['vectors']})")
        w(f"Machine: {results['machine'].get('cpu', '?')}, {results['machine'].get('cpu_count')} cores, "
          f"load average at start {results['machine'].get('load_average')}")
        w("")
        w(f"{'phase':34s} {'n':>5s} {'p50':>8s} {'p95':>8s} {'p99':>8s} {'q/s':>7s} {'cpu/q':>6s}   server p50: "
          "encode / search / serialise / view; HTTP overhead")
        rows = [(label, key, phases[key]) for label, phases in results.get("variants", {}).items()
                for key in ("text", "text_cached", "text_concurrent", "image") if phases.get(key)]
        several = len(results.get("variants", {})) > 1
        for label, key, phase in rows:
            lat = phase["latency_ms"]
            srv = phase["server_ms_p50"]
            title = f"[{label}] {phase['name']}" if several else phase["name"]
            cpu = phase.get("server_cpu_ms_per_query") or 0
            w(f"{title:34s} {lat.get('n', 0):5d} {lat.get('p50', 0):8.1f} {lat.get('p95', 0):8.1f} "
              f"{lat.get('p99', 0):8.1f} {phase['qps'] or 0:7.1f} {cpu:6.1f}   {srv['encode']} / {srv['search']} / "
              f"{srv['serialise']} / {srv['view']}; {phase['http_overhead_ms_p50']}"
              + (f"  cache {phase['query_cache']}" if phase["query_cache"] else "")
              + ("  results " + ", ".join(f"{where} {r['n']} (p50 {r['p50_ms']})"
                                          for where, r in phase["result_cache"].items())
                 if phase.get("result_cache") else "")
              + (f"  ERRORS {phase['errors']} {phase['statuses']}" if phase["errors"] else ""))
        w("(times in ms; cpu/q: CPU time the gunicorn processes spent per query, whatever else ran)")
        if "query_cache_lookup" in results:
            c = results["query_cache_lookup"]
            w(f"\nQuery cache lookup in-process: local hit {c['local_hit_ms_p50']} ms, "
              f"shared (Redis) hit {c['shared_hit_ms_p50']} ms"
              + ("" if c.get("shared_level_served", True) else " (the servers leave the shared level off here)"))
        if "breakdown" in results:
            w("\nBreakdown (in-process, ms, p50):")
            b = results["breakdown"]
            w("  text→image: " + ", ".join(f"{k[5:]} {v}" for k, v in b.items() if k.startswith("text.")))
            w("  image→text+image: " + ", ".join(f"{k[6:]} {v}" for k, v in b.items() if k.startswith("image.")))
        if results.get("quality"):
            w(f"\nQuality vs float32: {json.dumps(results['quality'])}")
        if results.get("recall"):
            w(f"Recall@K: {json.dumps(results['recall'])}")
        w(f"\nTook {results['duration_s']} s")

    def _store(self, results: dict, model) -> None:
        out_dir = Path(settings.STATE_DIR) / "bench"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"query-latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
        text = json.dumps(results, indent=2, default=str)
        path.write_text(text)
        self.stdout.write(f"Results: {path}")
        if self.opts["output"]:
            Path(self.opts["output"]).write_text(text)
            self.stdout.write(f"Results: {self.opts['output']}")
        if self.opts["no_save"]:
            return
        from evaluation.records import record_query_latency

        run = record_query_latency(json.loads(text), model=model)
        self.stdout.write(f"Stored as benchmark run #{run.pk} (kind query-latency).")
