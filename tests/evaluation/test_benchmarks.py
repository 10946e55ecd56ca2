"""Benchmark jobs: launched through the API and run by a real worker, from the command line,
and failing; the index path's metrics equal the dense metrics over the gallery."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command

from embeddings.models import Embedding
from embeddings.services import encoder_for
from evaluation import services
from evaluation.core import metrics
from evaluation.datasets import DatasetError
from evaluation.models import BenchmarkRun
from search.core.vector_index import create_index
from search.models import Caption, ImageAsset
from tests.conftest import TEST_CAPTIONS
from tests.helpers import unit, wait_for, write_karpathy

CAPTIONS_PER_IMAGE = [2, 3, 5, 4, 2, 5, 3, 4]  # eight test images
WORDS = sorted(set(" ".join(TEST_CAPTIONS).lower().split()))


def caption(i: int, j: int) -> str:
    """Distinct captions from the tiny test tokenizer's own words (unknown words would all look alike)."""
    picks = [WORDS[(i * 7 + j * 3) % len(WORDS)], WORDS[(i * 5 + j * 11 + 1) % len(WORDS)],
             WORDS[(i * 3 + j * 13 + 2) % len(WORDS)], WORDS[(i * 11 + j * 2 + 5) % len(WORDS)]]
    return " ".join(picks)


def tiny_flickr(folder, n_images=len(CAPTIONS_PER_IMAGE)):
    entries = [("test", [caption(i, j) for j in range(CAPTIONS_PER_IMAGE[i])]) for i in range(n_images)]
    entries.append(("train", [caption(99, 0)]))
    texts = [c for _, caps in entries for c in caps]
    assert len(set(texts)) == len(texts)
    return write_karpathy(folder, entries)


def dense_metrics(model, collection):
    """The collection's metrics recomputed with the dense functions: image → text from the
    stored Embedding rows; text → image from the stored image vectors and each caption
    encoded on its own, as a portal text search encodes a query."""
    assets = list(ImageAsset.objects.filter(collection=collection).order_by("id"))
    position = {asset.pk: i for i, asset in enumerate(assets)}
    captions = list(Caption.objects.filter(asset__in=assets).order_by("id"))
    images = np.stack([Embedding.objects.get(model=model, asset=a).array for a in assets])
    texts = np.stack([Embedding.objects.get(model=model, caption=c).array for c in captions])
    mapping = np.array([position[c.asset_id] for c in captions])
    encoder = encoder_for(model)
    queries = np.stack([encoder.encode_texts([c.text])[0] for c in captions])
    return {
        "text_to_image": metrics.text_to_image(queries @ images.T, mapping),
        "image_to_text": metrics.retrieval_metrics(images, texts, mapping)["image_to_text"],
    }, len(assets), len(captions)


def assert_same_metrics(stored: dict, expected: dict):
    assert set(stored) == set(expected)
    for key, value in expected.items():
        assert stored[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.django_db(transaction=True)
def test_a_benchmark_launched_through_the_api_is_run_by_the_worker_with_the_metrics_of_the_stored_vectors(
    tiny_model, staff_client, celery_worker_process, tmp_path
):
    path = tiny_flickr(tmp_path / "flickr")
    response = staff_client.post("/api/benchmarks/", {"dataset": "auto", "path": str(path.parent)}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["status"], body["dataset"], body["split"], body["collection"]) == (
        "queued", "flickr30k", "test", "flickr30k-test")

    run = wait_for(
        lambda: BenchmarkRun.objects.filter(pk=body["id"], status__in=["succeeded", "failed"]).first(),
        timeout=240, message="the worker to finish the benchmark",
    )
    assert run.status == "succeeded", run.error
    assert (run.progress, run.stage, run.error) == (100, "done", "")
    assert run.started and run.finished and run.finished >= run.started

    expected, n_images, n_captions = dense_metrics(tiny_model, "flickr30k-test")
    assert (run.gallery_images, run.gallery_captions) == (n_images, n_captions) == (8, sum(CAPTIONS_PER_IMAGE))
    assert_same_metrics(run.text_to_image, expected["text_to_image"])
    assert_same_metrics(run.image_to_text, expected["image_to_text"])
    assert run.text_to_image["queries"] == n_captions and run.image_to_text["queries"] == n_images
    # The text queries were encoded afresh, as a portal search does; they stay close to the stored captions.
    assert run.extra["query_vs_stored_caption_max_abs_diff"] < 0.1

    assert (run.model_id, run.model_name, run.model_source) == (tiny_model.pk, tiny_model.name, tiny_model.source)
    assert (run.index_backend, run.index_params, run.image_size, run.text_length) == ("faiss-flat", {}, 32, 64)
    for value in (run.t2i_latency_p50_ms, run.t2i_latency_p95_ms, run.i2t_latency_p50_ms, run.i2t_latency_p95_ms):
        assert value > 0
    assert run.t2i_latency_p95_ms >= run.t2i_latency_p50_ms
    assert run.images_per_second > 0 and run.captions_per_second > 0
    assert run.machine["cpu_count"] and run.machine["torch"] and run.machine["device"] == "cpu"
    assert run.machine["inference"] == encoder_for(tiny_model).backend
    assert run.extra["embedded_in_run"]["assets"] == 8
    assert run.sample_grid.name == f"benchmarks/{run.pk}/samples.png"
    with default_storage.open(run.sample_grid.name, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    detail = staff_client.get(f"/api/benchmarks/{run.pk}/").json()
    assert detail["text_to_image"] == run.text_to_image
    assert detail["sample_grid_url"].endswith(f"/media/benchmarks/{run.pk}/samples.png")


@pytest.mark.django_db
def test_the_index_path_gives_the_dense_metrics_of_the_gallery_within_a_larger_index(monkeypatch):
    rng = np.random.default_rng(7)
    dim, n_images, n_captions = 16, 9, 23
    image_vectors = np.stack([unit(v) for v in rng.normal(size=(n_images, dim))])
    mapping = np.concatenate([np.arange(n_images), rng.integers(0, n_images, n_captions - n_images)])
    text_vectors = np.stack([unit(image_vectors[m] + rng.normal(scale=1.2, size=dim)) for m in mapping])
    image_ids = np.arange(100, 100 + n_images)
    caption_ids = np.arange(500, 500 + n_captions)

    image_index = create_index("faiss-flat", dim)
    image_index.add(image_ids, image_vectors)
    image_index.add(np.arange(1, 40), np.stack([unit(v) for v in rng.normal(size=(39, dim))]))  # other assets
    caption_index = create_index("faiss-flat", dim)
    caption_index.add(caption_ids, text_vectors)
    caption_index.add(np.arange(1, 60), np.stack([unit(v) for v in rng.normal(size=(59, dim))]))
    monkeypatch.setattr(services, "SEARCH_CHUNK_ELEMENTS", 100)  # several chunks

    t2i, text_tops = services.ranked_search(image_index, text_vectors, image_ids, image_ids[mapping], keep=[0, 5])
    relevant = [caption_ids[idx] for idx in metrics.captions_by_image(mapping, n_images)]
    i2t, _ = services.ranked_search(caption_index, image_vectors, caption_ids, relevant)

    assert_same_metrics(t2i, metrics.text_to_image(text_vectors @ image_vectors.T, mapping))
    assert_same_metrics(i2t, metrics.image_to_text(image_vectors @ text_vectors.T, mapping))
    assert 0 < t2i["recall@1"] < 1 and t2i["recall@10"] == 1.0  # a gallery under 10 images: all found
    best = image_ids[np.argsort(-(text_vectors[5] @ image_vectors.T))[:5]]
    assert text_tops[5][0].tolist() == best.tolist()


@pytest.mark.django_db
def test_the_benchmark_command_runs_in_process_and_prints_the_metrics(tiny_model, tmp_path, capsys):
    path = tiny_flickr(tmp_path / "flickr", n_images=4)
    call_command("benchmark", str(path), "--limit", "3", "--collection", "cli-run")
    out = capsys.readouterr().out
    run = BenchmarkRun.objects.get()
    assert run.status == "succeeded", run.error
    assert (run.gallery_images, run.limit, run.collection) == (3, 3, "cli-run")
    assert f"Run {run.pk}: flickr30k test, 3 images / 10 captions" in out
    r1 = f"{100 * run.text_to_image['recall@1']:.1f}"
    assert any(line.startswith("text → image") and r1 in line for line in out.splitlines())
    assert "image → text" in out and "images/s" in out
    calibration = run.extra["calibration"]  # the match probabilities of its 3 × 10 pairs, binned
    assert calibration["pairs"] == 30 and calibration["positives"] == 10 and 0.0 <= calibration["ece"] <= 1.0

    with pytest.raises(CommandError, match="no such file or folder"):
        call_command("benchmark", str(tmp_path / "nothing-here"))


@pytest.mark.django_db
def test_a_failed_run_is_stored_as_failed_with_its_error(tiny_model, staff_client, tmp_path):
    path = tiny_flickr(tmp_path / "flickr", n_images=3)
    response = staff_client.post("/api/benchmarks/", {"dataset": "flickr30k", "path": str(path)}, format="json")
    assert response.status_code == 201, response.content
    run_id = response.json()["id"]
    (path.parent / "flickr30k-images" / "img_0002.jpg").unlink()  # gone before the job starts

    with pytest.raises(DatasetError):
        services.run_benchmark(run_id)

    run = BenchmarkRun.objects.get(pk=run_id)
    assert run.status == "failed" and run.finished is not None
    assert "images[2] (img_0002.jpg)" in run.error and "not found" in run.error
    assert run.stage == "failed while reading the dataset"
    # A run is claimed once: delivering it again does nothing.
    assert services.run_benchmark(run_id)["skipped"] is True
    assert BenchmarkRun.objects.get(pk=run_id).status == "failed"


@pytest.mark.django_db
def test_the_index_benchmark_stores_its_figures_as_an_index_scale_run():
    import io

    out = io.StringIO()
    call_command("bench_index", backend="faiss-flat", n=400, dim=16, queries=10, clusters=8, stdout=out)
    run = BenchmarkRun.objects.get(kind=BenchmarkRun.Kind.INDEX_SCALE)
    assert f"stored as benchmark run {run.pk} (kind index-scale)" in out.getvalue()
    assert run.status == BenchmarkRun.Status.SUCCEEDED and run.progress == 100
    assert run.gallery_images == 400 and run.index_backend == "faiss-flat" and run.index_params == {}
    assert run.extra["n"] == 400 and run.extra["sweep"][0]["recall@10"] == 1.0  # exact search
    assert run.finished >= run.started and run.machine == run.extra["machine"]


@pytest.mark.django_db
def test_an_index_benchmark_kept_as_json_joins_the_history(tmp_path):
    import io
    import json

    out = io.StringIO()
    call_command("bench_index", backend="faiss-flat", n=400, dim=16, queries=10, clusters=8, stdout=out)
    figures = BenchmarkRun.objects.get(kind=BenchmarkRun.Kind.INDEX_SCALE).extra
    kept = tmp_path / "index-scale.json"  # what the command writes when the database refuses the run
    kept.write_text(json.dumps(figures))
    call_command("record_benchmark", str(kept), stdout=out)
    runs = BenchmarkRun.objects.filter(kind=BenchmarkRun.Kind.INDEX_SCALE).order_by("pk")
    assert len(runs) == 2 and runs[1].extra == figures and runs[1].gallery_images == 400
