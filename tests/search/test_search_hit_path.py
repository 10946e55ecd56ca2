"""A search reads little: one query for the hit rows and their captions, which also checks
that the model and index versions it started from still serve; its JSON is the
documented schema's."""

from __future__ import annotations

import pytest

from embeddings import services
from search import asset_vectors, filters, index_sync, queries, serving
from search.api import serializers as s
from search.curation import ingest_image
from search.models import ImageAsset
from tests.helpers import image_bytes, jpeg_bytes, two_colour_image

pytestmark = pytest.mark.django_db


@pytest.fixture
def isolated(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.INDEX_DIR = tmp_path / "indices"


def add(colour, captions):
    asset = ingest_image(image_bytes(colour), list(captions)).asset
    asset_vectors.embed_asset(asset.pk)
    return asset


@pytest.fixture
def gallery(tiny_model, isolated):
    assets = [
        add((200, 30, 30), ["a red square", "something red"]),
        add((30, 200, 30), ["a green field"]),
        add((30, 30, 200), []),
    ]
    index_sync.sync_indices(tiny_model)
    return assets


def test_a_repeated_text_search_makes_one_database_query(gallery, django_assert_num_queries):
    queries.search_text("a red square", k=3)  # loads the index, caches the query embedding
    # Rows + captions, checking that the remembered model and index versions still serve.
    with django_assert_num_queries(1):
        result = queries.search_text("a red square", k=3)
    assert len(result.images) == 3


def another_model(tiny_checkpoint):
    return services.register_model(str(tiny_checkpoint), name="tiny-test-siglip-b", kind="random")


def test_a_search_after_another_model_is_activated_is_answered_by_it(gallery, tiny_model, tiny_checkpoint):
    assert queries.search_text("a red square", k=3).model.pk == tiny_model.pk
    other = another_model(tiny_checkpoint)
    asset_vectors.embed_asset(gallery[0].pk, model=other)
    index_sync.sync_indices(other)
    result = queries.search_text("a red square", k=3)
    assert result.model.pk == other.pk
    assert [hit.asset.pk for hit in result.images] == [gallery[0].pk]


def test_a_search_that_fetched_no_row_still_checks_its_model(gallery, tiny_model, tiny_checkpoint):
    another_model(tiny_checkpoint)  # active, and without an index yet
    assert queries.search_text("a red square", k=3).images == []
    tiny_model.activate()
    result = queries.search_text("a red square", k=3)
    assert result.model.pk == tiny_model.pk and len(result.images) == 3


def test_a_remembered_model_that_fails_before_its_check_is_read_again(gallery, tiny_model, tiny_checkpoint):
    queries.search_text("a red square", k=3)
    other = another_model(tiny_checkpoint)
    late = add((240, 240, 20), ["a yellow square"])  # embedded by the active model only
    index_sync.sync_indices(other)
    # The remembered model has no vector for it; the one now active has.
    result = queries.search_asset(late.pk, k=3)
    assert result.model.pk == other.pk
    assert [hit.caption.asset_id for hit in result.captions] == [late.pk]  # the only captions `other` indexed
    assert result.images == []  # nor any image but `late`, which is not its own neighbour


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
    hits = [queries.ImageHit(fresh[hit.asset.pk], hit.score, hit.probability, hit.match) for hit in payload["images"]]
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
        {"images": result.images, "took_ms": result.took_ms, "model": result.model.name,
         "no_good_match": result.no_good_match, "reason": result.reason},
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
         "model": result.model.name, "no_good_match": result.no_good_match, "reason": result.reason},
        response.wsgi_request,
    )
    assert body == documented
    assert {c["text"] for c in body["captions"]} <= {"a red square", "something red", "a green field"}


def test_a_new_index_version_is_served_by_the_next_search(gallery, tiny_model):
    before = {hit.asset.pk for hit in queries.search_text("a colour", k=10).images}
    late = add((240, 240, 20), ["a yellow square"])
    assert late.pk not in before
    index_sync.sync_indices(tiny_model)
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

    from embeddings.core.siglip import load_image
    from search.validation import inspect_image

    kept = inspect_image(data, keep_decoded=True).image
    assert inspect_image(data).image is None
    np.testing.assert_array_equal(np.asarray(load_image(kept)), np.asarray(load_image(data)))
    if data[:2] == b"\xff\xd8":
        assert load_image(kept).size == (20, 40), "EXIF orientation kept"


# --- The result cache: neighbours of a vector already asked about, per index version ----


def count_index_searches(monkeypatch, modality="image") -> list:
    served = serving.loaded_indices.served(serving.serving_model(), modality)
    calls = []
    original = served.index.search

    def counting(vectors, k):
        calls.append(k)
        return original(vectors, k)

    monkeypatch.setattr(served.index, "search", counting)
    return calls


def test_a_repeated_search_takes_its_neighbours_from_the_result_cache(gallery, tiny_model, monkeypatch):
    first = queries.search_text("a red square", k=3)
    calls = count_index_searches(monkeypatch)
    again = queries.search_text("A red square!", k=3)
    assert calls == [] and again.timings["result_cache"] == serving.HIT_LOCAL
    assert first.timings["result_cache"] == serving.MISS
    assert [(h.asset.pk, h.score) for h in again.images] == [(h.asset.pk, h.score) for h in first.images]
    other_k = queries.search_text("a red square", k=2)  # another k is another entry
    assert calls == [2] and other_k.timings["result_cache"] == serving.MISS


def test_a_repeat_in_another_web_process_takes_embedding_and_neighbours_from_redis(
        gallery, tiny_model, monkeypatch):
    first = queries.search_text("a green field", k=2)
    serving.write_behind.flush()
    # Another process: empty local levels, the same Redis.
    serving.query_cache.clear()
    monkeypatch.setattr(queries, "loaded_indices", serving.LoadedIndices())
    calls = count_index_searches(monkeypatch)
    again = queries.search_text("a green field", k=2)
    assert again.timings["query_cache"] == serving.HIT_SHARED
    assert again.timings["result_cache"] == serving.HIT_SHARED and calls == []
    assert [(h.asset.pk, h.score) for h in again.images] == [(h.asset.pk, h.score) for h in first.images]


def test_a_deleted_image_leaves_cached_results_at_once(gallery, tiny_model):
    from search.curation import delete_assets

    first = queries.search_text("a red square", k=2)
    gone = first.images[0].asset.pk
    delete_assets(ImageAsset.objects.filter(pk=gone))
    again = queries.search_text("a red square", k=2)
    # The cached two lost one row, so the search widened past the cache to fill k.
    assert gone not in {hit.asset.pk for hit in again.images}
    assert len(again.images) == 2 and again.timings["result_cache"] == serving.MISS


def test_a_new_index_version_starts_with_an_empty_result_cache(gallery, tiny_model):
    queries.search_text("a colour", k=10)
    assert queries.search_text("a colour", k=10).timings["result_cache"] == serving.HIT_LOCAL
    late = add((240, 240, 20), ["a yellow square"])
    index_sync.sync_indices(tiny_model)
    after = queries.search_text("a colour", k=10)
    assert after.timings["result_cache"] == serving.MISS
    assert late.pk in {hit.asset.pk for hit in after.images}


def test_the_same_uploaded_photo_again_is_a_result_cache_hit(gallery):
    photo = image_bytes((200, 30, 30), pattern=2)
    first = queries.search_image(photo, k=2)
    again = queries.search_image(photo, k=2)
    assert first.timings["result_cache"] == serving.MISS
    assert again.timings["result_cache"] == serving.HIT_LOCAL
    assert [c.caption.pk for c in again.captions] == [c.caption.pk for c in first.captions]


def test_long_neighbour_lists_are_not_cached(gallery, tiny_model, monkeypatch):
    monkeypatch.setattr(serving, "RESULT_CACHE_MAX_K", 2)
    queries.search_text("a red square", k=3)
    assert queries.search_text("a red square", k=3).timings["result_cache"] == serving.MISS
    queries.search_text("a red square", k=2)
    assert queries.search_text("a red square", k=2).timings["result_cache"] == serving.HIT_LOCAL


def test_result_cache_size_zero_turns_it_off(gallery, settings):
    settings.SEARCH_RESULT_CACHE_SIZE = 0
    queries.search_text("a red square", k=3)
    serving.write_behind.flush()
    assert queries.search_text("a red square", k=3).timings["result_cache"] == serving.MISS


def test_the_api_says_where_the_neighbours_came_from(gallery, api_client):
    body = {"query": "a green field", "k": 2}
    first = api_client.post("/api/search/text/", body, format="json")
    again = api_client.post("/api/search/text/", body, format="json")
    assert 'results;desc="miss"' in first["Server-Timing"]
    assert 'results;desc="local"' in again["Server-Timing"]
    assert again.json()["results"] == first.json()["results"]


def test_warm_up_loads_the_towers_indices_and_scan_copies_a_first_search_needs(gallery, tiny_model, monkeypatch):
    from embeddings.core import siglip

    siglip.clear_encoder_cache()
    fresh = serving.LoadedIndices()
    monkeypatch.setattr(queries, "loaded_indices", fresh)
    assert queries.warm_up()
    from django.conf import settings

    encoder = siglip.get_encoder(tiny_model.source, device=settings.SIGLIP_DEVICE, backend=settings.SIGLIP_INFERENCE)
    assert encoder.is_loaded  # by the warm-up: nothing else loaded it since the cache was cleared
    served = fresh.served(serving.serving_model(), "image")
    # The float16 scan copy of the version's base segment is made.
    assert served is not None and served.index.base_index._half is not None
    assert filters.facets.rows == len(gallery)  # the filters' table is read


def test_warm_up_without_an_active_model_lets_the_worker_start(db, clean_state):
    assert queries.warm_up() is False


def test_each_web_worker_warms_up_in_the_background(monkeypatch):
    import threading

    from django.urls import clear_url_caches, get_resolver

    from portal import gunicorn

    ran = threading.Event()
    monkeypatch.setattr(queries, "warm_up", ran.set)
    clear_url_caches()
    gunicorn.post_worker_init(worker=None).join(timeout=30)
    assert ran.is_set()
    assert "url_patterns" in vars(get_resolver()), "the URL configuration is loaded before the first request"


def test_images_similar_to_an_asset_leave_that_asset_out(gallery, api_client):
    response = api_client.post("/api/search/image/", {"asset_id": gallery[0].pk, "k": 3}, format="json")
    ids = [hit["asset"]["id"] for hit in response.json()["images"]]
    assert response.status_code == 200
    assert sorted(ids) == sorted(asset.pk for asset in gallery[1:])  # the other two of three
