"""The portal's pages in a real browser: headless Chromium (Debian's package) driven by
Playwright, against a live server on the test database, with the committed demo model and
pictures of its world. Each test saves a screenshot under <state>/screenshots/."""

import os
import shutil
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from embeddings import services
from embeddings.core import synthetic
from search.models import Collection, ImageAsset
from tests.helpers import image_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        pytest.fail("No Chromium found: bin/test installs Debian's chromium package for these tests.")
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are
    # still plain synchronous code.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(viewport={"width": 1200, "height": 900}, base_url=live_server.url)
    # Nothing leaves the machine: a page that needs the internet fails here as it would offline.
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(live_server.url)
                  else route.abort())
    page = context.new_page()
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    folder = Path(settings.STATE_DIR) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def demo_world(monkeypatch, clean_state, tmp_path):
    """The committed demo model and 24 unseen pictures of its world, imported and indexed."""
    monkeypatch.setattr(synthetic, "DEMO_DATA", dict(synthetic.DEMO_DATA, n_val=4, n_test=24))
    call_command("demo", "--in-process")
    model = services.active_model()
    assert model.kind == "demo" and ImageAsset.objects.count() == 24
    return model


def test_the_library_then_a_text_search_with_match_probabilities(page, demo_world):
    page.goto("/")
    assert page.locator(".grid .card").count() == 24
    assert "24 pictures, newest first" in page.text_content("main, body")
    screenshot(page, "library")
    page.fill("input[name=q]", "a red circle")
    page.click("form.text-search button[type=submit]")
    page.wait_for_selector(".grid .card")
    assert page.locator(".grid .card").count() == 12
    first = page.locator(".grid .card .prob").first.text_content()
    assert first.endswith("% match")
    screenshot(page, "text-search")


def test_a_query_nothing_matches_says_no_good_match(page, demo_world):
    page.goto("/?q=123&min_score=0.99")
    notice = page.locator("p.notice")
    assert notice.is_visible() and "No good match" in notice.text_content()
    assert page.locator(".grid .card").count() == 12  # the nearest, shown anyway
    screenshot(page, "no-good-match")


def test_a_photo_search_from_the_file_picker(page, demo_world, tmp_path):
    photo = tmp_path / "red.png"
    photo.write_bytes(image_bytes((220, 30, 30), size=(64, 64)))
    page.goto("/")
    page.set_input_files("input[name=image]", str(photo))
    page.click("form.image-search button[type=submit]")
    page.wait_for_selector("ol.captions li")
    assert page.locator("ol.captions li").count() == 12 and page.locator(".grid .card").count() == 12
    screenshot(page, "photo-search")


def test_similar_images_show_their_source_and_an_asset_page_its_neighbours(page, demo_world):
    asset = ImageAsset.objects.order_by("pk").first()
    page.goto(f"/?similar={asset.pk}")
    assert page.locator("figure.source img").is_visible()
    assert page.locator(f'.grid a[href="?similar={asset.pk}"]').count() == 0
    assert page.locator("p.error").count() == 0
    screenshot(page, "similar-images")
    page.goto(f"/assets/{asset.pk}/")
    assert page.locator(".asset .full img").evaluate("img => img.naturalWidth") == asset.width
    assert page.locator("h2", has_text="Similar images").is_visible()
    assert page.locator(".grid .card").count() == 12
    screenshot(page, "asset-page")


def test_the_api_docs_render_without_the_internet(page, demo_world):
    page.goto("/api/docs/")
    page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
    assert page.locator(".swagger-ui .opblock").count() >= 5
    screenshot(page, "api-docs")


def test_results_can_be_walked_with_the_keyboard_and_a_search_shows_it_is_running(page, demo_world):
    page.goto("/?q=a+blue+square")
    cards = page.locator(".grid .card > a")
    cards.first.focus()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement === document.querySelectorAll('.grid .card > a')[1]")
    page.keyboard.press("ArrowDown")
    per_row = page.evaluate("""() => { const a = [...document.querySelectorAll('.grid .card > a')];
        return a.filter(x => x.getBoundingClientRect().top === a[0].getBoundingClientRect().top).length; }""")
    assert page.evaluate(f"document.activeElement === document.querySelectorAll('.grid .card > a')[{1 + per_row}]")
    screenshot(page, "keyboard-focus")
    href = page.evaluate("document.activeElement.getAttribute('href')")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/{href}")
    assert page.locator("figure.source img").is_visible()
    # The loading state: the status line speaks as soon as a search is submitted (the submit is
    # held here, so the page can be read while it would be loading).
    page.fill("input[name=q]", "a green star")
    status = page.evaluate("""() => {
        const form = document.querySelector('form.text-search');
        form.addEventListener('submit', (e) => e.preventDefault());
        form.requestSubmit();
        return [document.getElementById('search-status').textContent, document.body.className];
    }""")
    assert status[0] == "Searching…" and "loading" in status[1]


def test_a_filter_from_the_panel_keeps_its_collection_and_the_url_can_be_shared(page, demo_world):
    picked = list(ImageAsset.objects.order_by("pk").values_list("pk", flat=True)[:5])
    ImageAsset.objects.filter(pk__in=picked).update(collection="picked", updated=timezone.now())
    Collection.objects.get_or_create(name="picked")
    page.goto("/")
    page.fill("input[name=q]", "a red circle")
    page.click("details.filters summary")
    page.select_option("select[name=collection]", "picked")
    page.click("form.text-search button[type=submit]")
    page.wait_for_selector(".grid .card")
    shown = page.eval_on_selector_all(".grid .card > a", "links => links.map(a => a.getAttribute('href'))")
    assert sorted(int(href.split("similar=")[1].split("&")[0]) for href in shown) == sorted(picked)
    assert "collection=picked" in page.url and page.locator("details.filters[open]").count() == 1
    screenshot(page, "filtered-search")
    # The address is the search: opened afresh it gives the same pictures.
    again = page.context.new_page()
    again.goto(page.url)
    assert again.locator(".grid .card").count() == 5


def test_scrolling_to_the_end_of_the_results_appends_the_next_page(page, demo_world):
    page.goto("/?q=a+red+circle")
    assert page.locator(".grid .card").count() == 12
    first_page = page.eval_on_selector_all(".grid .card > a", "links => links.map(a => a.getAttribute('href'))")
    page.locator("p.pages.more a").scroll_into_view_if_needed()
    page.wait_for_function("document.querySelectorAll('.grid .card').length === 24")
    shown = page.eval_on_selector_all(".grid .card > a", "links => links.map(a => a.getAttribute('href'))")
    assert shown[:12] == first_page and len(set(shown)) == 24
    page.wait_for_selector("p.pages", state="attached")
    assert "No more results." in page.text_content("p.pages")
    screenshot(page, "infinite-scroll")


def test_a_photo_dropped_anywhere_on_the_page_is_searched(page, demo_world):
    page.goto("/")
    data = list(image_bytes((30, 30, 220), size=(64, 64)))
    with page.expect_navigation():
        page.evaluate("""(bytes) => {
            const file = new File([new Uint8Array(bytes)], 'blue.png', { type: 'image/png' });
            const drop = new DataTransfer();
            drop.items.add(file);
            document.body.dispatchEvent(new DragEvent('dragenter', { dataTransfer: drop, bubbles: true }));
            document.body.dispatchEvent(new DragEvent('drop', { dataTransfer: drop, bubbles: true }));
        }""", data)
    page.wait_for_selector("ol.captions li")
    assert page.locator("ol.captions li").count() == 12 and page.locator(".grid .card").count() == 12
    assert "blue" in page.locator("ol.captions li").first.text_content()
    screenshot(page, "photo-dropped")
