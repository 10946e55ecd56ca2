"""Pages of a text search: signed cursors, a stable order, no repeats, and clear refusals."""

import time

import pytest

from embeddings.models import EmbeddingModel
from search import asset_vectors, index_sync, queries
from search.curation import ingest_image
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


def add(i, model):
    asset = ingest_image(image_bytes((7 * i % 256, 50 + 3 * i % 200, 255 - 5 * i % 256), pattern=i % 5),
                         [f"picture {i}"]).asset
    asset_vectors.embed_asset(asset.pk, model)
    return asset


@pytest.fixture
def gallery(tiny_model, settings, tmp_path):
    settings.MEDIA_ROOT, settings.INDEX_DIR = tmp_path / "media", tmp_path / "indices"
    # Every hit a match: the pages are not cut short by "no good match".
    EmbeddingModel.objects.filter(pk=tiny_model.pk).update(logit_scale=0.0, logit_bias=5.0)
    assets = [add(i, tiny_model) for i in range(30)]
    index_sync.sync_indices(tiny_model)
    return assets


def pages(api_client, query, k, **extra):
    cursor, seen = None, []
    while True:
        body = api_client.post("/api/search/text/", {"query": query, "k": k, "cursor": cursor, **extra},
                               format="json").json()
        seen.append([hit["asset"]["id"] for hit in body["results"]])
        cursor = body["next"]
        if cursor is None:
            return seen


def test_pages_follow_the_ranking_without_repeats_to_the_end(gallery, api_client):
    ranking = [hit.asset.pk for hit in queries.search_text("a red square", k=30).images]
    walked = pages(api_client, "a red square", 10)
    assert [len(page) for page in walked] == [10, 10, 10]
    assert sum(walked, []) == ranking


def test_a_picture_added_between_pages_is_never_shown_twice(gallery, tiny_model, api_client):
    first = api_client.post("/api/search/text/", {"query": "a red square", "k": 10}, format="json").json()
    add(99, tiny_model)
    index_sync.sync_indices(tiny_model)
    second = api_client.post("/api/search/text/", {"query": "a red square", "k": 10, "cursor": first["next"]},
                             format="json").json()
    shown = [h["asset"]["id"] for h in first["results"]] + [h["asset"]["id"] for h in second["results"]]
    assert len(second["results"]) == 10 and len(set(shown)) == 20


def test_results_stop_at_the_configured_maximum(gallery, api_client, settings):
    settings.SEARCH_MAX_RESULTS = 20
    assert [len(page) for page in pages(api_client, "a red square", 10)] == [10, 10]


@pytest.mark.parametrize("how, reason", [
    ("forged", "not one this server gave"),
    ("other query", "another search"),
    ("expired", "expired"),
])
def test_a_bad_cursor_is_refused_with_its_reason(gallery, api_client, settings, how, reason):
    first = api_client.post("/api/search/text/", {"query": "a red square", "k": 5}, format="json").json()
    cursor, query = first["next"], "a red square"
    if how == "forged":
        cursor = cursor[:-3] + ("AAA" if not cursor.endswith("AAA") else "BBB")
    elif how == "other query":
        query = "a blue circle"
    else:
        settings.SEARCH_CURSOR_MAX_AGE = 0
        time.sleep(1.1)
    response = api_client.post("/api/search/text/", {"query": query, "k": 5, "cursor": cursor}, format="json")
    assert response.status_code == 400 and reason in response.json()["detail"]


def test_the_page_links_to_the_next_page_without_javascript(gallery, client):
    first = client.get("/", {"q": "a red square", "k": 10})
    more = first.context["more_url"]
    assert 'rel="next"' in first.content.decode() and "cursor=" in more
    second = client.get("/" + more)
    ids = lambda response: {hit.asset.pk for hit in response.context["result"].images}  # noqa: E731
    assert second.status_code == 200 and len(ids(second)) == 10 and not ids(first) & ids(second)
    forged = client.get("/", {"q": "a red square", "cursor": "nonsense"})
    assert forged.status_code == 400 and "not one this server gave" in forged.content.decode()


def test_a_search_with_no_good_match_has_no_second_page(gallery, tiny_model, api_client):
    EmbeddingModel.objects.filter(pk=tiny_model.pk).update(logit_scale=1.0, logit_bias=-50.0)
    body = api_client.post("/api/search/text/", {"query": "🔴", "k": 10}, format="json").json()
    assert body["no_good_match"] is True and body["next"] is None and len(body["results"]) == 10
