"""A search reads little: the model and its index versions in one query, the hit rows
and their captions in another; its JSON is the documented schema's."""

from __future__ import annotations

import pytest

from embeddings import services
from search import indexing, queries
from search.api import serializers as s
from search.ingest import ingest_image
from search.models import ImageAsset

from .conftest import image_bytes
from .test_encoder import jpeg_bytes, two_colour_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def isolated(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.INDEX_DIR = tmp_path / "indices"


def add(colour, captions):
    asset = ingest_image(image_bytes(colour), list(captions), queue_embedding=False).asset
    services.embed_asset(asset.pk)
    return asset


@pytest.fixture
def gallery(tiny_model, isolated):
    assets = [
        add((200, 30, 30), ["a red square", "something red"]),
        add((30, 200, 30), ["a green field"]),
        add((30, 30, 200), []),
    ]
    indexing.sync_indices(tiny_model)
    return assets


def test_a_repeated_text_search_makes_two_database_queries(gallery, django_assert_num_queries):
    queries.search_text("a red square", k=3)  # loads the index, caches the query embedding
    with django_assert_num_queries(2):  # active model + index versions; rows + captions
        result = queries.search_text("a red square", k=3)
    assert len(result.images) == 3


def test_hits_carry_their_captions_in_caption_order(gallery):
    result = queries.search_text("a red square", k=3)
    by_id = {hit.asset.pk: hit.asset.caption_texts for hit in result.images}
    assert by_id[gallery[0].pk] == ["a red square", "something red"]
    assert by_id[gallery[1].pk] == ["a green field"]
    assert by_id[gallery[2].pk] == []


def _documented(serializer_class, payload, request):
    """What the DRF serializers describing the answer give, from freshly read rows
    (captions through the relation, not the search's gathered texts)."""
    fresh = ImageAsset.objects.prefetch_related("captions").in_bulk([hit.asset.pk for hit in payload["images"]])
    hits = [queries.ImageHit(fresh[hit.asset.pk], hit.score) for hit in payload["images"]]
    data = {**payload, "images": hits}
    if "results" in serializer_class().fields:
        data["results"] = data.pop("images")
    return serializer_class(data, context={"request": request}).data


def test_text_search_json_is_what_the_schema_describes(gallery, api_client):
    response = api_client.post("/api/search/text/", {"query": "a red square", "k": 3}, format="json")
    assert response.status_code == 200
    body = response.json()
    result = queries.search_text("a red square", k=3)
    result.took_ms = body["took_ms"]
    documented = _documented(
        s.TextSearchResponseSerializer,
        {"images": result.images, "took_ms": result.took_ms, "model": result.model.name},
        response.wsgi_request,
    )
    assert body == documented
    assert body["results"][0]["asset"]["image_url"].startswith("http://testserver/")


def test_image_search_json_is_what_the_schema_describes(gallery, api_client):
    response = api_client.post("/api/search/image/", {"asset_id": gallery[0].pk, "k": 3}, format="json")
    assert response.status_code == 200
    body = response.json()
    result = queries.search_asset(gallery[0].pk, k=3)
    documented = _documented(
        s.ImageSearchResponseSerializer,
        {"captions": result.captions, "images": result.images, "took_ms": body["took_ms"],
         "model": result.model.name},
        response.wsgi_request,
    )
    assert body == documented
    assert {c["text"] for c in body["captions"]} <= {"a red square", "something red", "a green field"}


def test_a_new_index_version_is_served_by_the_next_search(gallery, tiny_model):
    before = {hit.asset.pk for hit in queries.search_text("a colour", k=10).images}
    late = add((240, 240, 20), ["a yellow square"])
    assert late.pk not in before
    indexing.sync_indices(tiny_model)
    after = {hit.asset.pk for hit in queries.search_text("a colour", k=10).images}
    assert after == before | {late.pk}


def _jpeg_turned_by_exif() -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    return jpeg_bytes(two_colour_image(40, 20), exif=exif.tobytes())


@pytest.mark.parametrize("data", [_jpeg_turned_by_exif(), image_bytes(fmt="GIF"), image_bytes(fmt="PNG")],
                         ids=["jpeg-exif", "gif", "png"])
def test_the_checked_upload_is_the_picture_the_encoder_would_decode(data):
    import numpy as np

    from embeddings.siglip import load_image
    from search.ingest import inspect_image

    kept = inspect_image(data, keep_decoded=True).image
    assert inspect_image(data).image is None
    np.testing.assert_array_equal(np.asarray(load_image(kept)), np.asarray(load_image(data)))
    if data[:2] == b"\xff\xd8":
        assert load_image(kept).size == (20, 40), "EXIF orientation kept"
