"""Upload through the API, let a real Celery worker embed and index, then search."""

import numpy as np
import pytest

from embeddings.models import Embedding
from embeddings.services import encoder_for
from search import index_sync
from search.models import ImageAsset, IndexBuild
from tests.helpers import image_bytes, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

UPLOADS = [
    ((220, 20, 20), 0, ["a red square", "a bright red block"]),
    ((20, 20, 220), 1, ["a blue striped picture", "blue and yellow stripes"]),
    ((20, 180, 20), 3, ["a green striped square"]),
]


def upload(client, colour, pattern, captions):
    response = client.post(
        "/api/assets/",
        {"image": _file(image_bytes(colour, pattern=pattern)), "captions": captions},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    return response.json()


def _file(data, name="photo.png"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="image/png")


def indexed_ids(model, modality):
    build = IndexBuild.objects.filter(model=model, modality=modality, status="ready").order_by("-version").first()
    if build is None:
        return set()
    return set(index_sync.open_version(build).ids().tolist())


def test_uploaded_images_are_embedded_by_the_worker_and_searchable(
    tiny_model, staff_client, api_client, celery_worker_process
):
    assets = [upload(staff_client, *u) for u in UPLOADS]
    ids = {a["id"] for a in assets}

    wait_for(lambda: ImageAsset.objects.filter(pk__in=ids, status="embedded").count() == len(ids),
             message="the worker to embed the uploads")
    caption_ids = set(ImageAsset.objects.filter(pk__in=ids).values_list("captions__id", flat=True))
    wait_for(lambda: indexed_ids(tiny_model, "image") == ids and indexed_ids(tiny_model, "caption") == caption_ids,
             message="the indices to hold every image and caption")

    # Exactly one vector per image and per caption, however often tasks ran.
    assert Embedding.objects.filter(model=tiny_model, asset__isnull=False).count() == len(ids)
    assert Embedding.objects.filter(model=tiny_model, caption__isnull=False).count() == len(caption_ids)

    # (a) image→image with the same bytes finds that image first, with score ≈ 1.
    first = assets[0]
    response = api_client.post("/api/search/image/",
                               {"image": _file(image_bytes(UPLOADS[0][0], pattern=UPLOADS[0][1])), "k": 3},
                               format="multipart")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["images"][0]["asset"]["id"] == first["id"]
    assert body["images"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert body["model"] == tiny_model.name

    # (b) image→text returns its captions; scores match the stored vectors.
    image_vector = Embedding.objects.get(model=tiny_model, asset_id=first["id"]).array
    caption_vectors = {e.caption_id: e.array for e in Embedding.objects.filter(model=tiny_model, caption__isnull=False)}
    expected = sorted(caption_vectors, key=lambda cid: -float(image_vector @ caption_vectors[cid]))
    returned = [c["id"] for c in body["captions"]]
    assert returned == expected[:3]
    for hit in body["captions"]:
        assert hit["score"] == pytest.approx(float(image_vector @ caption_vectors[hit["id"]]), abs=1e-4)
    by_asset = api_client.post("/api/search/image/", {"asset_id": first["id"], "k": 10}, format="json").json()
    assert {c["text"] for c in by_asset["captions"] if c["asset_id"] == first["id"]} == set(UPLOADS[0][2])

    # (c) text→image scores are the dot products with the stored image vectors.
    response = api_client.post("/api/search/text/", {"query": "a red square", "k": 10}, format="json")
    assert response.status_code == 200, response.content
    results = response.json()["results"]
    assert {r["asset"]["id"] for r in results} == ids
    query = encoder_for(tiny_model).encode_texts(["a red square"])[0]
    stored = {e.asset_id: e.array for e in Embedding.objects.filter(model=tiny_model, asset__isnull=False)}
    for hit in results:
        assert hit["score"] == pytest.approx(float(query @ stored[hit["asset"]["id"]]), abs=1e-4)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert results[0]["asset"]["image_url"].startswith("http://testserver/media/images/")

    # (d) after DELETE the image is gone from every search at once, and from the index soon after.
    assert staff_client.delete(f"/api/assets/{first['id']}/").status_code == 204
    text_ids = {r["asset"]["id"] for r in api_client.post(
        "/api/search/text/", {"query": "a red square", "k": 10}, format="json").json()["results"]}
    assert first["id"] not in text_ids and text_ids == ids - {first["id"]}
    image_hits = api_client.post("/api/search/image/", {"asset_id": assets[1]["id"], "k": 10}, format="json").json()
    assert first["id"] not in {i["asset"]["id"] for i in image_hits["images"]}
    assert first["id"] not in {c["asset_id"] for c in image_hits["captions"]}
    wait_for(lambda: first["id"] not in indexed_ids(tiny_model, "image"), message="the index to drop the image")
    assert not np.isin(first["id"], list(indexed_ids(tiny_model, "image")))
