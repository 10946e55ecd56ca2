from urllib.parse import urlencode

from django.contrib.auth.views import redirect_to_login
from django.core.paginator import Paginator
from django.db import DatabaseError
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_http_methods

from embeddings.models import EmbeddingModel
from search import asset_vectors, queries
from search.api.access import SEARCH_THROTTLES, check_throttles, search_allowed
from search.core.facets import ORIENTATIONS
from search.errors import REFUSED, refusal
from search.filters import FILTER_PARAMETERS, SORTS, parse_filters, parse_sort
from search.forms import ImageSearchForm, TextSearchForm
from search.models import ImageAsset
from search.validation import ALLOWED_FORMATS, read_upload
from search.visibility import visible_assets, visible_collections

DEFAULT_K = 12
LIBRARY_PAGE = 24  # pictures per page of the library
# The library has no relevance: it is newest first unless sorted otherwise.
LIBRARY_ORDER = {"relevance": ("-created", "-pk"), "newest": ("-created", "-pk"), "oldest": ("created", "pk"),
                 "name": ("original_name", "pk")}
LIBRARY_ORDER_NAMES = {("-created", "-pk"): "newest first", ("created", "pk"): "oldest first",
                       ("original_name", "pk"): "by name"}


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


def _filter_panel(request, data) -> dict:
    """What the filter controls show: the choices, and the values of this search."""
    return {
        "collections": [c.name or "(unnamed)" for c in visible_collections(request.user)],
        "formats": sorted(ALLOWED_FORMATS),
        "orientations": ORIENTATIONS,
        "sorts": SORTS,
        "asked": {name: data.getlist(name) for name in FILTER_PARAMETERS},
        "sort": data.get("sort", "relevance"),
        "open": any(data.getlist(name) for name in FILTER_PARAMETERS) or data.get("sort", "relevance") != "relevance",
        # Appended to the similar-images links, so they search through the same filters.
        "query": urlencode([(name, v) for name in FILTER_PARAMETERS for v in data.getlist(name) if v.strip()]),
    }


def _more_url(request, cursor: str | None) -> str | None:
    """The same search, one page on: a link that works without JavaScript."""
    if not cursor:
        return None
    params = request.GET.copy()
    params["cursor"] = cursor
    return "?" + params.urlencode()


@require_http_methods(["GET", "POST"])
def home(request):
    """Text search by GET ?q=, photo search by POST, similar images by GET ?similar=<asset id>;
    filters (``search.filters.FILTER_PARAMETERS``) and ``sort`` in the same query string."""
    if not search_allowed(request.user):
        return redirect_to_login(request.get_full_path())
    # "browse": the library through the filters, without a query.
    browsing = "browse" in request.GET
    searching = request.method == "POST" or (not browsing and (bool(request.GET.get("similar")) or "q" in request.GET))
    demo = _demo_model_active()
    data = request.POST if request.method == "POST" else request.GET
    wait = check_throttles(request, SEARCH_THROTTLES) if searching else None
    if wait is not None:
        return _throttled(request, wait, "search/home.html",
                          {"text_form": TextSearchForm(demo=demo), "image_form": ImageSearchForm(),
                           "panel": _filter_panel(request, data)})
    # The text form is bound only by a text search: a similar-images link carries no query.
    context = {"text_form": TextSearchForm(request.GET if "q" in request.GET and not browsing else None, demo=demo),
               "image_form": ImageSearchForm(), "panel": _filter_panel(request, data)}
    status = 200
    try:
        wanted = parse_filters(data, request.user)
        if not searching:  # no query: the library, newest first (or as sorted), through the filters
            order = LIBRARY_ORDER[parse_sort(request.GET.get("sort") or "newest")]
            context["library"] = Paginator(
                visible_assets(request.user, ImageAsset.objects.filter(wanted.q()).prefetch_related("captions"))
                .order_by(*order),
                LIBRARY_PAGE,
            ).get_page(request.GET.get("page"))
            context["library_order"] = LIBRARY_ORDER_NAMES[order]
            context["library_params"] = _library_params(request)
        elif request.method == "POST":
            form = ImageSearchForm(request.POST, request.FILES)
            context["image_form"] = form
            if form.is_valid():
                k = form.cleaned_data.get("k") or DEFAULT_K
                context["result"] = queries.search_image(read_upload(form.cleaned_data["image"]), k,
                                                         form.cleaned_data.get("min_score"), filters=wanted)
                context["mode"] = "image"
            else:
                status = 400
        elif request.GET.get("similar"):
            result = queries.search_asset(request.GET["similar"], DEFAULT_K, request.GET.get("min_score"),
                                          request.GET.get("cursor") or None, wanted)
            context.update(result=result, mode="image", more_url=_more_url(request, result.next_cursor),
                           source=visible_assets(request.user).filter(pk=request.GET["similar"]).first())
        elif "q" in request.GET:
            form = context["text_form"]
            if form.is_valid():
                result = queries.search_text(form.cleaned_data["q"], form.cleaned_data.get("k") or DEFAULT_K,
                                             form.cleaned_data.get("min_score"), form.cleaned_data.get("cursor") or None,
                                             wanted, request.GET.get("sort") or "relevance")
                context.update(result=result, mode="text", more_url=_more_url(request, result.next_cursor))
            else:
                status = 400
    except REFUSED as exc:
        status, context["error"] = refusal(exc)
    return render(request, "search/home.html", context, status=status)


def _library_params(request) -> str:
    """The library's query string without its page number, for the page links."""
    params = request.GET.copy()
    params.pop("page", None)
    return params.urlencode()


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
