"""Curators, workers and searchers writing the same asset at the same time, with a real
Celery worker: nothing acknowledged is lost, nothing deadlocks, nothing answers 5xx.

Where a race needs one writer to be caught inside its transaction, the test holds a
table lock from a connection of its own (``HeldTable``) until PostgreSQL shows the
writer waiting on it, then lets go: the timing is the database's, not a sleep's.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from django.conf import settings
from django.db import connection

from embeddings.models import Embedding
from embeddings.services import encoder_for
from search import index_sync, serving
from search.models import Caption, ImageAsset
from tests.conftest import _test_database_url
from tests.helpers import image_bytes, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def own_media(settings, tmp_path):
    """A media folder of this test's own (the worker started after it uses it too), so that
    what is in it can be compared with the rows."""
    settings.MEDIA_ROOT = tmp_path / "media"
    (tmp_path / "media" / "images").mkdir(parents=True)


def _file(data, name="photo.png"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="image/png")


def staff_api(user):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient(raise_request_exception=False)
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def in_parallel(*calls):
    """Run the calls in threads started together; their results (or exceptions) in order."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i, call):
        try:
            barrier.wait(timeout=30)
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def in_background(call):
    """Start ``call`` in a thread; ``.result()`` waits for what it returned."""
    box = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001
            box["value"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()

    class Pending:
        def result(self, timeout=120):
            thread.join(timeout)
            assert not thread.is_alive(), "the background call did not finish"
            return box["value"]

    return Pending()


def lock_waiters(query_prefix: str = "") -> int:
    """Backends waiting for a lock, whose query starts with ``query_prefix``."""
    with psycopg.connect(_test_database_url(), autocommit=True) as probe:
        (count,), = probe.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            [query_prefix + "%"]).fetchall()
    return count


class HeldTable:
    """``LOCK TABLE … IN SHARE MODE`` from a connection of the test's own: inserts into
    the table wait until ``release()``."""

    def __init__(self, table: str):
        self.conn = psycopg.connect(_test_database_url())
        self.conn.execute(f'LOCK TABLE "{table}" IN SHARE MODE')

    def waiting(self, query_prefix: str = "") -> int:
        return lock_waiters(query_prefix)

    def release(self):
        self.conn.commit()
        self.conn.close()


def status(result):
    return result if isinstance(result, BaseException) else result.status_code


def worker_errors(worker) -> list[str]:
    """ERROR lines the worker logged since the test started."""
    with open(worker.log_path, "rb") as fh:
        fh.seek(worker.log_start)
        text = fh.read().decode("utf-8", "replace")
    return [line for line in text.splitlines() if " ERROR" in line or "Traceback" in line]


def embedded_completely(asset_id, model) -> bool:
    asset = ImageAsset.objects.filter(pk=asset_id).first()
    if asset is None or asset.status != ImageAsset.Status.EMBEDDED:
        return False
    if not Embedding.objects.filter(model=model, asset_id=asset_id).exists():
        return False
    return not Caption.objects.filter(asset_id=asset_id).exclude(embeddings__model=model).exists()


def no_orphans(model):
    """No vector without its row, no stored file without its asset, no asset without its file."""
    media = Path(settings.MEDIA_ROOT)
    files = {p.relative_to(media).as_posix() for p in (media / "images").rglob("*") if p.is_file()}
    named = set(ImageAsset.objects.values_list("file", flat=True))
    assert files == named, f"files without an asset: {files - named}; assets without a file: {named - files}"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM embeddings_embedding e LEFT JOIN search_imageasset a ON a.id = e.asset_id "
            "LEFT JOIN search_caption c ON c.id = e.caption_id WHERE a.id IS NULL AND c.id IS NULL")
        assert cursor.fetchone()[0] == 0


def test_concurrent_uploads_of_the_same_bytes_keep_the_file_and_every_caption(
    tiny_model, staff_user, celery_worker_process
):
    pictures = [image_bytes((40 * i, 200 - 30 * i, 90), pattern=i) for i in range(1, 5)]
    for n, data in enumerate(pictures):
        clients = [staff_api(staff_user) for _ in range(8)]
        calls = [lambda c=c, i=i: c.post("/api/assets/", {"image": _file(data), "captions": [f"picture {n} take {i}"]},
                                         format="multipart") for i, c in enumerate(clients)]
        answers = in_parallel(*calls)
        assert sorted(status(a) for a in answers) == [200] * 7 + [201], [getattr(a, "content", a) for a in answers]
        ids = {a.json()["id"] for a in answers}
        assert len(ids) == 1
        asset = ImageAsset.objects.get(pk=ids.pop())
        assert sorted(asset.captions.values_list("text", flat=True)) == sorted(f"picture {n} take {i}" for i in range(8))
        with asset.file.open("rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == asset.sha256 == hashlib.sha256(data).hexdigest()
    for asset in ImageAsset.objects.all():
        wait_for(lambda: embedded_completely(asset.pk, tiny_model), message=f"asset {asset.pk} to be embedded")
    assert ImageAsset.objects.count() == len(pictures)
    no_orphans(tiny_model)
    assert not worker_errors(celery_worker_process)


@pytest.mark.parametrize("first", ["fresh upload", "re-upload with a new caption"])
def test_a_delete_while_the_worker_stores_vectors_succeeds_and_leaves_nothing(
    tiny_model, staff_user, celery_worker_process, first
):
    client = staff_api(staff_user)
    data = image_bytes((200, 30, 30), pattern=2)
    if first == "re-upload with a new caption":
        asset_id = client.post("/api/assets/", {"image": _file(data), "captions": ["a red picture"]},
                               format="multipart").json()["id"]
        wait_for(lambda: embedded_completely(asset_id, tiny_model), message="the first upload to be embedded")
    held = HeldTable("embeddings_embedding")
    try:
        answer = client.post("/api/assets/", {"image": _file(data), "captions": ["striped", "red stripes"]},
                             format="multipart")
        assert answer.status_code in (200, 201), answer.content
        asset_id = answer.json()["id"]
        # The worker has encoded the upload and is inside its transaction, waiting to insert.
        wait_for(lambda: held.waiting('INSERT INTO "embeddings_embedding"') == 1, message="the worker to store")
        delete = in_background(lambda: staff_api(staff_user).delete(f"/api/assets/{asset_id}/"))
        wait_for(lambda: held.waiting() >= 2, message="the delete to wait for the worker", timeout=20)
    finally:
        held.release()
    assert status(delete.result()) == 204, getattr(delete.result(), "content", delete.result())
    assert not ImageAsset.objects.filter(pk=asset_id).exists()
    assert not Embedding.objects.filter(model=tiny_model).exists()
    no_orphans(tiny_model)
    time.sleep(1.0)  # what the worker does after its transaction (the index sync) has run
    assert not worker_errors(celery_worker_process)


def test_parallel_deletes_of_one_asset_delete_it_once_without_errors(tiny_model, staff_user, celery_worker_process):
    client = staff_api(staff_user)
    for n in range(4):
        asset_id = client.post("/api/assets/", {"image": _file(image_bytes((10, 20 * n, 200), pattern=n)),
                                                "captions": [f"blue {n}", f"picture {n}"]},
                               format="multipart").json()["id"]
        wait_for(lambda: embedded_completely(asset_id, tiny_model), message="the upload to be embedded")
        answers = in_parallel(*[lambda c=staff_api(staff_user): c.delete(f"/api/assets/{asset_id}/")
                                for _ in range(4)])
        codes = sorted(status(a) for a in answers)
        assert codes == [204, 404, 404, 404], [getattr(a, "content", a) for a in answers]
        for answer in answers:
            if answer.status_code == 404:
                assert "detail" in answer.json()
        assert not ImageAsset.objects.filter(pk=asset_id).exists()
    no_orphans(tiny_model)


def test_a_caption_edited_while_the_worker_embeds_gets_the_vector_of_its_new_text(
    tiny_model, client, django_user_model, celery_worker_process
):
    curator = django_user_model.objects.create_superuser("admin-editor", "e@example.com", "pw-editor")
    client.force_login(curator)
    api = staff_api(curator)
    held = HeldTable("embeddings_embedding")
    try:
        asset_id = api.post("/api/assets/", {"image": _file(image_bytes((30, 200, 30))), "captions": ["a red square"]},
                            format="multipart").json()["id"]
        caption = Caption.objects.get(asset_id=asset_id)
        wait_for(lambda: held.waiting('INSERT INTO "embeddings_embedding"') == 1, message="the worker to store")
        form = {
            "collection": "", "captions-TOTAL_FORMS": "1", "captions-INITIAL_FORMS": "1",
            "captions-MIN_NUM_FORMS": "0", "captions-MAX_NUM_FORMS": "1000",
            "captions-0-id": str(caption.pk), "captions-0-asset": str(asset_id),
            "captions-0-text": "a green circle", "_save": "Save",
        }
        edit = in_background(lambda: client.post(f"/admin/search/imageasset/{asset_id}/change/", form))
        wait_for(lambda: held.waiting() >= 2, message="the edit to wait for the worker", timeout=20)
    finally:
        held.release()
    assert status(edit.result()) == 302, getattr(edit.result(), "content", b"")[:2000]
    assert Caption.objects.get(pk=caption.pk).text == "a green circle"
    wanted = encoder_for(tiny_model).encode_texts(["a green circle"])[0]

    def vector_of_new_text():
        row = Embedding.objects.filter(model=tiny_model, caption_id=caption.pk).first()
        return row is not None and float(row.array @ wanted) > 0.9999 and embedded_completely(asset_id, tiny_model)

    wait_for(vector_of_new_text, message="the caption's vector to be that of its new text")
    assert Embedding.objects.filter(model=tiny_model, caption_id=caption.pk).count() == 1
    assert not worker_errors(celery_worker_process)


def test_a_delete_during_an_index_sync_leaves_the_sync_whole_and_the_next_one_without_it(
    tiny_model, staff_user, monkeypatch
):
    from search import asset_vectors, curation

    assets = [curation.ingest_image(image_bytes((9, 9, 30 * i)), [f"caption {i}"]).asset
              for i in range(1, 5)]
    for asset in assets:
        asset_vectors.embed_asset(asset.pk, tiny_model)
    ids_read, go_on = threading.Event(), threading.Event()
    real_vectors = index_sync.current_vectors

    def vectors_after_the_delete(model, modality, ids):
        ids_read.set()  # the sync has read which rows to add; the delete lands before their vectors
        assert go_on.wait(30)
        return real_vectors(model, modality, ids)

    monkeypatch.setattr(index_sync, "current_vectors", vectors_after_the_delete)
    sync = in_background(lambda: index_sync.sync_indices(tiny_model))
    assert ids_read.wait(30)
    answer = staff_api(staff_user).delete(f"/api/assets/{assets[0].pk}/")
    go_on.set()
    results = sync.result()
    assert answer.status_code == 204
    assert not isinstance(results, BaseException), results
    monkeypatch.setattr(index_sync, "current_vectors", real_vectors)
    index_sync.sync_indices(tiny_model)
    served = serving.LoadedIndices()
    assert set(served.get(tiny_model, "image").ids().tolist()) == {a.pk for a in assets[1:]}
    live_captions = set(Caption.objects.values_list("pk", flat=True))
    assert set(served.get(tiny_model, "caption").ids().tolist()) == live_captions
    assert np.isin(assets[0].pk, served.get(tiny_model, "image").ids(), invert=True)


def test_an_admin_edit_saves_only_what_it_edits_not_a_status_read_before_the_worker_changed_it(
    tiny_model, client, django_user_model
):
    curator = django_user_model.objects.create_superuser("admin-saver", "s@example.com", "pw-saver")
    client.force_login(curator)
    from search import curation

    asset = curation.ingest_image(image_bytes((90, 20, 160)), ["a purple square"]).asset
    caption = Caption.objects.get(asset=asset)
    form = {
        "collection": "renamed", "captions-TOTAL_FORMS": "1", "captions-INITIAL_FORMS": "1",
        "captions-MIN_NUM_FORMS": "0", "captions-MAX_NUM_FORMS": "1000",
        "captions-0-id": str(caption.pk), "captions-0-asset": str(asset.pk),
        "captions-0-text": "a purple square", "_save": "Save",
    }
    holder = psycopg.connect(_test_database_url())
    holder.execute("SELECT id FROM search_imageasset WHERE id = %s FOR UPDATE", [asset.pk])
    try:
        edit = in_background(lambda: client.post(f"/admin/search/imageasset/{asset.pk}/change/", form))
        # The admin has read the row (status pending) and waits for the row lock; meanwhile the
        # worker's transaction marks the asset embedded.
        wait_for(lambda: lock_waiters("SELECT") >= 1, message="the edit to wait for the row", timeout=20)
        holder.execute("UPDATE search_imageasset SET status = 'embedded' WHERE id = %s", [asset.pk])
    finally:
        holder.commit()
        holder.close()
    assert status(edit.result()) == 302
    asset.refresh_from_db()
    assert asset.collection == "renamed" and asset.status == "embedded"
