from django.contrib.auth.views import redirect_to_login
from django.core.paginator import Paginator
from django.db import DatabaseError
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_http_methods

from embeddings.models import EmbeddingModel
from search import asset_vectors, queries
from search.api.access import SEARCH_THROTTLES, check_throttles, search_allowed
from search.errors import REFUSED, refusal
from search.forms import ImageSearchForm, TextSearchForm
from search.models import ImageAsset
from search.validation import read_upload
from search.visibility import visible_assets

DEFAULT_K = 12
LIBRARY_PAGE = 24  # pictures per page of the library


def _throttled(request, wait: float, template: str, context: dict):
    """The page with a 429 saying when to try again."""
    seconds = int(wait) + 1
    response = render(request, template, {**context, "error": f"Too many searches; try again in {seconds} seconds."},
                      status=429)
    response["Retry-After"] = str(seconds)
    return response


def _demo_model_active() -> bool:
    try:
        return EmbeddingModel.objects.filter(is_active=True, kind=EmbeddingModel.Kind.DEMO).exists()
    except DatabaseError:  # the page still renders; the search itself reports the outage
        return False


@require_http_methods(["GET", "POST"])
def home(request):
    """Text search by GET ?q=, photo search by POST, similar images by GET ?similar=<asset id>."""
    if not search_allowed(request.user):
        return redirect_to_login(request.get_full_path())
    searching = request.method == "POST" or bool(request.GET.get("similar")) or "q" in request.GET
    demo = _demo_model_active()
    wait = check_throttles(request, SEARCH_THROTTLES) if searching else None
    if wait is not None:
        return _throttled(request, wait, "search/home.html",
                          {"text_form": TextSearchForm(demo=demo), "image_form": ImageSearchForm()})
    # The text form is bound only by a text search: a similar-images link carries no query.
    context = {"text_form": TextSearchForm(request.GET if "q" in request.GET else None, demo=demo),
               "image_form": ImageSearchForm()}
    if not searching:  # no query: the library, newest first
        context["library"] = Paginator(
            visible_assets(request.user, ImageAsset.objects.prefetch_related("captions")).order_by("-created", "-pk"),
            LIBRARY_PAGE,
        ).get_page(request.GET.get("page"))
    status = 200
    try:
        if request.method == "POST":
            form = ImageSearchForm(request.POST, request.FILES)
            context["image_form"] = form
            if form.is_valid():
                k = form.cleaned_data.get("k") or DEFAULT_K
                context["result"] = queries.search_image(read_upload(form.cleaned_data["image"]), k,
                                                         form.cleaned_data.get("min_score"))
                context["mode"] = "image"
            else:
                status = 400
        elif request.GET.get("similar"):
            context["result"] = queries.search_asset(request.GET["similar"], DEFAULT_K, request.GET.get("min_score"))
            context["mode"] = "image"
            context["source"] = ImageAsset.objects.filter(pk=request.GET["similar"]).first()
        elif "q" in request.GET:
            form = context["text_form"]
            if form.is_valid():
                result = queries.search_text(form.cleaned_data["q"], form.cleaned_data.get("k") or DEFAULT_K,
                                             form.cleaned_data.get("min_score"), form.cleaned_data.get("cursor") or None)
                context["result"] = result
                if result.next_cursor:  # the same search, one page on: a link that works without JavaScript
                    params = request.GET.copy()
                    params["cursor"] = result.next_cursor
                    context["more_url"] = "?" + params.urlencode()
                context["mode"] = "text"
            else:
                status = 400
    except REFUSED as exc:
        status, context["error"] = refusal(exc)
    return render(request, "search/home.html", context, status=status)


@require_http_methods(["GET", "HEAD"])
def asset_page(request, pk):
    """One picture: full size, captions, metadata, its best captions and the images most like it."""
    if not search_allowed(request.user):
        return redirect_to_login(request.get_full_path())
    wait = check_throttles(request, SEARCH_THROTTLES)  # the page runs a search: the same allowance
    if wait is not None:
        return _throttled(request, wait, "search/asset.html", {})
    # A picture this user may not see is not found: a 403 would tell that it exists.
    asset = get_object_or_404(
        visible_assets(request.user, ImageAsset.objects.select_related("uploaded_by").prefetch_related("captions")),
        pk=pk)
    context = {"asset": asset, "embedded_with": asset_vectors.models_with_vectors(asset)}
    if asset.status == ImageAsset.Status.EMBEDDED:
        try:
            context["result"] = queries.search_asset(asset.pk, DEFAULT_K)
        except REFUSED as exc:  # no active model, not embedded by it yet: the page stands, a note says why
            context["error"] = refusal(exc)[1]
    return render(request, "search/asset.html", context)
