"""Curators upload through the Django admin: one image with captions, or many at once."""

import io
import json
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from search.models import Caption, ImageAsset
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_staff(client, django_user_model):
    user = django_user_model.objects.create_superuser("admin-curator", "a@example.com", "pw-admin")
    client.force_login(user)
    return client


def inline_data(captions):
    data = {
        "captions-TOTAL_FORMS": str(len(captions)),
        "captions-INITIAL_FORMS": "0",
        "captions-MIN_NUM_FORMS": "0",
        "captions-MAX_NUM_FORMS": "1000",
    }
    for i, text in enumerate(captions):
        data[f"captions-{i}-text"] = text
    return data


def test_admin_adds_an_image_with_inline_captions_and_queues_embedding(
    admin_client_staff, django_capture_on_commit_callbacks
):
    data = {"image": SimpleUploadedFile("cat.png", image_bytes((10, 200, 10))), "collection": "pets",
            **inline_data(["a green cat", "a cat sitting"])}
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client_staff.post("/admin/search/imageasset/add/", data)
    assert response.status_code == 302, response.content[:2000]
    asset = ImageAsset.objects.get()
    assert asset.collection == "pets" and asset.original_name == "cat.png"
    assert sorted(asset.captions.values_list("text", flat=True)) == ["a cat sitting", "a green cat"]
    assert len(callbacks) == 1  # one embedding task, queued after commit


def test_admin_rejects_a_file_that_is_not_an_image(admin_client_staff):
    data = {"image": SimpleUploadedFile("x.png", b"not an image"), "collection": "", **inline_data(["x"])}
    response = admin_client_staff.post("/admin/search/imageasset/add/", data)
    assert response.status_code == 400
    assert b"not a readable image" in response.content
    assert not ImageAsset.objects.exists() and not Caption.objects.exists()


def test_admin_rejects_the_same_caption_twice(admin_client_staff):
    data = {"image": SimpleUploadedFile("c.png", image_bytes()), "collection": "",
            **inline_data(["A dog", "a  dog"])}
    response = admin_client_staff.post("/admin/search/imageasset/add/", data)
    assert response.status_code == 400
    assert b"same caption" in response.content
    assert not ImageAsset.objects.exists()


def test_bulk_upload_of_a_zip_with_a_captions_file(admin_client_staff, django_capture_on_commit_callbacks):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("photos/a.png", image_bytes((200, 0, 0)))
        zf.writestr("photos/b.png", image_bytes((0, 0, 200)))
        zf.writestr("photos/broken.png", b"garbage")
        zf.writestr("captions.json", json.dumps({"a.png": ["a red one"], "b.png": ["a blue one", "blue"]}))
    upload = SimpleUploadedFile("set.zip", archive.getvalue(), content_type="application/zip")
    with django_capture_on_commit_callbacks():
        response = admin_client_staff.post("/admin/search/imageasset/bulk-upload/",
                                           {"archive": upload, "collection": "bulk"}, follow=True)
    assert response.status_code == 200
    assert ImageAsset.objects.filter(collection="bulk").count() == 2
    assert set(Caption.objects.values_list("text", flat=True)) == {"a red one", "a blue one", "blue"}
    messages = [str(m) for m in response.context["messages"]]
    assert any("2 images added" in m for m in messages)
    assert any("broken.png" in m and "not a readable image" in m for m in messages)


def test_bulk_upload_of_several_files_with_a_tsv_captions_file(admin_client_staff):
    files = [SimpleUploadedFile("one.png", image_bytes((1, 2, 3))), SimpleUploadedFile("two.png", image_bytes((9, 8, 7)))]
    captions = SimpleUploadedFile("captions.tsv", b"one.png\tthe first\ntwo.png\tthe second\n")
    response = admin_client_staff.post("/admin/search/imageasset/bulk-upload/",
                                       {"images": files, "captions": captions}, follow=True)
    assert response.status_code == 200
    assert set(Caption.objects.values_list("text", flat=True)) == {"the first", "the second"}


def test_bulk_upload_with_a_malformed_captions_file_stores_nothing(admin_client_staff):
    files = [SimpleUploadedFile("one.png", image_bytes())]
    captions = SimpleUploadedFile("captions.json", b"{not json")
    response = admin_client_staff.post("/admin/search/imageasset/bulk-upload/", {"images": files, "captions": captions})
    assert response.status_code == 400
    assert b"not valid JSON" in response.content
    assert not ImageAsset.objects.exists()


def test_the_admin_is_closed_to_non_staff(client, plain_user):
    client.force_login(plain_user)
    response = client.get("/admin/search/imageasset/bulk-upload/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
