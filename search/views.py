from django.contrib.auth.views import redirect_to_login
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from search import queries
from search.errors import REFUSED, refusal
from search.api.access import SEARCH_THROTTLES, check_throttles, search_allowed
from search.forms import ImageSearchForm, TextSearchForm
from search.models import ImageAsset
from search.validation import read_upload

DEFAULT_K = 12


@require_http_methods(["GET", "POST"])
def home(request):
    """Text search by GET ?q=, photo search by POST, similar images by GET ?similar=<asset id>."""
    if not search_allowed(request.user):
        return redirect_to_login(request.get_full_path())
    searching = request.method == "POST" or bool(request.GET.get("similar")) or "q" in request.GET
    wait = check_throttles(request, SEARCH_THROTTLES) if searching else None
    if wait is not None:
        context = {"text_form": TextSearchForm(), "image_form": ImageSearchForm(),
                   "error": f"Too many searches; try again in {int(wait) + 1} seconds."}
        response = render(request, "search/home.html", context, status=429)
        response["Retry-After"] = str(int(wait) + 1)
        return response
    # The text form is bound only by a text search: a similar-images link carries no query.
    context = {"text_form": TextSearchForm(request.GET if "q" in request.GET else None),
               "image_form": ImageSearchForm()}
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
                context["result"] = queries.search_text(form.cleaned_data["q"], form.cleaned_data.get("k") or DEFAULT_K,
                                                        form.cleaned_data.get("min_score"))
                context["mode"] = "text"
            else:
                status = 400
    except REFUSED as exc:
        status, context["error"] = refusal(exc)
    return render(request, "search/home.html", context, status=status)
