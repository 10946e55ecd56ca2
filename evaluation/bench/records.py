"""Benchmark figures -> ``BenchmarkRun`` rows of the history.

The benchmark commands (``bench_queries``, ``bench_ingest``, ``bench_index``) store their run
through these functions, and ``manage.py record_benchmark FILE`` stores a run
from the ``--output`` JSON of one made elsewhere (a GPU host, say, whose own
database is not the portal's).
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from evaluation.models import BenchmarkRun

QUERY_COLLECTION = "bench-synthetic"
INGEST_COLLECTION = "bench-ingest"


def kind_of(figures: dict) -> str:
    """Which benchmark wrote ``figures``; ValueError when neither."""
    if not isinstance(figures, dict):
        raise ValueError("the file does not hold a JSON object")
    if figures.get("kind") == BenchmarkRun.Kind.QUERY_LATENCY or {"config", "text"} <= set(figures):
        return BenchmarkRun.Kind.QUERY_LATENCY
    if {"busy_seconds", "images_per_second", "wall_seconds"} <= set(figures):
        return BenchmarkRun.Kind.INGESTION
    if {"backend", "sweep", "build_seconds", "ground_truth_seconds", "data"} <= set(figures):
        return BenchmarkRun.Kind.INDEX_SCALE
    if figures.get("kind") == BenchmarkRun.Kind.LIVE_INDEX:
        return BenchmarkRun.Kind.LIVE_INDEX
    raise ValueError("not the output of bench_queries, bench_ingest, bench_index or bench_live_index")


def _finished_run(kind: str, seconds, stage: str, **fields) -> BenchmarkRun:
    """A succeeded run of ``kind`` that took ``seconds`` and ended now."""
    now = timezone.now()
    return BenchmarkRun.objects.create(
        kind=kind, status=BenchmarkRun.Status.SUCCEEDED, progress=100, stage=stage,
        started=now - timedelta(seconds=float(seconds or 0)), finished=now, **fields,
    )


def record_query_latency(results: dict, model=None) -> BenchmarkRun:
    config = results.get("config") or {}
    described = config.get("model") or {}
    text_latency = (results.get("text") or {}).get("latency_ms") or {}
    image_latency = (results.get("image") or {}).get("latency_ms") or {}
    gallery = results.get("gallery") or {}
    return _finished_run(
        BenchmarkRun.Kind.QUERY_LATENCY, results.get("duration_s"), "manage.py bench_queries",
        dataset=QUERY_COLLECTION,
        dataset_path="",
        collection=QUERY_COLLECTION,
        gallery_images=gallery.get("images", 0),
        gallery_captions=gallery.get("captions", 0),
        model=model,
        model_name=model.name if model else described.get("name", ""),
        model_source=model.source if model else described.get("source", ""),
        index_backend=config.get("index_backend") or settings.VECTOR_INDEX_BACKEND,
        image_size=model.image_size if model else described.get("image_size"),
        t2i_latency_p50_ms=text_latency.get("p50"),
        t2i_latency_p95_ms=text_latency.get("p95"),
        i2t_latency_p50_ms=image_latency.get("p50"),
        i2t_latency_p95_ms=image_latency.get("p95"),
        machine=results.get("machine") or {},
        extra=results,
    )


def record_ingestion(figures: dict) -> BenchmarkRun:
    return _finished_run(
        BenchmarkRun.Kind.INGESTION, figures.get("wall_seconds"), "manage.py bench_ingest",
        dataset="synthetic",
        dataset_path=f"{INGEST_COLLECTION}: generated 640x480 JPEGs",
        collection=INGEST_COLLECTION,
        gallery_images=figures.get("images", 0),
        model_name=figures.get("model_name", ""),
        model_source=figures.get("model_source", ""),
        index_backend=figures.get("index_backend") or settings.VECTOR_INDEX_BACKEND,
        image_size=figures.get("image_size"),
        images_per_second=(figures.get("images_per_second") or {}).get("end_to_end"),
        machine=figures.get("machine") or {},
        extra=figures,
    )


def record_index_scale(result: dict) -> BenchmarkRun:
    return _finished_run(
        BenchmarkRun.Kind.INDEX_SCALE, result["build_seconds"] + result["ground_truth_seconds"],
        "manage.py bench_index",
        dataset="synthetic",
        dataset_path=f"clustered-sphere n={result['n']} dim={result['dim']} seed={result['data']['seed']}",
        gallery_images=result["n"],
        index_backend=result["backend"],
        index_params=result["params"],
        machine=result["machine"],
        extra=result,
    )


def record_live_index(result: dict) -> BenchmarkRun:
    return _finished_run(
        BenchmarkRun.Kind.LIVE_INDEX, result.get("duration_s"), "manage.py bench_live_index",
        dataset="synthetic",
        dataset_path=f"clustered-sphere n={result['n']} dim={result['dim']} seed={result['seed']}",
        collection=result.get("collection", ""),
        gallery_images=result["n"],
        index_backend=result["backend"],
        index_params=result.get("params") or {},
        machine=result.get("machine") or {},
        extra=result,
    )


def record_file_figures(figures: dict) -> BenchmarkRun:
    """Store the figures of a benchmark's ``--output`` JSON as a run."""
    kind = kind_of(figures)
    if kind == BenchmarkRun.Kind.QUERY_LATENCY:
        return record_query_latency(figures)
    if kind == BenchmarkRun.Kind.INDEX_SCALE:
        return record_index_scale(figures)
    if kind == BenchmarkRun.Kind.LIVE_INDEX:
        return record_live_index(figures)
    return record_ingestion(figures)
