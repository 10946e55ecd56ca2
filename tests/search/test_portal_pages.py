"""The HTML portal: text search, photo search, similar images, clear messages."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from search import asset_vectors, index_sync
from search.curation import ingest_image
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def indexed_assets(tiny_model, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.INDEX_DIR = tmp_path / "indices"
    assets = []
    for colour, captions in [((250, 0, 0), ["a red square"]), ((0, 0, 250), ["a blue square", "blue"])]:
        asset = ingest_image(image_bytes(colour), captions).asset
        asset_vectors.embed_asset(asset.pk, tiny_model)
        assets.append(asset)
    index_sync.sync_indices(tiny_model)
    return assets


def test_home_page_offers_text_and_photo_search(client, tiny_model):
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="q"' in html and 'type="file"' in html and 'enctype="multipart/form-data"' in html


def test_text_search_shows_matching_images_with_scores_and_captions(client, indexed_assets):
    response = client.get("/", {"q": "a red square"})
    assert response.status_code == 200
    html = response.content.decode()
    for asset in indexed_assets:
        assert asset.file.url in html
    assert "a blue square" in html and "ms · model tiny-test-siglip" in html


def test_photo_search_shows_captions_and_similar_images(client, indexed_assets):
    upload = SimpleUploadedFile("q.png", image_bytes((250, 0, 0)))
    response = client.post("/", {"image": upload})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Best captions" in html and "Similar images" in html
    assert html.index(indexed_assets[0].file.url) < html.index(indexed_assets[1].file.url)


def test_similar_images_link_searches_by_an_asset(client, indexed_assets):
    response = client.get("/", {"similar": indexed_assets[1].pk})
    assert response.status_code == 200
    assert "Similar images" in response.content.decode()


def test_similar_images_show_the_picture_searched_from_and_leave_it_out_of_the_results(client, indexed_assets):
    source = indexed_assets[1]
    response = client.get("/", {"similar": source.pk})
    html = response.content.decode()
    assert f'<figure class="source">\n      <img src="{source.file.url}"' in html
    results = html.split("Similar images", 1)[1]
    assert f"?similar={source.pk}\"" not in results
    assert len(response.context["result"].images) == len(indexed_assets) - 1
    assert "This field is required" not in html  # the link carries no text query


def test_empty_text_query_shows_a_message_not_an_error_page(client, tiny_model):
    response = client.get("/", {"q": "   "})
    assert response.status_code == 400
    assert "This field is required" in response.content.decode()


def test_a_broken_photo_shows_a_message(client, tiny_model):
    response = client.post("/", {"image": SimpleUploadedFile("q.png", b"nope")})
    assert response.status_code == 400
    assert "not a readable image" in response.content.decode()


def test_unknown_similar_asset_is_404_with_a_message(client, tiny_model):
    response = client.get("/", {"similar": 424242})
    assert response.status_code == 404
    assert "424242" in response.content.decode()


def test_random_model_is_flagged_as_meaningless(client, tiny_model):
    assert tiny_model.kind == "random"
    assert "results are meaningless" in client.get("/").content.decode()
