"""Private collections and the portal's login in a real browser (headless Chromium driven by
Playwright over a live server, as in test_pages_in_a_browser.py, whose fixtures these reuse).
Each test saves a screenshot under <state>/screenshots/."""

import pytest

from search.curation import ingest_image
from search.models import Collection
from tests.helpers import image_bytes
from tests.search.test_pages_in_a_browser import browser, page, screenshot  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def live_server():
    """A live server whose media URLs reach the portal's own view. Django's test server answers
    them from MEDIA_ROOT before any view runs (``_MediaFilesHandler``), which would let every
    picture through; here that shortcut is left out while the server starts."""
    from django.test import testcases
    from pytest_django.live_server_helper import LiveServer

    shortcut = testcases._MediaFilesHandler
    testcases._MediaFilesHandler = lambda application: application
    try:
        server = LiveServer("localhost")
    finally:
        testcases._MediaFilesHandler = shortcut
    yield server
    server.stop()


@pytest.fixture
def pictures(settings, tmp_path, clean_state):
    """One picture in a public collection and one in a staff-only collection."""
    settings.MEDIA_ROOT = tmp_path / "media"
    Collection.objects.create(name="holidays", visibility=Collection.Visibility.PUBLIC)
    Collection.objects.create(name="internal", visibility=Collection.Visibility.STAFF)
    public = ingest_image(image_bytes((40, 120, 220), size=(96, 96)), ["a blue square"], collection="holidays").asset
    hidden = ingest_image(image_bytes((220, 40, 40), size=(96, 96), pattern=2), ["a striped red square"],
                          collection="internal").asset
    return {"public": public, "hidden": hidden}


def log_in(page, username: str, password: str):
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("form.login-form button[type=submit]")


def test_logging_in_on_the_portal_page_and_out_from_the_header(page, live_server, plain_user, pictures):
    page.goto("/collections/")
    page.click("header a.login")
    page.wait_for_url("**/accounts/login/?next=/collections/")
    assert page.locator("header.top").is_visible() and page.locator("h1", has_text="Log in").is_visible()
    log_in(page, "visitor", "wrong password")
    assert "correct username and password" in page.locator("p.error").text_content()
    log_in(page, "visitor", "pw-visitor")
    page.wait_for_url("**/collections/")
    assert page.locator("header .user").text_content() == "visitor"
    screenshot(page, "logged-in")
    page.click("header form.logout button")
    page.wait_for_url(f"{live_server.url}/")  # back on the home page
    assert page.locator("header a.login").is_visible()
    assert page.locator("header form.logout").count() == 0
    screenshot(page, "logged-out")


def test_a_staff_only_collection_is_hidden_from_a_visitor_until_staff_log_in(page, staff_user, pictures):
    public, hidden = pictures["public"].file.url, pictures["hidden"].file.url
    page.goto("/")
    assert page.locator(".grid .card").count() == 1
    assert page.locator(f'img[src="{public}"]').evaluate("img => img.decode().then(() => img.naturalWidth)") == 96
    assert page.locator(f'img[src="{hidden}"]').count() == 0
    page.goto("/collections/")
    assert page.locator(".collection", has_text="holidays").is_visible()
    assert page.locator(".collection", has_text="internal").count() == 0
    screenshot(page, "private-collection-anonymous")
    assert page.goto("/collections/internal/").status == 404
    assert page.goto(hidden).status == 404
    assert page.goto(f"/assets/{pictures['hidden'].pk}/").status == 404

    page.goto("/accounts/login/?next=/collections/internal/")
    log_in(page, "curator", "pw-curator")
    page.wait_for_url("**/collections/internal/")
    card = page.locator(f'.grid img[src="{hidden}"]')
    assert card.evaluate("img => img.decode().then(() => img.naturalWidth)") == 96  # the file came through
    assert page.locator(".badge", has_text="staff").is_visible()
    screenshot(page, "private-collection-staff")
    assert page.goto(hidden).status == 200
    page.goto("/")
    assert page.locator(".grid .card").count() == 2
