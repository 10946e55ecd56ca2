"""The benchmarks history and detail pages, the recall plots, the launch form, the admin and the API."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from evaluation.models import BenchmarkRun
from tests.helpers import write_karpathy

pytestmark = pytest.mark.django_db

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(r1, r5, r10, mAP, queries):
    return {"recall@1": r1, "recall@5": r5, "recall@10": r10, "mAP": mAP, "median_rank": 2.0,
            "mean_rank": 7.25, "queries": queries}


@pytest.fixture
def finished_run(tiny_model):
    now = timezone.now()
    run = BenchmarkRun.objects.create(
        dataset="flickr30k", dataset_path="/data/flickr30k/dataset_flickr30k.json", split="test",
        collection="flickr30k-test", gallery_images=1000, gallery_captions=5000,
        model=tiny_model, model_name=tiny_model.name, model_source=tiny_model.source,
        index_backend="faiss-flat", image_size=32, status="succeeded", progress=100, stage="done",
        started=now - timedelta(minutes=3), finished=now,
        text_to_image=metrics(0.7234, 0.9012, 0.9456, 0.8123, 5000),
        image_to_text=metrics(0.8871, 0.9775, 0.9902, 0.7011, 1000),
        t2i_latency_p50_ms=12.34, t2i_latency_p95_ms=20.5, i2t_latency_p50_ms=3.21, i2t_latency_p95_ms=4.5,
        images_per_second=41.5, captions_per_second=310.2,
        machine={"platform": "Linux-test", "cpu_count": 16, "torch": "2.13.0", "device": "cpu"},
    )
    run.sample_grid.name = default_storage.save(f"benchmarks/{run.pk}/samples.png", ContentFile(PNG_MAGIC))
    run.save()
    return run


@pytest.fixture
def staff_browser(client, staff_user):
    client.force_login(staff_user)
    return client


def test_history_lists_runs_with_their_numbers_and_plots(client, finished_run):
    response = client.get("/benchmarks/")
    assert response.status_code == 200
    html = response.content.decode()
    for text in ("72.3", "90.1", "94.6", "88.7", "97.8", "99.0", "81.2", "70.1", "12.3", "3.2",
                 "1000 img / 5000 cap", finished_run.model_name, "faiss-flat", "/benchmarks/plots/flickr30k.png",
                 f"/benchmarks/{finished_run.pk}/"):
        assert text in html, text
    assert 'http-equiv="refresh"' not in html
    assert "Run a benchmark" not in html  # the launch form is for staff
    assert "/data/flickr30k" not in html


def test_history_shows_progress_and_refreshes_itself_while_a_run_is_active(client, finished_run):
    BenchmarkRun.objects.create(dataset="coco", dataset_path="/x.json", split="test", status="running",
                                progress=42, stage="encoding text queries 10/20", model_name="m")
    html = client.get("/benchmarks/").content.decode()
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "42%" in html and 'style="width:42%"' in html

    # A run left "running" by a worker that died long ago does not keep the page refreshing.
    BenchmarkRun.objects.filter(status="running").update(created=timezone.now() - timedelta(days=2))
    assert 'http-equiv="refresh"' not in client.get("/benchmarks/").content.decode()


def test_detail_page_shows_every_number_the_machine_and_the_sample_grid(client, finished_run):
    response = client.get(f"/benchmarks/{finished_run.pk}/")
    assert response.status_code == 200
    html = response.content.decode()
    for text in ("72.3", "90.1", "94.6", "81.2", "88.7", "70.1", "7.25", "12.3", "20.5", "3.2", "4.5",
                 "41.5 images/s", "310.2 captions/s", "Linux-test", "1000 images, 5000 captions", "faiss-flat",
                 "64 tokens", "32 px", f"/media/benchmarks/{finished_run.pk}/samples.png", "74.7", "89.1"):
        assert text in html, text
    assert client.get("/benchmarks/999999/").status_code == 404


def test_a_failed_run_shows_its_error(client):
    run = BenchmarkRun.objects.create(dataset="flickr30k", dataset_path="/x.json", status="failed",
                                      stage="failed while reading the dataset",
                                      error="DatasetError: /x.json: images[3] (a.jpg): image file not found")
    html = client.get(f"/benchmarks/{run.pk}/").content.decode()
    assert "images[3] (a.jpg): image file not found" in html


def test_recall_plot_is_a_png(client, finished_run):
    response = client.get("/benchmarks/plots/flickr30k.png")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response.content.startswith(PNG_MAGIC)
    empty = client.get("/benchmarks/plots/coco.png")  # no runs yet: still a picture
    assert empty.status_code == 200 and empty.content.startswith(PNG_MAGIC)
    assert client.get("/benchmarks/plots/imagenet.png").status_code == 404


def test_only_staff_may_launch_from_the_page(client, plain_user, tmp_path):
    assert client.post("/benchmarks/", {"path": "/x"}).status_code == 403
    client.force_login(plain_user)
    assert client.post("/benchmarks/", {"path": "/x"}).status_code == 403
    assert not BenchmarkRun.objects.exists()


def test_staff_launch_a_run_from_the_page_and_see_why_bad_input_is_refused(staff_browser, tiny_model, tmp_path):
    assert "Run a benchmark" in staff_browser.get("/benchmarks/").content.decode()
    bad = staff_browser.post("/benchmarks/", {"dataset": "auto", "path": str(tmp_path / "nope")})
    assert bad.status_code == 400
    assert "no such file or folder" in bad.content.decode()

    path = write_karpathy(tmp_path / "flickr", [("test", ["a red square"])])
    response = staff_browser.post("/benchmarks/", {"dataset": "auto", "path": str(path), "limit": "1"})
    run = BenchmarkRun.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/benchmarks/{run.pk}/"
    assert (run.status, run.dataset, run.split, run.limit, run.model_id) == ("queued", "flickr30k", "test", 1,
                                                                            tiny_model.pk)
    page = staff_browser.get(response["Location"]).content.decode()
    assert 'http-equiv="refresh"' in page and str(path) in page


def test_the_admin_queues_a_run_from_its_add_form(client, django_user_model, tiny_model, tmp_path):
    admin = django_user_model.objects.create_superuser("boss", password="pw-boss")
    client.force_login(admin)
    path = write_karpathy(tmp_path / "flickr", [("test", ["a red square"])])
    assert client.get("/admin/evaluation/benchmarkrun/add/").status_code == 200
    response = client.post("/admin/evaluation/benchmarkrun/add/",
                           {"dataset": "flickr30k", "path": str(path), "split": "", "collection": "",
                            "model": ""})
    assert response.status_code == 302, response.content.decode()[:2000]
    run = BenchmarkRun.objects.get()
    assert (run.status, run.dataset, run.collection, run.requested_by) == ("queued", "flickr30k",
                                                                        "flickr30k-test", admin)
    assert client.get("/admin/evaluation/benchmarkrun/").status_code == 200
    assert client.get(f"/admin/evaluation/benchmarkrun/{run.pk}/change/").status_code == 200
    client.post("/admin/evaluation/benchmarkrun/", {"action": "run_again", "_selected_action": [run.pk]})
    assert BenchmarkRun.objects.count() == 2


def test_api_lists_and_shows_runs_to_anyone_without_server_paths(api_client, finished_run, staff_client):
    listing = api_client.get("/api/benchmarks/")
    assert listing.status_code == 200
    first = listing.json()["results"][0]
    assert first["id"] == finished_run.pk and first["text_to_image"]["recall@1"] == 0.7234
    assert "dataset_path" not in first
    detail = api_client.get(f"/api/benchmarks/{finished_run.pk}/").json()
    assert detail["t2i_latency_p50_ms"] == 12.34 and detail["sample_grid_url"].endswith("samples.png")
    assert staff_client.get(f"/api/benchmarks/{finished_run.pk}/").json()["dataset_path"].endswith(".json")
    assert api_client.get("/api/benchmarks/999999/").status_code == 404


def test_api_launch_needs_a_staff_account(api_client, plain_user, tiny_model, tmp_path):
    path = write_karpathy(tmp_path / "flickr", [("test", ["a red square"])])
    assert api_client.post("/api/benchmarks/", {"path": str(path)}, format="json").status_code in (401, 403)
    api_client.force_authenticate(plain_user)
    assert api_client.post("/api/benchmarks/", {"path": str(path)}, format="json").status_code == 403
    assert not BenchmarkRun.objects.exists()


@pytest.mark.parametrize("payload, field, reason", [
    ({"dataset": "imagenet", "path": "/x"}, "dataset", "valid choice"),
    ({"path": ""}, "path", "blank"),
    ({}, "path", "required"),
    ({"path": "/definitely/not/here.json"}, "path", "no such file or folder"),
    ({"path": "{flickr}", "limit": 0}, "limit", "greater than or equal to 1"),
    ({"path": "{flickr}", "model": 999999}, "model", "does not exist"),
    ({"path": "{flickr}", "dataset": "coco"}, "path", "not 'coco'"),
])
def test_api_launch_refuses_bad_input_with_a_reason(staff_client, tiny_model, tmp_path, payload, field, reason):
    path = write_karpathy(tmp_path / "flickr", [("test", ["a red square"])])
    payload = {k: (str(path) if v == "{flickr}" else v) for k, v in payload.items()}
    response = staff_client.post("/api/benchmarks/", payload, format="json")
    assert response.status_code == 400
    assert reason in " ".join(response.json()[field])
    assert not BenchmarkRun.objects.exists()


def test_api_launch_without_an_active_model_is_refused(staff_client, clean_state, tmp_path):
    path = write_karpathy(tmp_path / "flickr", [("test", ["a red square"])])
    response = staff_client.post("/api/benchmarks/", {"path": str(path)}, format="json")
    assert response.status_code == 400
    assert "ensure_model" in response.json()["model"][0]


def test_benchmarks_are_in_the_openapi_schema(api_client):
    schema = api_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    assert {"get", "post"} <= set(schema["paths"]["/api/benchmarks/"])
    assert "get" in schema["paths"]["/api/benchmarks/{id}/"]
    assert "BenchmarkLaunch" in " ".join(schema["components"]["schemas"])


def test_anonymous_visitors_see_no_server_paths_and_staff_do(client, staff_user, finished_run, tiny_model):
    # A checkpoint registered without a name is named by its directory.
    tiny_model.name = tiny_model.source
    tiny_model.save()
    finished_run.model_name = tiny_model.source
    finished_run.save()
    folder = tiny_model.source.rstrip("/").rsplit("/", 1)[-1]
    pages = ["/", "/benchmarks/", f"/benchmarks/{finished_run.pk}/", f"/api/benchmarks/{finished_run.pk}/"]
    for page in pages:
        body = client.get(page).content.decode()
        assert tiny_model.source not in body, page
        assert "/data/flickr30k" not in body, page
    assert folder in client.get("/").content.decode()
    assert client.get(f"/api/benchmarks/{finished_run.pk}/").json()["model_name"] == folder
    client.force_login(staff_user)
    for page in pages:
        assert tiny_model.source in client.get(page).content.decode(), page


def test_every_page_has_a_favicon(client):
    response = client.get("/favicon.ico", follow=True)
    assert response.status_code == 200
    assert b"".join(response.streaming_content)[:4] == b"\x00\x00\x01\x00"  # an ICO file


def test_a_run_shows_how_well_its_match_probabilities_are_calibrated(client, finished_run):
    from evaluation.core.metrics import match_calibration

    assert "Match probabilities" not in client.get(f"/benchmarks/{finished_run.pk}/").content.decode()
    assert client.get(f"/benchmarks/{finished_run.pk}/calibration.png").status_code == 404
    rng = np.random.default_rng(0)
    finished_run.extra = {"calibration": match_calibration(rng.standard_normal((20, 4)), rng.standard_normal((5, 4)),
                                                           np.repeat(np.arange(5), 4), scale=2.0, bias=-1.0)}
    finished_run.save()
    html = client.get(f"/benchmarks/{finished_run.pk}/").content.decode()
    assert "Match probabilities" in html and f"{finished_run.extra['calibration']['ece']:.4f}" in html
    plot = client.get(f"/benchmarks/{finished_run.pk}/calibration.png")
    assert plot.status_code == 200 and plot["Content-Type"] == "image/png" and plot.content.startswith(PNG_MAGIC)


def test_chance_recall_is_what_a_random_ranking_scores():
    from evaluation.core.plots import chance_recall

    assert chance_recall("text_to_image", 10, 1000, 5000) == pytest.approx(1.0)
    assert chance_recall("image_to_text", 1, 1000, 5000) == pytest.approx(0.1)  # 5 of 5000 captions are right
    assert chance_recall("image_to_text", 10, 40, 200) == pytest.approx(22.83, abs=0.01)  # 1 - C(195,10)/C(200,10)
    assert chance_recall("text_to_image", 10, 4, 20) == 100.0


def test_the_time_axis_spans_the_runs_not_the_years_around_one():
    from evaluation.core.plots import time_axis_limits

    now = timezone.now()
    low, high = time_axis_limits([now])
    assert high - low == timedelta(days=1) and low < now < high
    low, high = time_axis_limits([now - timedelta(days=30), now])
    assert timedelta(days=30) < high - low < timedelta(days=34)


def test_published_values_are_shown_only_beside_a_run_on_the_same_gallery(client, finished_run):
    assert "Published zero-shot R@1" in client.get(f"/benchmarks/{finished_run.pk}/").content.decode()
    finished_run.gallery_images = 40  # a 40-image run of the same dataset is not comparable
    finished_run.save()
    assert "Published zero-shot R@1" not in client.get(f"/benchmarks/{finished_run.pk}/").content.decode()


def test_the_metrics_are_explained_on_a_page_linked_from_the_benchmarks(client, finished_run):
    assert "/benchmarks/metrics/" in client.get("/benchmarks/").content.decode()
    page = client.get("/benchmarks/metrics/")
    assert page.status_code == 200 and "<h1>Retrieval metrics</h1>" in page.content.decode()
