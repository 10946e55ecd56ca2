"""Browsing without a query: the library newest first, in pages, and a page for each picture."""

import pytest
from django.test import override_settings

from search import asset_vectors, index_sync
from search.curation import ingest_image
from search.models import ImageAsset
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def library(tiny_model, settings, tmp_path):
    settings.MEDIA_ROOT, settings.INDEX_DIR = tmp_path / "media", tmp_path / "indices"
    assets = []
    for i in range(3):
        asset = ingest_image(image_bytes((60 * i, 90, 200 - 50 * i), pattern=i), [f"picture number {i}"]).asset
        asset_vectors.embed_asset(asset.pk, tiny_model)
        assets.append(asset)
    index_sync.sync_indices(tiny_model)
    return assets


def test_the_home_page_without_a_query_shows_the_library_newest_first(client, library):
    html = client.get("/").content.decode()
    assert "3 pictures, newest first" in html
    links = [html.index(f'href="/assets/{asset.pk}/"') for asset in library]
    assert links == sorted(links, reverse=True)  # the last upload comes first


def test_the_library_comes_in_pages(client, library, monkeypatch):
    from search import views

    monkeypatch.setattr(views, "LIBRARY_PAGE", 2)
    first, second = client.get("/").content.decode(), client.get("/", {"page": 2}).content.decode()
    assert "page 1 of 2" in first and 'rel="next"' in first and f"/assets/{library[0].pk}/" not in first
    assert "page 2 of 2" in second and f"/assets/{library[0].pk}/" in second
    assert "page 2 of 2" in client.get("/", {"page": "99"}).content.decode()  # past the end: the last page


def test_an_asset_page_shows_the_picture_its_captions_metadata_and_neighbours(client, library):
    asset = library[1]
    response = client.get(f"/assets/{asset.pk}/")
    html = response.content.decode()
    assert response.status_code == 200
    assert f'src="{asset.file.url}"' in html and "picture number 1" in html
    assert f"{asset.width} × {asset.height} px" in html and "PNG" in html and "tiny-test-siglip" in html
    neighbours = html.split("Similar images", 1)[1]
    assert f"/assets/{library[0].pk}/" in neighbours and f"/assets/{library[2].pk}/" in neighbours
    assert f'href="/assets/{asset.pk}/"' not in neighbours  # not its own neighbour
    assert "Edit in the admin" not in html


def test_staff_see_an_edit_link(client, staff_user, library):
    client.force_login(staff_user)
    html = client.get(f"/assets/{library[0].pk}/").content.decode()
    assert f'href="/admin/search/imageasset/{library[0].pk}/change/"' in html


def test_a_picture_not_embedded_yet_says_so_and_an_unknown_one_is_404(client, tiny_model, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    pending = ingest_image(image_bytes((1, 2, 3)), ["waiting"]).asset
    assert ImageAsset.objects.get(pk=pending.pk).status == "pending"
    html = client.get(f"/assets/{pending.pk}/").content.decode()
    assert "appear once the picture is embedded" in html
    assert client.get("/assets/987654/").status_code == 404


@override_settings(SEARCH_REQUIRES_LOGIN=True)
def test_with_login_required_the_library_and_asset_pages_send_visitors_to_log_in(client, library):
    for url in ("/", f"/assets/{library[0].pk}/"):
        response = client.get(url)
        assert response.status_code == 302 and "login" in response["Location"]


def test_the_search_box_suggests_a_query_the_active_model_knows(client, tiny_model):
    assert 'placeholder="a man riding a surfboard"' in client.get("/").content.decode()
    from embeddings.models import EmbeddingModel

    EmbeddingModel.objects.filter(pk=tiny_model.pk).update(kind=EmbeddingModel.Kind.DEMO)
    assert 'placeholder="a small red circle"' in client.get("/").content.decode()


def test_asset_pages_share_the_search_allowance(client, library, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"search_anon": "2/minute", "search_user": "3/minute", "upload": None}}
    codes = [client.get(f"/assets/{library[0].pk}/", REMOTE_ADDR="203.0.113.20").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = client.get(f"/assets/{library[0].pk}/", REMOTE_ADDR="203.0.113.20")
    assert "Too many searches" in limited.content.decode() and int(limited["Retry-After"]) > 0
