"""Filters inside the vector search, sorts among the matches, pages of filtered searches, and the
refusals of bad filters — through the search services, the API and the page, on both kinds of
backend (FAISS gets the ids of the matching rows, pgvector an SQL condition)."""

import datetime as dt

import pytest
from django.utils import timezone

from embeddings.models import EmbeddingModel
from search import asset_vectors, filters, index_sync, queries, serving
from search.curation import ingest_image
from search.models import Collection, ImageAsset
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db

SIZES = {"landscape": (64, 48), "portrait": (48, 64), "square": (56, 56)}
DAY = dt.datetime(2026, 3, 1, 12, tzinfo=dt.timezone.utc)


def _add(i, model, user):
    shape = ("landscape", "portrait", "square")[i % 3]
    collection = "rare" if i in (7, 19, 23, 31, 38) else ("north", "south")[i % 2]
    asset = ingest_image(
        image_bytes((7 * i % 256, 50 + 3 * i % 200, 255 - 5 * i % 256), size=SIZES[shape],
                    fmt="JPEG" if i % 4 == 0 else "PNG", pattern=i % 5),
        [f"picture {i}"], original_name=f"{chr(ord('a') + (i * 7) % 26)}-{i}.png",
        user=user if i % 5 == 0 else None, collection=collection,
    ).asset
    ImageAsset.objects.filter(pk=asset.pk).update(created=DAY + dt.timedelta(days=i), updated=timezone.now())
    asset_vectors.embed_asset(asset.pk, model)
    return ImageAsset.objects.get(pk=asset.pk)


@pytest.fixture(params=["faiss-flat", "pgvector"])
def gallery(request, tiny_model, settings, tmp_path, staff_user):
    settings.MEDIA_ROOT, settings.INDEX_DIR = tmp_path / "media", tmp_path / "indices"
    settings.VECTOR_INDEX_BACKEND, settings.VECTOR_INDEX_PARAMS = request.param, {}
    # Every hit a match: the pages are not cut short by "no good match".
    EmbeddingModel.objects.filter(pk=tiny_model.pk).update(logit_scale=0.0, logit_bias=5.0)
    assets = [_add(i, tiny_model, staff_user) for i in range(40)]
    index_sync.sync_indices(tiny_model)
    return assets


def _filters(user=None, **asked):
    return filters.parse_filters({name: v if isinstance(v, list) else [v] for name, v in asked.items()}, user)


def _ids(result):
    return [hit.asset.pk for hit in result.images]


def _shape(asset):
    return "landscape" if asset.width > asset.height else "portrait" if asset.width < asset.height else "square"


@pytest.mark.parametrize("asked, keeps", [
    ({"collection": "north"}, lambda a: a.collection == "north"),
    ({"collection": ["north", "rare"]}, lambda a: a.collection in ("north", "rare")),
    ({"exclude_collection": "north"}, lambda a: a.collection != "north"),
    ({"format": "jpeg"}, lambda a: a.format == "JPEG"),
    ({"orientation": "portrait"}, lambda a: _shape(a) == "portrait"),
    ({"orientation": "square"}, lambda a: _shape(a) == "square"),
    ({"min_width": "60"}, lambda a: a.width >= 60),
    ({"min_height": "50", "orientation": "landscape"}, lambda a: False),
    ({"date_from": "2026-03-11", "date_to": "2026-03-20"},
     lambda a: dt.date(2026, 3, 11) <= a.created.date() <= dt.date(2026, 3, 20)),
    ({"uploader": "curator"}, lambda a: a.uploaded_by_id is not None),
])
def test_a_filtered_search_is_the_ranking_of_the_matching_pictures(gallery, asked, keeps):
    everything = _ids(queries.search_text("a red square", k=40))
    by_id = {a.pk: a for a in gallery}
    expected = [i for i in everything if keeps(by_id[i])][:10]
    found = queries.search_text("a red square", k=10, filters=_filters(**asked))
    assert _ids(found) == expected
    if not expected:
        assert found.reason == "No picture matches these filters." and not found.no_good_match


def test_a_filter_keeping_five_pictures_in_forty_returns_all_five_from_one_index_search(gallery, tiny_model,
                                                                                          monkeypatch):
    served = serving.loaded_indices.served(EmbeddingModel.objects.get(pk=tiny_model.pk), "image")
    asked, search = [], served.index.search

    def counted(queries_, k, subset=None):
        asked.append((k, subset))
        return search(queries_, k, subset)

    monkeypatch.setattr(served.index, "search", counted)
    found = queries.search_text("a red square", k=5, filters=_filters(collection="rare"))
    assert sorted(_ids(found)) == sorted(a.pk for a in gallery if a.collection == "rare")
    # The filter went into the vector search: one search of k rows, not a short list widened.
    assert len(asked) == 1 and asked[0][0] == 5 and asked[0][1] is not None


def test_filtered_pages_walk_the_matching_pictures_without_repeats(gallery, api_client):
    cursor, walked = None, []
    while True:
        body = api_client.post("/api/search/text/", {"query": "a red square", "k": 4, "cursor": cursor,
                                                      "collection": ["south"]}, format="json").json()
        walked += [hit["asset"]["id"] for hit in body["results"]]
        assert all(hit["asset"]["collection"] == "south" for hit in body["results"])
        cursor = body["next"]
        if cursor is None:
            break
    assert len(walked) == len(set(walked)) == sum(a.collection == "south" for a in gallery)


def test_a_cursor_of_another_filter_is_refused(gallery, api_client):
    first = api_client.post("/api/search/text/", {"query": "a red square", "k": 4, "collection": ["south"]},
                            format="json").json()
    response = api_client.post("/api/search/text/", {"query": "a red square", "k": 4, "cursor": first["next"],
                                                     "collection": ["north"]}, format="json")
    assert response.status_code == 400 and "another search" in response.json()["detail"]


@pytest.mark.parametrize("sort, key, reverse", [
    ("newest", lambda a: (a.created, a.pk), True),
    ("oldest", lambda a: (a.created, a.pk), False),
    ("name", lambda a: (a.original_name.lower(), a.pk), False),
])
def test_matches_sorted_by_date_or_name_page_through_in_that_order(gallery, api_client, sort, key, reverse):
    cursor, walked = None, []
    while True:
        body = api_client.post("/api/search/text/", {"query": "a red square", "k": 7, "cursor": cursor,
                                                      "sort": sort, "exclude_collection": ["rare"]},
                               format="json").json()
        walked += [hit["asset"]["id"] for hit in body["results"]]
        cursor = body["next"]
        if cursor is None:
            break
    expected = sorted((a for a in gallery if a.collection != "rare"), key=key, reverse=reverse)
    assert walked == [a.pk for a in expected]


def test_sorting_keeps_only_the_matches_above_the_threshold(gallery, tiny_model):
    ranking = queries.search_text("a red square", k=40)
    scores = sorted(hit.score for hit in ranking.images)
    cut = scores[len(scores) // 2]
    # A probability that rises with the cosine: half of the pictures reach 0.5.
    EmbeddingModel.objects.filter(pk=tiny_model.pk).update(logit_scale=1000.0, logit_bias=-1000.0 * cut)
    found = queries.search_text("a red square", k=40, sort="newest")
    assert {h.asset.pk for h in found.images} == {h.asset.pk for h in ranking.images if h.score >= cut}
    assert [h.asset.created for h in found.images] == sorted((h.asset.created for h in found.images), reverse=True)


def test_similar_images_obey_the_filter_and_have_pages(gallery, api_client):
    source = gallery[0]
    body = api_client.post("/api/search/image/", {"asset_id": source.pk, "k": 3, "orientation": "square"},
                           format="json").json()
    assert body["captions"] and all(hit["asset"]["width"] == hit["asset"]["height"] for hit in body["images"])
    second = api_client.post("/api/search/image/", {"asset_id": source.pk, "k": 3, "orientation": "square",
                                                     "cursor": body["next"]}, format="json").json()
    assert second["captions"] == [] and len(second["images"]) == 3
    shown = [h["asset"]["id"] for h in body["images"] + second["images"]]
    assert len(set(shown)) == 6 and source.pk not in shown


def test_pictures_of_a_hidden_collection_never_come_back_to_those_who_may_not_see_them(gallery, api_client,
                                                                                       staff_client):
    Collection.objects.filter(name="north").update(visibility=Collection.Visibility.STAFF)
    anonymous = api_client.post("/api/search/text/", {"query": "a red square", "k": 40}, format="json").json()
    staff = staff_client.post("/api/search/text/", {"query": "a red square", "k": 40}, format="json").json()
    assert {h["asset"]["collection"] for h in anonymous["results"]} == {"south", "rare"}
    assert "north" in {h["asset"]["collection"] for h in staff["results"]}
    captions = api_client.post("/api/search/image/", {"asset_id": gallery[1].pk, "k": 40}, format="json").json()
    north = {a.pk for a in gallery if a.collection == "north"}
    assert captions["captions"] and not {c["asset_id"] for c in captions["captions"]} & north
    # Its name is as unknown to them as a name that does not exist.
    refused = api_client.post("/api/search/text/", {"query": "a red square", "collection": ["north"]}, format="json")
    assert refused.status_code == 400 and "no collection named 'north'" in refused.json()["detail"]
    hidden_source = api_client.post("/api/search/image/", {"asset_id": gallery[0].pk}, format="json")
    assert hidden_source.status_code == 404


def test_a_picture_moved_to_another_collection_is_found_there_at_the_next_refresh(gallery, settings):
    settings.SEARCH_FILTER_REFRESH = 0
    moved = next(a for a in gallery if a.collection == "north")
    assert moved.pk not in _ids(queries.search_text("a red square", k=40, filters=_filters(collection="south")))
    ImageAsset.objects.filter(pk=moved.pk).update(collection="south", updated=timezone.now())
    assert moved.pk in _ids(queries.search_text("a red square", k=40, filters=_filters(collection="south")))
    assert moved.pk not in _ids(queries.search_text("a red square", k=40, filters=_filters(collection="north")))


def test_a_table_not_yet_refreshed_never_lets_a_moved_picture_in(gallery, settings):
    settings.SEARCH_FILTER_REFRESH = 3600
    queries.search_text("a red square", k=40, filters=_filters(collection="north"))  # reads the table
    moved = next(a for a in gallery if a.collection == "north")
    ImageAsset.objects.filter(pk=moved.pk).update(collection="south", updated=timezone.now())
    assert moved.pk not in _ids(queries.search_text("a red square", k=40, filters=_filters(collection="north")))


@pytest.mark.parametrize("body, reason", [
    ({"collection": ["nowhere"]}, "no collection named 'nowhere'"),
    ({"exclude_collection": ["nowhere"]}, "no collection named 'nowhere'"),
    ({"collection": ["north"], "exclude_collection": ["north"]}, "both asked for and excluded"),
    ({"uploader": ["nobody"]}, "no user named 'nobody'"),
    ({"date_from": "2026-13-01"}, "date_from"),
    ({"date_from": "2026-03-20", "date_to": "2026-03-10"}, "is after date_to"),
    ({"format": ["XYZ"]}, "format"),
    ({"min_width": 0}, "min_width"),
    ({"min_height": "tall"}, "min_height"),
    ({"orientation": "round"}, "orientation"),
    ({"sort": "colour"}, "sort"),
    ({"min_score": 1.5}, "min_score"),
    ({"k": 0}, "k"),
    ({"collection": "north"}, "collection"),  # a list is expected
])
def test_bad_filters_are_refused_with_their_reason(gallery, api_client, body, reason):
    response = api_client.post("/api/search/text/", {"query": "a red square", **body}, format="json")
    assert response.status_code == 400
    assert reason in str(response.json())


def test_the_page_filters_sorts_and_links_similar_images_through_the_same_filter(gallery, client):
    page = client.get("/", {"q": "a red square", "collection": "rare", "sort": "name"})
    assert page.status_code == 200
    shown = [hit.asset for hit in page.context["result"].images]
    assert {a.collection for a in shown} == {"rare"}
    assert [a.original_name for a in shown] == sorted(a.original_name for a in shown)
    assert f"?similar={shown[0].pk}&amp;collection=rare" in page.content.decode()
    similar = client.get("/", {"similar": shown[0].pk, "collection": "rare"})
    assert {hit.asset.collection for hit in similar.context["result"].images} == {"rare"}


def test_the_page_says_why_a_filter_is_refused(gallery, client):
    page = client.get("/", {"q": "a red square", "date_from": "yesterday"})
    assert page.status_code == 400
    assert "date_from must be a date as YYYY-MM-DD" in page.content.decode()


def test_the_library_can_be_browsed_through_the_filters(gallery, client):
    page = client.get("/", {"browse": "1", "orientation": "portrait", "sort": "oldest"})
    shown = list(page.context["library"])
    assert shown and all(a.width < a.height for a in shown)
    assert [a.created for a in shown] == sorted(a.created for a in shown)
    empty = client.get("/", {"browse": "1", "min_width": "5000"})
    assert "No picture matches these filters." in empty.content.decode()


def test_the_schema_describes_the_filters(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    text = schema["components"]["schemas"]["TextSearchRequest"]["properties"]
    image = schema["components"]["schemas"]["ImageSearchRequest"]["properties"]
    for name in filters.FILTER_PARAMETERS:
        assert name in text and name in image
    ref = (text["sort"].get("$ref") or text["sort"]["allOf"][0]["$ref"]).rsplit("/", 1)[-1]
    assert set(schema["components"]["schemas"][ref]["enum"]) == set(filters.SORTS) and "cursor" in image


@pytest.mark.parametrize("level", ["public", "users", "staff"])
@pytest.mark.parametrize("who", ["anonymous", "user", "staff"])
def test_every_search_mode_obeys_the_visibility_of_a_collection(gallery, api_client, plain_user, staff_user,
                                                                who, level, client):
    Collection.objects.filter(name="north").update(visibility=level)
    sees = {"anonymous": {"public"}, "user": {"public", "users"}, "staff": {"public", "users", "staff"}}[who]
    if who != "anonymous":
        api_client.force_authenticate({"user": plain_user, "staff": staff_user}[who])
        client.force_login({"user": plain_user, "staff": staff_user}[who])
    north = {a.pk for a in gallery if a.collection == "north"}
    text = api_client.post("/api/search/text/", {"query": "a red square", "k": 40}, format="json").json()
    similar = api_client.post("/api/search/image/", {"asset_id": gallery[1].pk, "k": 40}, format="json").json()
    page = client.get("/", {"q": "a red square", "k": 40})
    found = ({h["asset"]["id"] for h in text["results"]} | {h["asset"]["id"] for h in similar["images"]}
             | {c["asset_id"] for c in similar["captions"]} | {h.asset.pk for h in page.context["result"].images})
    assert bool(found & north) == (level in sees)


def test_the_milvus_backend_takes_the_portal_filters_inside_its_search(tiny_model, settings, tmp_path, staff_user):
    if not settings.MILVUS_URI:
        pytest.skip("the milvus backend needs a Milvus server: run under bin/test or set MILVUS_URI")
    settings.MEDIA_ROOT, settings.INDEX_DIR = tmp_path / "media", tmp_path / "indices"
    settings.VECTOR_INDEX_BACKEND = "milvus"
    settings.VECTOR_INDEX_PARAMS = {"collection_prefix": "test_filters_"}
    EmbeddingModel.objects.filter(pk=tiny_model.pk).update(logit_scale=0.0, logit_bias=5.0)
    assets = [_add(i, tiny_model, staff_user) for i in range(40)]
    try:
        index_sync.sync_indices(tiny_model)
        rare = queries.search_text("a red square", k=5, filters=_filters(collection="rare"))
        assert sorted(_ids(rare)) == sorted(a.pk for a in assets if a.collection == "rare")
        everything = _ids(queries.search_text("a red square", k=40))
        portrait = {a.pk for a in assets if _shape(a) == "portrait"}
        found = queries.search_text("a red square", k=8, filters=_filters(orientation="portrait"))
        assert _ids(found) == [i for i in everything if i in portrait][:8]
    finally:
        for modality in index_sync.MODALITIES:
            index_sync._new_index(tiny_model, modality).drop()


def test_a_collection_made_private_in_the_admin_is_hidden_from_the_next_search(gallery, api_client, settings):
    settings.SEARCH_FILTER_REFRESH = 3600  # no refresh by time: the save itself must tell the searches
    before = api_client.post("/api/search/text/", {"query": "a red square", "k": 40}, format="json").json()
    assert "north" in {h["asset"]["collection"] for h in before["results"]}
    north = Collection.objects.get(name="north")
    north.visibility = Collection.Visibility.USERS
    north.save()
    after = api_client.post("/api/search/text/", {"query": "a red square", "k": 40}, format="json").json()
    assert "north" not in {h["asset"]["collection"] for h in after["results"]}
