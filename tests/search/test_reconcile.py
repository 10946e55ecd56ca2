"""The reconciler puts right what fell through the cracks; deletes leave search at once;
index writes are serialised; embedding tasks are idempotent and give up on poison images."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.utils import timezone

from embeddings import services
from embeddings.models import Embedding
from search import asset_vectors, index_sync, reconciler, serving, tasks
from search.curation import ingest_image
from search.models import Caption, ImageAsset, IndexBuild
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def isolated(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.INDEX_DIR = tmp_path / "indices"


def reconcile(**options):
    """A reconciler run as its task and command make it: the report, then its follow-ups queued."""
    report = reconciler.reconcile(**options)
    tasks.queue_requeued(report)
    return report


def add(colour, captions=("a caption",), embed=True, model=None):
    asset = ingest_image(image_bytes(colour), list(captions)).asset
    if embed:
        asset_vectors.embed_asset(asset.pk, model)
    return asset


def served_ids(model, modality):
    index = serving.LoadedIndices().get(model, modality)
    return set(index.ids().tolist()) if index is not None else set()


def stored(model, modality):
    return set(index_sync.stored_ids(model, modality).tolist())


def queued_embeds() -> list[int]:
    """Asset ids of the embed tasks waiting in the broker's default queue."""
    import base64

    import redis
    from django.conf import settings

    ids = []
    for raw in redis.Redis.from_url(settings.CELERY_BROKER_URL).lrange("celery", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] == "search.tasks.embed_asset_task":
            args = json.loads(base64.b64decode(message["body"]))[0]
            ids.append(args[0])
    return ids


def test_assets_whose_task_was_lost_are_requeued_then_embedded(tiny_model, isolated):
    lost = [add((i * 60, 9, 9), [f"lost {i}"], embed=False) for i in range(3)]  # no task was ever queued
    report = reconcile(stuck_after=0)
    assert sorted(report.requeued) == sorted(a.pk for a in lost)
    assert set(report.requeued) <= set(queued_embeds())  # in the broker, for any worker to take
    for asset in lost:  # what the worker does with them (a real one: tests/portal/test_faults.py)
        asset_vectors.embed_asset(asset.pk)
    index_sync.sync_indices(tiny_model)
    assert not ImageAsset.objects.filter(status="pending").exists()
    assert reconcile(stuck_after=0).clean


def test_a_stuck_asset_is_requeued_once_per_window(tiny_model, isolated):
    asset = add((5, 5, 5), embed=False)
    young = add((6, 6, 6), embed=False)
    cache.delete(f"reconcile-requeued:{asset.pk}")
    ImageAsset.objects.filter(pk=asset.pk).update(created=timezone.now() - timedelta(hours=1))
    first = reconcile(stuck_after=600)
    assert first.requeued == [asset.pk]  # the young one is not stuck yet
    second = reconcile(stuck_after=600)
    assert second.stuck == 1 and second.requeued == []
    assert young.pk not in first.requeued + second.requeued


def test_index_drift_is_found_and_repaired(tiny_model, isolated):
    assets = [add((i * 40, 20, 20), [f"drift {i}"]) for i in range(4)]
    index_sync.sync_indices(tiny_model)
    assert reconcile(stuck_after=0).clean
    # Vectors the index never saw, and index rows whose vectors are gone.
    extra = add((250, 250, 1), ["unsynced"])
    Embedding.objects.filter(asset=assets[0]).delete()
    dry = reconcile(dry_run=True)
    image = next(c for c in dry.indices if c.modality == "image")
    assert (image.missing, image.extra, image.repaired) == (1, 1, False)
    assert not dry.clean
    fixed = reconcile()
    assert all(c.repaired for c in fixed.indices if c.modality == "image")
    assert served_ids(tiny_model, "image") == stored(tiny_model, "image")
    assert extra.pk in served_ids(tiny_model, "image") and assets[0].pk not in served_ids(tiny_model, "image")
    assert reconcile().clean


def test_a_missing_or_torn_newest_index_file_is_repaired(tiny_model, isolated):
    for i in range(3):
        add((i * 70, 90, 9), [f"file {i}"])
    index_sync.sync_indices(tiny_model)
    add((1, 200, 200), ["newer"])
    newest = index_sync.sync_index(tiny_model, "image").build
    Path(newest.file_path).write_bytes(Path(newest.file_path).read_bytes()[:100])  # torn
    caption = IndexBuild.objects.filter(model=tiny_model, modality="caption", status="ready").latest("version")
    Path(caption.file_path).unlink()  # lost
    report = reconcile()
    assert {c.modality for c in report.indices if c.repaired} == {"image", "caption"}
    assert served_ids(tiny_model, "image") == stored(tiny_model, "image")
    assert served_ids(tiny_model, "caption") == stored(tiny_model, "caption")
    # The torn version was set aside (and, being older than the repair, pruned with its file).
    assert not IndexBuild.objects.filter(pk=newest.pk, status=IndexBuild.Status.READY).exists()


def test_orphan_files_are_removed_after_a_grace_period_and_missing_files_reported(tiny_model, isolated, settings):
    kept = add((3, 3, 3))
    index_sync.sync_indices(tiny_model)
    media = Path(settings.MEDIA_ROOT)
    old_orphan = media / "images" / "ab" / ("ab" + "0" * 62 + ".png")
    new_orphan = media / "images" / "cd" / ("cd" + "0" * 62 + ".png")
    index_orphan = Path(settings.INDEX_DIR) / f"model-{tiny_model.pk}" / "image" / "v999999.index"
    for path in (old_orphan, new_orphan, index_orphan):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left behind by a crash")
    an_hour_ago = time.time() - 2 * 3600
    os.utime(old_orphan, (an_hour_ago, an_hour_ago))
    os.utime(index_orphan, (an_hour_ago, an_hour_ago))
    missing = add((4, 4, 4))
    Path(missing.file.path).unlink()
    dry = reconcile(files=True, dry_run=True)
    assert old_orphan.exists() and dry.orphan_files == [old_orphan.relative_to(media).as_posix()]
    report = reconcile(files=True)
    assert not old_orphan.exists() and new_orphan.exists() and not index_orphan.exists()
    assert report.missing_files == [missing.pk]
    assert Path(kept.file.path).exists()
    assert all(Path(b.file_path).exists() for b in IndexBuild.objects.filter(status="ready"))


def test_the_command_prints_a_report(tiny_model, isolated):
    add((8, 8, 8), embed=False)
    out = StringIO()
    call_command("reconcile", "--stuck-after", "0", "--dry-run", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["stuck"] == 1 and report["requeued"] == [] and report["dry_run"]
    out = StringIO()
    call_command("reconcile", "--no-files", stdout=out)
    assert "index " in out.getvalue()


def test_the_reconciler_runs_on_celery_beat(settings):
    from portal.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["reconcile"]
    assert entry["task"] == "search.tasks.reconcile_task" and entry["task"] in app.tasks
    assert 0 < entry["schedule"] <= 3600 and entry["options"]["expires"] <= entry["schedule"]


def test_a_deleted_image_leaves_every_search_at_once(tiny_model, isolated, staff_client, api_client,
                                                    django_capture_on_commit_callbacks):
    keep = add((200, 10, 10), ["a red square", "a crimson block"])
    gone = add((10, 10, 200), ["a blue circle", "the blue one"])
    index_sync.sync_indices(tiny_model)
    gone_captions = set(Caption.objects.filter(asset=gone).values_list("pk", flat=True))
    with django_capture_on_commit_callbacks(execute=True):  # the file goes once the delete has committed
        assert staff_client.delete(f"/api/assets/{gone.pk}/").status_code == 204
    assert gone.pk in served_ids(tiny_model, "image")  # the index file still has it: no sync ran
    text = api_client.post("/api/search/text/", {"query": "a blue circle", "k": 10}, format="json").json()
    assert [r["asset"]["id"] for r in text["results"]] == [keep.pk]
    by_id = api_client.post("/api/search/image/", {"asset_id": keep.pk, "k": 10}, format="json").json()
    by_bytes = api_client.post("/api/search/image/", {"image": _file(image_bytes((10, 10, 200))), "k": 10},
                               format="multipart").json()
    # Searched by its id, `keep` is not its own neighbour: with `gone` out, nothing else is left.
    for body, images in ((by_id, set()), (by_bytes, {keep.pk})):
        assert {i["asset"]["id"] for i in body["images"]} == images
        assert not {c["id"] for c in body["captions"]} & gone_captions
        assert {c["asset_id"] for c in body["captions"]} == {keep.pk}
    assert not Path(gone.file.path).exists()
    assert api_client.post("/api/search/image/", {"asset_id": gone.pk}, format="json").status_code == 404


def _file(data):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("q.png", data, content_type="image/png")


def test_deleting_keeps_a_file_that_a_new_upload_of_the_same_bytes_uses(tiny_model, isolated, monkeypatch,
                                                                        django_capture_on_commit_callbacks):
    """Files are named by content: if the same bytes are uploaded again while a delete is under
    way, the delete must not remove the file the new row points at."""
    from search import curation

    first = add((77, 77, 77), embed=False)
    real = curation.remove_unused_files
    again = {}

    def upload_meanwhile(files):  # runs after the delete committed, before its files go
        if not again:
            again["asset"] = ImageAsset.objects.create(
                sha256=first.sha256, file=first.file.name, width=1, height=1, format="PNG")
        return real(files)

    monkeypatch.setattr(curation, "remove_unused_files", upload_meanwhile)
    with django_capture_on_commit_callbacks(execute=True):
        curation.delete_assets(ImageAsset.objects.filter(pk=first.pk))
    assert not ImageAsset.objects.filter(pk=first.pk).exists()
    assert Path(again["asset"].file.path).exists()
    monkeypatch.undo()
    with django_capture_on_commit_callbacks(execute=True):
        curation.delete_assets(ImageAsset.objects.filter(pk=again["asset"].pk))
    assert not Path(first.file.path).exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_rebuilds_wait_for_each_other(tiny_model, isolated):
    for i in range(5):
        add((i * 50, 100, 100), [f"concurrent {i}"])
    results, errors = [], []

    def rebuild():
        from django.db import connection

        try:
            results.append(index_sync.sync_index(tiny_model, "image", rebuild=True).build.version)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=rebuild) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(results) == [1, 2, 3]  # one after the other, each a complete version
    builds = IndexBuild.objects.filter(model=tiny_model, modality="image", status="ready")
    assert sorted(builds.values_list("vector_count", flat=True)) == [5, 5, 5]
    assert served_ids(tiny_model, "image") == stored(tiny_model, "image")
    assert not list(Path(index_sync.index_dir(tiny_model, "image")).glob(".*.tmp"))


def test_embedding_twice_stores_one_vector_each(tiny_model, isolated):
    asset = add((1, 2, 3), ["one", "two"], embed=False)
    assert asset_vectors.embed_asset(asset.pk) == 3
    assert asset_vectors.embed_asset(asset.pk) == 0
    assert Embedding.objects.filter(model=tiny_model, asset=asset).count() == 1
    assert Embedding.objects.filter(model=tiny_model, caption__asset=asset).count() == 2


def test_a_permanent_failure_marks_the_asset_failed_with_its_reason(tiny_model, isolated):
    from search.tasks import embed_asset_task

    asset = add((9, 8, 7), embed=False)
    Path(asset.file.path).unlink()
    result = embed_asset_task.apply(args=[asset.pk])
    assert result.failed()
    asset.refresh_from_db()
    assert asset.status == "failed" and "FileNotFoundError" in asset.error


def test_an_image_that_keeps_killing_the_worker_is_given_up(tiny_model, isolated, settings):
    from search.tasks import embed_asset_task

    asset = add((19, 18, 17), embed=False)
    task_id = f"poison-{asset.pk}"
    # Five earlier deliveries of this task began and never finished (the worker died each time).
    cache.set(f"embed-deliveries:{task_id}", settings.EMBED_MAX_CRASHES, timeout=60)
    assert embed_asset_task.apply(args=[asset.pk], task_id=task_id).get() == 0
    asset.refresh_from_db()
    assert asset.status == "failed" and "stopped 5 times" in asset.error
    # A delivery after a single crash still embeds.
    other = add((29, 28, 27), embed=False)
    cache.set(f"embed-deliveries:again-{other.pk}", 1, timeout=60)
    assert embed_asset_task.apply(args=[other.pk], task_id=f"again-{other.pk}").get() == 2
    other.refresh_from_db()
    assert other.status == "embedded"
    assert cache.get(f"embed-deliveries:again-{other.pk}") is None


def test_captions_added_while_embedding_keep_the_asset_pending(tiny_model, isolated):
    asset = add((40, 41, 42), ["first"], embed=False)
    real = services.encoder_for

    class CaptionArrivesMeanwhile:
        def __init__(self, encoder):
            self.encoder = encoder

        def encode_images(self, *args, **kwargs):
            return self.encoder.encode_images(*args, **kwargs)

        def encode_texts(self, *args, **kwargs):  # the captions to embed are already chosen
            if not Caption.objects.filter(asset=asset, text="second").exists():
                Caption.objects.create(asset=asset, text="second")
            return self.encoder.encode_texts(*args, **kwargs)

    services.encoder_for = lambda model: CaptionArrivesMeanwhile(real(model))
    try:
        asset_vectors.embed_asset(asset.pk)
    finally:
        services.encoder_for = real
    asset.refresh_from_db()
    assert asset.status == "pending"  # "second" has no vector yet; its own task will do it
    asset_vectors.embed_asset(asset.pk)
    asset.refresh_from_db()
    assert asset.status == "embedded"
    assert np.isfinite(Embedding.objects.get(caption__text="second").array).all()


def test_a_file_left_by_an_interrupted_upload_is_reused_only_when_it_holds_the_same_bytes(isolated, settings):
    import hashlib

    data = image_bytes((123, 45, 67))
    digest = hashlib.sha256(data).hexdigest()
    name = f"images/{digest[:2]}/{digest}.png"
    leftover = Path(settings.MEDIA_ROOT) / name
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(data[:-7])  # torn by a crash mid-write: not trusted
    torn = ingest_image(data).asset
    # Replaced under the content lock: the name stays the hash's, the bytes are the upload's.
    assert torn.file.name == name and Path(torn.file.path).read_bytes() == data
    assert [p.name for p in leftover.parent.iterdir()] == [leftover.name]
    ImageAsset.objects.filter(pk=torn.pk).delete()
    leftover.write_bytes(data)  # complete: the same content under its content-derived name
    whole = ingest_image(data).asset
    assert whole.file.name == name


def test_an_asset_whose_file_is_lost_leaves_search_and_an_upload_of_the_same_bytes_restores_it(
    tiny_model, isolated, django_capture_on_commit_callbacks
):
    data = image_bytes((5, 150, 5))
    lost = ingest_image(data, ["a green square"]).asset
    asset_vectors.embed_asset(lost.pk, tiny_model)
    index_sync.sync_indices(tiny_model)
    Path(lost.file.path).unlink()  # storage lost it
    report = reconcile(files=True)
    assert report.missing_files == [lost.pk]
    lost.refresh_from_db()
    assert lost.status == "failed" and "missing" in lost.error
    assert not Embedding.objects.filter(asset=lost).exists()
    assert not Embedding.objects.filter(caption__asset=lost).exists()
    index_sync.sync_indices(tiny_model)
    assert lost.pk not in served_ids(tiny_model, "image")
    assert reconcile(files=True).missing_files == []  # reported once, not on every run
    with django_capture_on_commit_callbacks() as queued:
        again = ingest_image(data, ["a green block"])
        tasks.queue_follow_ups(again)
    assert again.asset.pk == lost.pk and not again.created and len(queued) == 1
    assert Path(lost.file.path).read_bytes() == data
    lost.refresh_from_db()
    assert lost.status == "pending" and lost.error == ""
    asset_vectors.embed_asset(lost.pk, tiny_model)
    lost.refresh_from_db()
    assert lost.status == "embedded" and Embedding.objects.filter(caption__asset=lost).count() == 2


def test_crashes_while_the_model_loads_do_not_count_against_an_image(tiny_model, isolated, settings):
    """A fresh worker spends seconds loading the model; a worker killed then has not died on the
    image. The delivery is counted once the model is loaded, so an image whose earlier
    deliveries all began in such workers is still embedded."""
    from embeddings.core import siglip
    from search.tasks import embed_asset_task

    asset = add((59, 58, 57), embed=False)
    task_id = f"loading-{asset.pk}"
    cache.set(f"embed-deliveries:{task_id}", settings.EMBED_MAX_CRASHES - 1, timeout=60)
    real_load = siglip.SiglipEncoder.load
    counted_before_load = []

    def load(encoder):  # the moment a worker could die loading the model
        counted_before_load.append(cache.get(f"embed-deliveries:{task_id}"))
        return real_load(encoder)

    siglip.clear_encoder_cache()
    siglip.SiglipEncoder.load = load
    try:
        assert embed_asset_task.apply(args=[asset.pk], task_id=task_id).get() == 2
    finally:
        siglip.SiglipEncoder.load = real_load
    assert counted_before_load and counted_before_load[0] == settings.EMBED_MAX_CRASHES - 1
    asset.refresh_from_db()
    assert asset.status == "embedded"
