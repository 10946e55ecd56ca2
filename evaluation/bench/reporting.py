"""The benchmarks' printed tables: each function takes a benchmark's results and
``write``, the function that prints one line (a command's ``stdout.write``).
"""

from __future__ import annotations

import json

GIB = 1024**3


def print_query_report(results: dict, write) -> None:
    """The query latency benchmark: configuration, one row per phase and server, the checks."""
    w = write
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
            for key in ("text", "text_cached", "text_concurrent", "image", "page_1", "page_10") if phases.get(key)]
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
    for label, phases in results.get("variants", {}).items():
        first, tenth = phases.get("page_1"), phases.get("page_10")
        if first and tenth and first["latency_ms"].get("p50") and tenth["latency_ms"].get("p50"):
            w(f"{'[' + label + '] ' if several else ''}page 10 costs {tenth['latency_ms']['p50'] / first['latency_ms']['p50']:.2f}× "
              f"page 1 (p50 {tenth['latency_ms']['p50']:.1f} against {first['latency_ms']['p50']:.1f} ms)")
    w(f"\nTook {results['duration_s']} s")


def print_backend_comparison(comparison: dict, write) -> None:
    """The inference backends' tower timings and cosines (``bench_queries --compare-backends``)."""
    device = comparison["device"]
    write(f"\nTowers of {comparison['source']} on {device}; torch threads {comparison['torch_threads']}, "
          f"ONNX Runtime threads {comparison['onnx_threads']}; load average {comparison['load_average']}")
    write(f"{'backend':12s} {'text wall':>10s} {'text cpu':>9s} {'image wall':>11s} "
          f"{'image cpu':>10s} {'text cos min':>13s} {'image cos min':>14s}   (ms, p50)")
    for name, row in comparison["backends"].items():
        write(f"{name:12s} {row['text_wall']:10.1f} {row['text_cpu']:9.1f} {row['image_wall']:11.1f} "
              f"{row['image_cpu']:10.1f} {row['text_cosine_min']:13.5f} {row['image_cosine_min']:14.5f}")
    write("(cpu = process CPU time, all threads; the reference for the cosines is torch "
          f"{'bf16 on CUDA' if device.startswith('cuda') else 'float32'})")


def print_refine_study(study: dict, k: int, write) -> None:
    """Recall@k of each re-ranking code on the same PQ candidates (``bench_index --refine-study``)."""
    write(f"re-ranking codes, the same {k * study['k_factor']} PQ candidates per query (recall@{k}):")
    for name, value in study.items():
        if name != "k_factor":
            write(f"  {name:>14}: {value:.4f}")


def print_index_table(result: dict, sweep_name: str | None, write) -> None:
    """Build time and memory of an index, then recall@k and latency per swept setting."""
    mem = result["memory"]
    line = (
        f"build {result['build_seconds']:.1f} s (training {result['train_seconds']:.1f} s), "
        f"RSS growth {mem['rss_growth_bytes'] / GIB:.2f} GiB ({mem['bytes_per_vector']:.0f} B per vector; "
        f"peak {mem['peak_rss_growth_bytes'] / GIB:.2f} GiB while adding)"
    )
    if "table_bytes" in mem:
        line += f", table {mem['table_bytes'] / GIB:.2f} GiB, HNSW index {mem['index_bytes'] / GIB:.2f} GiB"
    write(line)
    k = result["k"]
    header = f"{(sweep_name or '-'):>12} | recall@{k} | p50 ms | p95 ms | mean ms"
    write(header)
    write("-" * len(header))
    for row in result["sweep"]:
        write(
            f"{str(row['value'] if row['value'] is not None else '-'):>12} | "
            f"{row[f'recall@{k}']:>9.4f} | {row['p50_ms']:>6.2f} | {row['p95_ms']:>6.2f} | {row['mean_ms']:>7.2f}"
        )


def print_ingestion(result, alone: float | None, decode_one_core: float, backend: str, write) -> None:
    """Busy seconds and images/s of each ingestion stage, end to end, and the model alone."""
    rates = result.images_per_second()
    write(
        f"\n{result.images} images, {len(result.failed)} failed, device {result.device}, "
        f"batch {result.batch_size}, {result.workers} decoding workers"
    )
    write(f"{'stage':>12} | busy s | images/s")
    write("-" * 34)
    for stage in ("read", "decode", "model", "store", "index"):
        rate = rates[stage]
        write(
            f"{stage:>12} | {result.seconds[stage]:>6.2f} | {rate:>8.1f}" if rate
            else f"{stage:>12} | {result.seconds[stage]:>6.2f} |        -"
        )
    write(f"{'end to end':>12} | {result.wall_seconds:>6.2f} | {rates['end_to_end']:>8.2f}")
    if result.first_batch_seconds is not None:
        after = result.images / max(1e-9, result.wall_seconds - result.first_batch_seconds)
        write(f"{'first batch':>12} | {result.first_batch_seconds:>6.2f} |"
              f"            (start-up; {after:.1f} images/s after it)")
    if alone:
        write(f"{'model alone':>12} |        | {alone:>8.2f}   (ready pixels, same batch size)")
    write(
        f"decode to uint8 224x224 (GPU path), one core: {decode_one_core:.0f} images/s; "
        f"14 workers of a 16-core GPU host: ~{14 * decode_one_core:.0f} images/s"
    )
    write(f"inference backend: {backend}")


def retrieval_table(run) -> str:
    """A finished retrieval run (``manage.py benchmark``): recall@K, mAP, ranks and latency per direction."""

    def pct(metrics, key):
        value = (metrics or {}).get(key)
        return "—" if value is None else f"{100 * value:.1f}"

    def num(value, digits=1):
        return "—" if value is None else f"{value:.{digits}f}"

    header = f"{'direction':<14}{'queries':>8}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mAP':>7}" \
             f"{'med.rank':>10}{'mean rank':>11}{'p50 ms':>9}{'p95 ms':>9}"
    lines = [
        f"Run {run.pk}: {run.dataset} {run.split}, {run.gallery_images} images / {run.gallery_captions} captions, "
        f"model {run.model_name}, index {run.index_backend}",
        header,
        "-" * len(header),
    ]
    for name, m, p50, p95 in (
        ("text → image", run.text_to_image, run.t2i_latency_p50_ms, run.t2i_latency_p95_ms),
        ("image → text", run.image_to_text, run.i2t_latency_p50_ms, run.i2t_latency_p95_ms),
    ):
        lines.append(
            f"{name:<14}{m.get('queries', 0):>8}{pct(m, 'recall@1'):>7}{pct(m, 'recall@5'):>7}"
            f"{pct(m, 'recall@10'):>7}{pct(m, 'mAP'):>7}{num(m.get('median_rank')):>10}"
            f"{num(m.get('mean_rank'), 2):>11}{num(p50):>9}{num(p95):>9}"
        )
    lines.append(f"Embedding: {num(run.images_per_second)} images/s, {num(run.captions_per_second)} captions/s "
                 f"on {run.machine.get('device', '?')} ({run.machine.get('cpu_count', '?')} CPUs).")
    return "\n".join(lines)
