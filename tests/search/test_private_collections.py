"""Private collections: a collection is public, for logged-in users or for staff, and every
listing, page, API read and media file obeys it; the portal's own login and logout."""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from django.apps import apps
from django.contrib.auth.models import AnonymousUser
from django.urls import reverse
from django.utils import timezone
from django.utils.http import http_date

from search import curation, visibility
from search.collection_views import COLLECTION_PAGE
from search.models import Collection, ImageAsset, collection_from_slug, collection_slug
from tests.conftest import ROOT
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db

V = Collection.Visibility
COLOURS = itertools.count(1)


def picture() -> bytes:
    """Bytes no other picture of the test has (uploads are deduplicated by content)."""
    c = next(COLOURS)
    return image_bytes((c % 256, c // 256, 77))


@pytest.fixture
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.MEDIA_ACCEL_REDIRECT, settings.MEDIA_SENDFILE = "", False
    return settings.MEDIA_ROOT


def make_collection(name: str, level: str, n: int = 1) -> list[ImageAsset]:
    Collection.objects.update_or_create(name=name, defaults={"visibility": level})
    return [curation.ingest_image(picture(), [f"{name} picture {i}"], collection=name).asset for i in range(n)]


@pytest.fixture
def world(media):
    """One picture in each of a public, a users-only and a staff-only collection."""
    return {level: make_collection(f"{level}-pictures", level)[0] for level in (V.PUBLIC, V.USERS, V.STAFF)}


@pytest.fixture
def viewers(plain_user, staff_user):
    return {"anonymous": AnonymousUser(), "user": plain_user, "staff": staff_user}


SEES = {"anonymous": {V.PUBLIC}, "user": {V.PUBLIC, V.USERS}, "staff": {V.PUBLIC, V.USERS, V.STAFF}}


def logged_in(client, who, viewers):
    if who != "anonymous":
        client.force_login(viewers[who])
    return client


# --- who sees what -----------------------------------------------------------------------------

def test_hidden_collections_name_what_each_kind_of_user_may_not_see(world, viewers, django_assert_max_num_queries):
    with django_assert_max_num_queries(1):
        assert sorted(visibility.hidden_collections(viewers["anonymous"])) == ["staff-pictures", "users-pictures"]
    assert visibility.hidden_collections(viewers["user"]) == ["staff-pictures"]
    with django_assert_max_num_queries(0):
        assert visibility.hidden_collections(viewers["staff"]) == []


def test_an_inactive_staff_account_sees_only_public_collections(world, staff_user):
    staff_user.is_active = False
    assert sorted(visibility.hidden_collections(staff_user)) == ["staff-pictures", "users-pictures"]


def test_visible_assets_and_can_view_agree(world, viewers):
    for who, user in viewers.items():
        visible = set(visibility.visible_assets(user).values_list("pk", flat=True))
        assert visible == {world[level].pk for level in SEES[who]}, who
        for level, asset in world.items():
            assert visibility.can_view(user, asset) == (level in SEES[who]), (who, level)


def test_a_collection_without_a_row_counts_as_public(media, viewers):
    asset = curation.ingest_image(picture(), collection="rowless").asset
    Collection.objects.filter(name="rowless").delete()
    assert visibility.can_view(viewers["anonymous"], asset)
    assert asset in visibility.visible_assets(viewers["anonymous"])


def test_visible_assets_narrows_a_given_queryset(world, viewers):
    narrowed = visibility.visible_assets(viewers["user"], ImageAsset.objects.filter(collection="staff-pictures"))
    assert not narrowed.exists()


# --- ingest, admin and the updated time ---------------------------------------------------------

def test_a_new_collection_gets_the_default_visibility_and_an_existing_one_keeps_its_own(media, settings):
    settings.COLLECTION_DEFAULT_VISIBILITY = "staff"
    curation.ingest_image(picture(), collection="fresh")
    Collection.objects.create(name="known", visibility=V.USERS)
    curation.ingest_many([("a.png", picture())], collection="known")
    assert Collection.objects.get(name="fresh").visibility == V.STAFF
    assert Collection.objects.get(name="known").visibility == V.USERS


def test_the_unnamed_collection_gets_its_row_too(media):
    curation.ingest_image(picture())
    assert Collection.objects.get(name="").visibility == V.PUBLIC


def test_moving_an_asset_to_another_collection_in_the_admin_sets_updated_and_creates_the_row(
        media, client, django_user_model, settings):
    settings.COLLECTION_DEFAULT_VISIBILITY = "users"
    root = django_user_model.objects.create_superuser("root", "r@example.com", "pw")
    asset = curation.ingest_image(picture(), ["eight"], collection="before").asset
    ImageAsset.objects.filter(pk=asset.pk).update(updated=timezone.now() - timedelta(hours=1))
    before = ImageAsset.objects.get(pk=asset.pk).updated
    client.force_login(root)
    caption = asset.captions.get()
    response = client.post(reverse("admin:search_imageasset_change", args=[asset.pk]), {
        "collection": "after",
        "captions-TOTAL_FORMS": "1", "captions-INITIAL_FORMS": "1", "captions-MIN_NUM_FORMS": "0",
        "captions-MAX_NUM_FORMS": "1000", "captions-0-id": str(caption.pk), "captions-0-asset": str(asset.pk),
        "captions-0-text": "eight",
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    moved = ImageAsset.objects.get(pk=asset.pk)
    assert moved.collection == "after" and moved.updated > before
    assert Collection.objects.get(name="after").visibility == V.USERS


def test_marking_an_asset_for_embedding_again_sets_updated(media):
    asset = curation.ingest_image(picture(), ["nine"]).asset
    ImageAsset.objects.filter(pk=asset.pk).update(status=ImageAsset.Status.EMBEDDED,
                                                  updated=timezone.now() - timedelta(hours=1))
    before = ImageAsset.objects.get(pk=asset.pk).updated
    curation.add_captions(ImageAsset.objects.get(pk=asset.pk), ["nine again"])
    assert ImageAsset.objects.get(pk=asset.pk).updated > before


def test_a_collection_with_pictures_keeps_its_name_and_cannot_be_deleted_in_the_admin(world, client,
                                                                                      django_user_model):
    root = django_user_model.objects.create_superuser("root", "r@example.com", "pw")
    client.force_login(root)
    row = Collection.objects.get(name="staff-pictures")
    page = client.get(reverse("admin:search_collection_change", args=[row.pk])).content.decode()
    assert 'name="name"' not in page and 'name="visibility"' in page
    assert client.post(reverse("admin:search_collection_delete", args=[row.pk]), {"post": "yes"}).status_code == 403
    client.post(reverse("admin:search_collection_changelist"),
                {"action": "delete_selected", "_selected_action": [row.pk], "post": "yes"})
    assert Collection.objects.filter(pk=row.pk).exists()
    empty = Collection.objects.create(name="empty")
    client.post(reverse("admin:search_collection_changelist"),
                {"action": "delete_selected", "_selected_action": [empty.pk], "post": "yes"})
    assert not Collection.objects.filter(pk=empty.pk).exists()


def test_the_migration_gives_every_existing_collection_a_public_row(media):
    for name in ("old", "", "old"):
        curation.ingest_image(picture(), collection=name)
    Collection.objects.all().delete()
    migration = importlib.import_module("search.migrations.0002_collections_and_updated")
    migration.public_rows_for_existing_names(apps, None)
    assert sorted(Collection.objects.values_list("name", "visibility")) == [("", "public"), ("old", "public")]


# --- listings and pages -------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["anonymous", "user", "staff"])
def test_the_library_shows_only_what_the_visitor_may_see(client, world, viewers, who):
    html = logged_in(client, who, viewers).get("/").content.decode()
    for level, asset in world.items():
        assert (f'href="/assets/{asset.pk}/"' in html) == (level in SEES[who]), (who, level)
    assert f"{len(SEES[who])} pictures, newest first" in html


@pytest.mark.parametrize("who", ["anonymous", "user", "staff"])
def test_an_asset_page_of_a_hidden_collection_is_not_found(client, world, viewers, who):
    logged_in(client, who, viewers)
    for level, asset in world.items():
        assert client.get(f"/assets/{asset.pk}/").status_code == (200 if level in SEES[who] else 404), (who, level)


def test_the_asset_page_links_to_its_collection(client, world):
    html = client.get(f"/assets/{world[V.PUBLIC].pk}/").content.decode()
    assert 'href="/collections/public-pictures/">public-pictures</a>' in html


@pytest.mark.parametrize("who", ["anonymous", "user", "staff"])
def test_the_api_lists_and_retrieves_only_what_the_client_may_see(api_client, world, viewers, who):
    if who != "anonymous":
        api_client.force_authenticate(viewers[who])
    body = api_client.get("/api/assets/").json()
    listed = {row["id"] for row in body.get("results", body)}
    assert listed == {world[level].pk for level in SEES[who]}
    for level, asset in world.items():
        assert api_client.get(f"/api/assets/{asset.pk}/").status_code == (200 if level in SEES[who] else 404)


def test_the_collections_page_shows_name_count_and_cover(client, media):
    older = make_collection("birds", V.PUBLIC, n=2)
    newest = older[-1]
    make_collection("secret", V.STAFF)
    html = client.get("/collections/").content.decode()
    assert 'href="/collections/birds/"' in html and "2 pictures" in html
    assert newest.file.url in html and older[0].file.url not in html  # the cover is the newest
    assert "secret" not in html
    assert "badge" not in html  # visibility badges are for staff


def test_staff_see_every_collection_with_its_visibility_and_an_admin_link(client, media, staff_user):
    make_collection("secret", V.STAFF)
    Collection.objects.create(name="not yet filled", visibility=V.USERS)
    client.force_login(staff_user)
    html = client.get("/collections/").content.decode()
    assert 'href="/collections/secret/"' in html and 'visibility-staff">staff<' in html
    assert "not yet filled" in html and "0 pictures" in html  # staff also see empty ones
    assert reverse("admin:search_collection_changelist") in html
    page = client.get("/collections/secret/").content.decode()
    assert reverse("admin:search_collection_change", args=[Collection.objects.get(name="secret").pk]) in page


def test_empty_collections_are_not_listed_for_visitors(client, media):
    Collection.objects.create(name="not yet filled")
    assert "not yet filled" not in client.get("/collections/").content.decode()


@pytest.mark.parametrize("who", ["anonymous", "user", "staff"])
def test_a_hidden_collection_page_is_not_found(client, world, viewers, who):
    logged_in(client, who, viewers)
    for level in world:
        response = client.get(f"/collections/{level}-pictures/")
        assert response.status_code == (200 if level in SEES[who] else 404), (who, level)


def test_a_collection_page_comes_in_pages_newest_first(client, media):
    assets = make_collection("many", V.PUBLIC, n=COLLECTION_PAGE + 2)
    first = client.get("/collections/many/").content.decode()
    second = client.get("/collections/many/", {"page": 2}).content.decode()
    assert f"{COLLECTION_PAGE + 2} pictures, newest first" in first and "page 1 of 2" in first
    assert f'href="/assets/{assets[-1].pk}/"' in first and f'href="/assets/{assets[0].pk}/"' not in first
    assert f'href="/assets/{assets[0].pk}/"' in second
    bad = client.get("/collections/many/", {"page": "x"})
    assert bad.status_code == 200 and "page 1 of 2" in bad.content.decode()  # not an error: the first page


def test_the_unnamed_collection_and_dash_names_have_their_own_pages(client, media):
    unnamed = curation.ingest_image(picture(), ["no name"]).asset
    dash = make_collection("-", V.PUBLIC)[0]
    assert collection_slug("") == "-" and collection_slug("-") == "--"
    assert collection_from_slug("-") == "" and collection_from_slug("--") == "-"
    assert collection_from_slug("a-b") == "a-b"
    unnamed_page = client.get("/collections/-/").content.decode()
    assert f"/assets/{unnamed.pk}/" in unnamed_page and f"/assets/{dash.pk}/" not in unnamed_page
    assert f"/assets/{dash.pk}/" in client.get("/collections/--/").content.decode()
    assert unnamed.collection_url() == "/collections/-/"


def test_a_collection_name_with_slashes_and_spaces_has_a_page(client, media):
    asset = make_collection("trips/2024 summer", V.PUBLIC)[0]
    assert asset.collection_url() == "/collections/trips/2024%20summer/"
    assert f"/assets/{asset.pk}/" in client.get(asset.collection_url()).content.decode()


def test_an_unknown_collection_is_not_found(client, media):
    assert client.get("/collections/nothing-here/").status_code == 404
    assert client.post("/collections/").status_code == 405


# --- media files --------------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["anonymous", "user", "staff"])
def test_media_files_obey_the_collection(client, world, viewers, who):
    logged_in(client, who, viewers)
    for level, asset in world.items():
        response = client.get(asset.file.url)
        assert response.status_code == (200 if level in SEES[who] else 404), (who, level)


def test_a_media_file_is_streamed_with_its_type_and_cache_headers(client, world, staff_user):
    public = client.get(world[V.PUBLIC].file.url)
    assert b"".join(public.streaming_content) == world[V.PUBLIC].file.open("rb").read()
    assert public["Content-Type"] == "image/png" and public["X-Content-Type-Options"] == "nosniff"
    assert public["Cache-Control"] == "public, max-age=3600"
    client.force_login(staff_user)
    private = client.get(world[V.STAFF].file.url)
    assert private.status_code == 200 and private["Cache-Control"] == "private, no-cache"


def test_an_unchanged_media_file_answers_304(client, world):
    url = world[V.PUBLIC].file.url
    stamp = client.get(url)["Last-Modified"]
    assert client.get(url, HTTP_IF_MODIFIED_SINCE=stamp).status_code == 304
    assert client.get(url, HTTP_IF_MODIFIED_SINCE=http_date(0)).status_code == 200


def test_nginx_sends_the_file_by_x_accel_redirect(client, world, settings):
    settings.MEDIA_ACCEL_REDIRECT = "/protected-media/"
    asset = world[V.PUBLIC]
    response = client.get(asset.file.url)
    assert response.status_code == 200 and response.content == b""
    assert response["X-Accel-Redirect"] == f"/protected-media/{asset.file.name}"
    assert response["Content-Type"] == "image/png" and response["Cache-Control"].startswith("public")
    assert client.get(world[V.STAFF].file.url).status_code == 404  # checked all the same


def test_apache_or_lighttpd_send_the_file_by_x_sendfile(client, world, settings, media):
    settings.MEDIA_SENDFILE = True
    asset = world[V.PUBLIC]
    response = client.get(asset.file.url)
    assert response.status_code == 200 and response.content == b""
    assert response["X-Sendfile"] == str(media / asset.file.name)
    assert "X-Accel-Redirect" not in response
    assert client.get(world[V.USERS].file.url).status_code == 404


@pytest.mark.parametrize("path", ["images/00/unknown.png", "../secret.txt", "images/../../etc/passwd",
                                  "images//x.png", "%2e%2e/x", "images\\x.png", ""])
def test_unknown_or_outside_media_paths_are_not_found(client, world, path):
    assert client.get(f"/media/{path}").status_code == 404


def test_a_file_on_disk_that_no_asset_names_is_not_served(client, world, media):
    (media / "images" / "stray.png").write_bytes(image_bytes())
    assert client.get("/media/images/stray.png").status_code == 404


def test_an_asset_whose_file_was_lost_is_not_found(client, world):
    asset = world[V.PUBLIC]
    os.remove(asset.file.path)
    assert client.get(asset.file.url).status_code == 404


def test_media_files_take_only_reads(client, world):
    assert client.post(world[V.PUBLIC].file.url).status_code == 405
    assert client.head(world[V.PUBLIC].file.url).status_code == 200


def test_benchmark_sample_grids_stay_public(client, media):
    (media / "benchmarks" / "7").mkdir(parents=True)
    (media / "benchmarks" / "7" / "samples.png").write_bytes(image_bytes())
    response = client.get("/media/benchmarks/7/samples.png")
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert client.get("/media/benchmarks/8/samples.png").status_code == 404


def _check(**env):
    full_env = {k: v for k, v in os.environ.items() if k not in {"SERVE_MEDIA", "MEDIA_ACCEL_REDIRECT"}}
    return subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env={**full_env, **env},
                          capture_output=True, text=True, timeout=120)


def test_serve_media_off_needs_a_front_server_to_send_the_files():
    refused = _check(SERVE_MEDIA="0")
    assert refused.returncode != 0 and "SERVE_MEDIA=0 needs MEDIA_ACCEL_REDIRECT" in refused.stderr
    assert _check(SERVE_MEDIA="0", MEDIA_ACCEL_REDIRECT="/protected-media/").returncode == 0


# --- logging in and out -------------------------------------------------------------------------

def test_the_login_page_is_the_portals_own(client):
    html = client.get(reverse("login")).content.decode()
    assert 'class="top"' in html and "<h1>Log in</h1>" in html and "django-admin" not in html.lower()


def test_logging_in_and_out_through_the_portal(client, plain_user):
    refused = client.post(reverse("login"), {"username": "visitor", "password": "wrong"})
    assert refused.status_code == 200 and "correct username and password" in refused.content.decode()
    response = client.post(reverse("login"), {"username": "visitor", "password": "pw-visitor", "next": "/collections/"})
    assert response.status_code == 302 and response["Location"] == "/collections/"
    header = client.get("/").content.decode().split("</header>")[0]
    assert "visitor" in header and 'action="/accounts/logout/"' in header and "Log out" in header
    assert "Log in" not in header
    assert client.get(reverse("logout")).status_code == 405  # Django 5: logging out is a POST
    out = client.post(reverse("logout"))
    assert out.status_code == 302 and out["Location"] == reverse("home")
    assert "Log in" in client.get("/").content.decode().split("</header>")[0]


def test_the_header_log_in_link_comes_back_to_the_page(client, media):
    header = client.get("/collections/").content.decode().split("</header>")[0]
    assert 'href="/accounts/login/?next=/collections/"' in header


def test_a_visitor_logging_in_sees_the_users_collection(client, world, plain_user):
    assert client.get(world[V.USERS].file.url).status_code == 404
    client.force_login(plain_user)
    assert client.get(world[V.USERS].file.url).status_code == 200


def test_a_portal_for_logged_in_users_only_keeps_even_public_pictures_from_the_anonymous(world, client,
                                                                                        plain_user, settings):
    settings.SEARCH_REQUIRES_LOGIN = True
    url = world[V.PUBLIC].file.url
    assert client.get(url).status_code == 404
    client.force_login(plain_user)
    assert client.get(url).status_code == 200
