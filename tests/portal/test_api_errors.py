"""Bad requests get a 4xx with a reason, and nothing is stored."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from search.models import Caption, ImageAsset

pytestmark = pytest.mark.django_db


def png(data, name="x.png"):
    return SimpleUploadedFile(name, data, content_type="image/png")


@pytest.mark.parametrize("payload, reason", [
    ({"query": ""}, "query"),
    ({"query": "   "}, "query"),
    ({}, "query"),
    ({"query": "a dog", "k": 0}, "k"),
    ({"query": "a dog", "k": 101}, "k"),
    ({"query": "a dog", "k": "ten"}, "k"),
])
def test_text_search_rejects_bad_queries_with_a_reason(api_client, tiny_model, payload, reason):
    response = api_client.post("/api/search/text/", payload, format="json")
    assert response.status_code == 400
    assert reason in response.json()


def test_text_search_without_an_active_model_is_503_with_a_reason(api_client, clean_state):
    response = api_client.post("/api/search/text/", {"query": "a dog"}, format="json")
    assert response.status_code == 503
    assert "ensure_model" in response.json()["detail"]


def test_image_search_for_an_unknown_asset_is_404(api_client, tiny_model):
    response = api_client.post("/api/search/image/", {"asset_id": 987654}, format="json")
    assert response.status_code == 404
    assert "987654" in response.json()["detail"]


def test_image_search_needs_exactly_one_of_image_or_asset_id(api_client, tiny_model, make_image):
    response = api_client.post("/api/search/image/", {"k": 3}, format="multipart")
    assert response.status_code == 400
    both = api_client.post("/api/search/image/", {"image": png(make_image()), "asset_id": 1}, format="multipart")
    assert both.status_code == 400


def test_image_search_rejects_a_file_that_is_not_an_image(api_client, tiny_model):
    response = api_client.post("/api/search/image/", {"image": png(b"%PDF-1.4 not an image")}, format="multipart")
    assert response.status_code == 400
    assert "not a readable image" in response.json()["detail"]


def test_upload_needs_a_staff_account(api_client, plain_user, make_image):
    anonymous = api_client.post("/api/assets/", {"image": png(make_image())}, format="multipart")
    assert anonymous.status_code in (401, 403)
    api_client.force_authenticate(plain_user)
    visitor = api_client.post("/api/assets/", {"image": png(make_image())}, format="multipart")
    assert visitor.status_code == 403
    assert not ImageAsset.objects.exists()


def test_delete_needs_a_staff_account(api_client, staff_client, plain_user, make_image):
    asset_id = staff_client.post("/api/assets/", {"image": png(make_image())}, format="multipart").json()["id"]
    assert api_client.delete(f"/api/assets/{asset_id}/").status_code in (401, 403)
    api_client.force_authenticate(plain_user)
    assert api_client.delete(f"/api/assets/{asset_id}/").status_code == 403
    assert ImageAsset.objects.filter(pk=asset_id).exists()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a readable image"),
    (b"hello world", "not a readable image"),
])
def test_upload_rejects_broken_files_and_stores_nothing(staff_client, data, reason, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    response = staff_client.post("/api/assets/", {"image": png(data), "captions": ["x"]}, format="multipart")
    assert response.status_code == 400
    assert reason in str(response.json())
    assert not ImageAsset.objects.exists() and not Caption.objects.exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_upload_rejects_a_truncated_jpeg(staff_client, make_image):
    data = make_image(fmt="JPEG", size=(300, 200), pattern=2)
    response = staff_client.post("/api/assets/", {"image": png(data[: len(data) // 2], "t.jpg")}, format="multipart")
    assert response.status_code == 400
    assert not ImageAsset.objects.exists()


def test_upload_rejects_images_over_the_pixel_cap(staff_client, make_image, settings):
    settings.UPLOAD_MAX_PIXELS = 1000
    response = staff_client.post("/api/assets/", {"image": png(make_image(size=(100, 100)))}, format="multipart")
    assert response.status_code == 400
    assert "pixels" in response.json()["detail"]


def test_reuploading_the_same_bytes_returns_the_existing_asset(staff_client, make_image):
    data = make_image()
    first = staff_client.post("/api/assets/", {"image": png(data), "captions": ["a red thing"]}, format="multipart")
    again = staff_client.post("/api/assets/", {"image": png(data, "other-name.png"), "captions": ["A  red thing", "new words"]},
                              format="multipart")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert sorted(again.json()["captions"]) == ["a red thing", "new words"]
    assert ImageAsset.objects.count() == 1


def test_files_are_stored_under_generated_names_only(staff_client, make_image):
    response = staff_client.post("/api/assets/", {"image": png(make_image(), "../../etc/passwd.png")}, format="multipart")
    asset = ImageAsset.objects.get(pk=response.json()["id"])
    assert asset.file.name == f"images/{asset.sha256[:2]}/{asset.sha256}.png"
    assert asset.original_name == "passwd.png"


def test_caption_normalised_text_is_stripped_collapsed_and_lower_cased(staff_client, make_image):
    staff_client.post("/api/assets/", {"image": png(make_image()), "captions": ["  A Dog\t on  the\nBEACH "]},
                      format="multipart")
    assert Caption.objects.get().normalized_text == "a dog on the beach"
    assert Caption.objects.get().text == "A Dog\t on  the\nBEACH"


def test_openapi_schema_lists_the_endpoints(api_client):
    response = api_client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for route in ["/api/search/text/", "/api/search/image/", "/api/assets/", "/api/assets/{id}/"]:
        assert route in paths


def test_a_very_long_query_is_truncated_not_refused(api_client, client, tiny_model):
    words = "a red square next to a blue circle " * 600  # ~21,000 characters
    response = api_client.post("/api/search/text/", {"query": words, "k": 5}, format="json")
    assert response.status_code == 200, response.content[:300]
    assert client.get("/", {"q": words[:6000]}).status_code == 200
