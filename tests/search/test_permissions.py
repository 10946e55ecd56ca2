"""Access control: every write route × anonymous / user / staff, every page, API read and media
file of a collection × anonymous / user / staff × its visibility, CSRF on session writes, search
open or login-only, throttles, deploy checks, and services bound to loopback.

The API routes are read from the OpenAPI schema and the admin pages from the admin site, so
a route added later is covered without touching this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from django.contrib import admin
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from search.curation import ingest_image
from search.models import Collection, ImageAsset
from tests.conftest import ROOT
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db

# POST routes that read rather than write: open to everyone (unless SEARCH_REQUIRES_LOGIN).
PUBLIC_POSTS = {"/api/search/text/", "/api/search/image/"}
UNSAFE = ("post", "put", "patch", "delete")


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def users(django_user_model):
    return {
        "user": django_user_model.objects.create_user("perm-user", password="pw-user"),
        "staff": django_user_model.objects.create_user("perm-staff", password="pw-staff", is_staff=True),
        "superuser": django_user_model.objects.create_superuser("perm-root", "r@example.com", "pw-root"),
    }


def token_client(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


def api_write_operations():
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    ops = []
    for path, methods in schema["paths"].items():
        for method in methods:
            if method in UNSAFE and path not in PUBLIC_POSTS:
                ops.append((method, path))
    return sorted(ops)


def fill(path: str, asset_id: int) -> str:
    return re.sub(r"\{[^}]+\}", str(asset_id), path)


def new_asset() -> int:
    return ingest_image(image_bytes((9, 9, ImageAsset.objects.count() % 250)), ["perm"]).asset.pk


def test_every_api_write_needs_a_staff_account(users, tiny_model, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {}}
    ops = api_write_operations()
    # The routes this project has today must all be found (more may come).
    assert {("post", "/api/assets/"), ("delete", "/api/assets/{id}/"), ("post", "/api/assets/reindex/")} <= set(ops)
    matrix = {}
    for method, path in ops:
        asset_id = new_asset()
        url = fill(path, asset_id)
        anonymous = getattr(token_client(), method)(url, {}, format="json")
        visitor = getattr(token_client(users["user"]), method)(url, {}, format="json")
        staff = getattr(token_client(users["staff"]), method)(url, {}, format="json")
        matrix[(method, path)] = (anonymous.status_code, visitor.status_code, staff.status_code)
        assert anonymous.status_code == 401, (method, path, anonymous.status_code)
        assert anonymous.json()["detail"]
        assert visitor.status_code == 403, (method, path, visitor.status_code)
        assert "staff" in visitor.json()["detail"]
        assert staff.status_code not in (401, 403) and staff.status_code < 500, (method, path, staff.content[:300])
    assert matrix


def test_api_reads_and_searches_are_public_by_default(api_client, tiny_model):
    asset_id = new_asset()
    assert api_client.get("/api/assets/").status_code == 200
    assert api_client.get(f"/api/assets/{asset_id}/").status_code == 200
    assert api_client.post("/api/search/text/", {"query": "a dog"}, format="json").status_code == 200
    assert api_client.post("/api/search/image/", {"asset_id": asset_id}, format="json").status_code in (200, 400)


def test_search_can_require_login(settings, client, api_client, users, tiny_model):
    settings.SEARCH_REQUIRES_LOGIN = True
    asset_id = new_asset()
    assert api_client.post("/api/search/text/", {"query": "a dog"}, format="json").status_code == 401
    assert api_client.post("/api/search/image/", {"asset_id": asset_id}, format="json").status_code == 401
    assert api_client.get("/api/assets/").status_code == 401
    page = client.get("/?q=dog")
    assert page.status_code == 302 and page["Location"].startswith(reverse("login"))
    # Any active user may log in (not only staff) and then search.
    login = client.post(reverse("login"), {"username": "perm-user", "password": "pw-user", "next": "/?q=dog"})
    assert login.status_code == 302 and login["Location"] == "/?q=dog"
    assert client.get("/?q=dog").status_code == 200
    visitor = token_client(users["user"])
    assert visitor.post("/api/search/text/", {"query": "a dog"}, format="json").status_code == 200
    assert visitor.get("/api/assets/").status_code == 200
    assert visitor.post("/api/assets/", {}, format="json").status_code == 403  # still no writes


def test_admin_pages_need_staff_and_model_permissions(client, users):
    asset_id = new_asset()
    pages = ["/admin/", reverse("admin:search_imageasset_bulk")]
    for model in admin.site._registry:
        info = (model._meta.app_label, model._meta.model_name)
        pages += [reverse("admin:%s_%s_changelist" % info), reverse("admin:%s_%s_add" % info)]
    pages += [reverse("admin:search_imageasset_change", args=[asset_id]),
              reverse("admin:search_imageasset_delete", args=[asset_id])]
    for page in pages:
        for method in ("get", "post"):
            response = getattr(client, method)(page)
            assert response.status_code == 302 and "/admin/login/" in response["Location"], (page, method)
    client.force_login(users["user"])
    for page in pages:
        response = client.post(page)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], page
    client.force_login(users["staff"])  # staff, but no model permissions
    assert client.get("/admin/").status_code == 200
    assert client.post(reverse("admin:search_imageasset_delete", args=[asset_id]), {"post": "yes"}).status_code == 403
    assert client.post(reverse("admin:search_imageasset_bulk"), {}).status_code == 302  # back to the index
    client.force_login(users["superuser"])
    for page in pages:
        if page.endswith("/add/") and "indexbuild" in page:
            continue  # index versions are written by workers only
        assert client.get(page).status_code == 200, page
    assert ImageAsset.objects.filter(pk=asset_id).exists()


# Who sees a collection of each visibility (search.visibility).
SEES = {"anonymous": {"public"}, "user": {"public", "users"}, "staff": {"public", "users", "staff"}}
# The routes that show one picture or one collection: 200 when it may be seen, else 404.
ONE_THING = {
    "assets/<int:pk>/": lambda asset: f"/assets/{asset.pk}/",
    "collections/<path:slug>/": lambda asset: asset.collection_url(),
    "media": lambda asset: asset.file.url,
    "api/assets/<pk>/": lambda asset: f"/api/assets/{asset.pk}/",
}
# The routes that list pictures or collections: the thing is listed only when it may be seen.
def _api_ids(response) -> set[int]:
    body = response.json()
    return {row["id"] for row in (body["results"] if isinstance(body, dict) else body)}


LISTINGS = {
    "": ("/", lambda response, asset: f'href="/assets/{asset.pk}/"' in response.content.decode()),
    "collections/": ("/collections/",
                     lambda response, asset: f'href="{asset.collection_url()}"' in response.content.decode()),
    "api/assets/": ("/api/assets/", lambda response, asset: asset.pk in _api_ids(response)),
}


def test_every_page_api_read_and_media_file_obeys_the_collection_visibility(users, settings, tmp_path):
    from django.test import Client

    settings.MEDIA_ROOT = tmp_path / "media"
    routes = {route.lstrip("^").rstrip("$") for route in _flatten(get_resolver().url_patterns)}
    assert {"collections/", "collections/<path:slug>/", "assets/<int:pk>/"} <= routes
    assert any(route.startswith(settings.MEDIA_URL.lstrip("/")) for route in routes)
    assets = {}
    for i, level in enumerate(sorted(SEES["staff"])):
        Collection.objects.create(name=f"perm-{level}", visibility=level)
        assets[level] = ingest_image(image_bytes((i, 7, 7)), [f"perm {level}"], collection=f"perm-{level}").asset
    matrix = {}
    for who in SEES:
        browser, api = Client(), token_client(users.get(who))
        if who != "anonymous":
            browser.force_login(users[who])
        for level, asset in assets.items():
            seen = level in SEES[who]
            for route, url in ONE_THING.items():
                response = (api if route.startswith("api/") else browser).get(url(asset))
                matrix[(route, who, level)] = response.status_code
                assert response.status_code == (200 if seen else 404), (route, who, level, response.status_code)
            for route, (url, mark) in LISTINGS.items():
                response = (api if route.startswith("api/") else browser).get(url)
                assert response.status_code == 200, (route, who)
                listed = mark(response, asset)
                matrix[(route, who, level)] = listed
                assert listed == seen, (route, who, level)
    assert len(matrix) == len(SEES) * len(assets) * (len(ONE_THING) + len(LISTINGS))


def test_logging_in_and_out_is_open_to_everyone_and_logging_out_takes_a_post(users):
    from django.test import Client

    for who in SEES:
        browser = Client()
        if who != "anonymous":
            browser.force_login(users[who])
        assert browser.get(reverse("login")).status_code == 200, who
        assert browser.get(reverse("logout")).status_code == 405, who
        out = browser.post(reverse("logout"))
        assert out.status_code == 302 and out["Location"] == reverse("home"), who


def _flatten(patterns, prefix=""):
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _flatten(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern)


def test_no_page_outside_the_admin_and_api_takes_anonymous_writes(client, tiny_model, settings):
    """Every other route with no path parameters, POSTed anonymously: refused or a search."""
    public = {"", "accounts/login/", "accounts/logout/"}  # search by photo; logging in and out
    checked = []
    for route in sorted(set(_flatten(get_resolver().url_patterns))):
        route = route.lstrip("^").rstrip("$")
        if route.startswith(("admin/", "api/", settings.MEDIA_URL.lstrip("/"))) or "<" in route or "(" in route:
            continue
        if route in public:
            continue
        response = client.post("/" + route, {})
        checked.append(route)
        assert response.status_code in (302, 401, 403, 405), (route, response.status_code)
        if response.status_code == 302:
            assert "login" in response["Location"], route
    assert "benchmarks/" in checked


def test_session_writes_need_the_csrf_token(users, tiny_model, make_image):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(users["staff"])
    image = {"image": _file(make_image())}
    refused = browser.post("/api/assets/", image)
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    assert not ImageAsset.objects.exists()
    browser.get("/")  # the page sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    accepted = browser.post("/api/assets/", {"image": _file(make_image())}, HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 201, accepted.content
    asset_id = accepted.json()["id"]
    assert browser.delete(f"/api/assets/{asset_id}/").status_code == 403
    assert browser.delete(f"/api/assets/{asset_id}/", HTTP_X_CSRFTOKEN=token).status_code == 204
    # The admin too.
    admin_browser = Client(enforce_csrf_checks=True)
    admin_browser.force_login(users["superuser"])
    assert admin_browser.post(reverse("admin:search_imageasset_bulk"), {}).status_code == 403
    # Token clients send no cookie and need no CSRF token.
    assert token_client(users["staff"]).post("/api/assets/", {"image": _file(make_image((1, 1, 1)))},
                                             format="multipart").status_code == 201


def _file(data):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("p.png", data, content_type="image/png")


def _rates(settings, **rates):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}


def test_searches_are_throttled_per_client(settings, tiny_model, users):
    _rates(settings, search_anon="2/minute", search_user="3/minute", upload=None)
    anonymous = APIClient(REMOTE_ADDR="203.0.113.10")
    codes = [anonymous.post("/api/search/text/", {"query": "dog"}, format="json").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = anonymous.post("/api/search/image/", {"asset_id": 1}, format="json")
    assert limited.status_code == 429 and int(limited["Retry-After"]) > 0 and "throttled" in limited.json()["detail"]
    # Another address, and a logged-in user, have their own allowance.
    assert APIClient(REMOTE_ADDR="203.0.113.11").post("/api/search/text/", {"query": "dog"},
                                                      format="json").status_code == 200
    visitor = token_client(users["user"])
    visitor.defaults["REMOTE_ADDR"] = "203.0.113.10"
    assert [visitor.post("/api/search/text/", {"query": "d"}, format="json").status_code
            for _ in range(4)] == [200, 200, 200, 429]
    # The search page counts against the same allowance.
    from django.test import Client

    page = Client(REMOTE_ADDR="203.0.113.10").get("/?q=dog")
    assert page.status_code == 429 and b"Too many searches" in page.content


def _throttle(clock: list):
    import uuid

    from search.api import access

    key = f"throttle-test:{uuid.uuid4().hex}"

    class OneClient(access.SearchAnonThrottle):
        def get_cache_key(self, request, view):
            return key

        def timer(self):
            return clock[0]

    return OneClient


def test_a_throttle_counts_the_previous_window_by_how_much_of_it_is_still_recent(settings, clean_state):
    _rates(settings, search_anon="10/minute")
    start = 60 * (int(time.time()) // 60 + 10)  # a window boundary ahead of now
    clock = [start + 50.0]
    throttle = _throttle(clock)
    assert [throttle().allow_request(None, None) for _ in range(11)] == [True] * 10 + [False]
    clock[0] = start + 66.0  # 6 s into the next window: the previous 10 still weigh 9
    first, refused = throttle(), throttle()
    assert first.allow_request(None, None) and not refused.allow_request(None, None)
    assert refused.wait() == pytest.approx(6.0)  # at 12 s they weigh 8: room for one more
    clock[0] = start + 72.0
    assert throttle().allow_request(None, None)
    clock[0] = start + 90.0  # half-way: the previous window weighs 5, this one holds 2
    assert [throttle().allow_request(None, None) for _ in range(4)] == [True, True, True, False]


def test_concurrent_requests_of_one_client_are_all_counted(settings, clean_state):
    from concurrent.futures import ThreadPoolExecutor

    _rates(settings, search_anon="25/minute")
    throttle = _throttle([60 * (int(time.time()) // 60) + 1.0])
    with ThreadPoolExecutor(8) as pool:
        allowed = list(pool.map(lambda _: throttle().allow_request(None, None), range(60)))
    assert allowed.count(True) == 25


def test_uploads_are_throttled(settings, users, make_image):
    _rates(settings, search_anon=None, search_user=None, upload="2/minute")
    staff = token_client(users["staff"])
    codes = [staff.post("/api/assets/", {"image": _file(make_image((i, 0, 0)))}, format="multipart").status_code
             for i in range(3)]
    assert codes == [201, 201, 429]
    assert ImageAsset.objects.count() == 2


def test_throttles_fail_open_when_the_cache_is_unreachable(settings, tiny_model):
    """With Valkey away, searches are served (not a 500) and simply not counted."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0",
                                   "OPTIONS": {"socket_connect_timeout": 0.2, "socket_timeout": 0.2}}}
    _rates(settings, search_anon="1/minute", search_user=None, upload=None)
    client = APIClient(REMOTE_ADDR="203.0.113.20")
    assert [client.post("/api/search/text/", {"query": "dog"}, format="json").status_code
            for _ in range(2)] == [200, 200]


def _manage(*args, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in {"DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "SECURE_HTTPS"}}
    full_env.update(env)
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_production_settings_pass_the_deploy_checks_without_warnings():
    out = _manage("check", "--deploy", DEBUG="0", SECRET_KEY="x7" * 32 + "-Kq9!vR2@pL5#mN8$",
                  ALLOWED_HOSTS="example.com")
    assert out.returncode == 0, out.stderr
    assert "System check identified no issues" in out.stdout, out.stdout + out.stderr
    assert "WARNING" not in (out.stdout + out.stderr)


def test_local_http_keeps_working_without_https_settings():
    """bin/run serves plain http on 127.0.0.1: no https redirect, no secure-only cookies."""
    code = ("from django.conf import settings as s; "
            "print(s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS)")
    local = _manage("shell", "--no-imports", "-c", code)
    assert local.stdout.split() == ["False", "False", "False", "0"], local.stdout + local.stderr
    deployed = _manage("shell", "--no-imports", "-c", code, ALLOWED_HOSTS="search.example.com", SECRET_KEY="k" * 60)
    assert deployed.stdout.split()[:3] == ["True", "True", "True"], deployed.stdout + deployed.stderr
    forced_off = _manage("shell", "--no-imports", "-c", code, ALLOWED_HOSTS="search.example.com", SECURE_HTTPS="0")
    assert forced_off.stdout.split() == ["False", "False", "False", "0"], forced_off.stdout + forced_off.stderr


def test_health_is_plain_http_and_public(client):
    response = client.get("/health/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "cache": "ok"}


def test_celery_takes_json_only_and_valkey_listens_on_loopback_only():
    import redis
    from django.conf import settings

    from portal.celery import app

    assert app.conf.accept_content == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    bind = client.config_get("bind")["bind"].split()
    assert bind and all(addr in {"127.0.0.1", "::1", "-::1"} for addr in bind), bind
    assert client.config_get("protected-mode")["protected-mode"] == "yes"
