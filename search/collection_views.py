"""Collection pages: the collections a visitor may see (name, count, cover), and the pictures
of one, newest first in pages like the library. What a visitor may see comes from
``search.visibility``; a collection hidden from them is a 404, as if it did not exist."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.views import redirect_to_login
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import Http404
from django.shortcuts import render
from django.views.decorators.http import require_safe

from search.api.access import search_allowed
from search.models import Collection, ImageAsset, collection_from_slug, collection_slug
from search.visibility import may_see, visible_assets, visible_collections

COLLECTION_PAGE = 24  # pictures per page, as in the library


@dataclass
class CollectionCard:
    """One collection as the list shows it; ``row`` is None for a name no row describes (public)."""

    name: str
    count: int
    cover: ImageAsset | None
    row: Collection | None

    @property
    def slug(self) -> str:
        return collection_slug(self.name)

    @property
    def visibility(self) -> str:
        return self.row.visibility if self.row else Collection.Visibility.PUBLIC

    @property
    def description(self) -> str:
        return self.row.description if self.row else ""


def collection_cards(user) -> list[CollectionCard]:
    """The collections this user may see, the unnamed one first, then by name: three queries
    (rows, counts, the newest picture of each). Staff also see collections with no picture yet."""
    rows = {row.name: row for row in visible_collections(user)}
    assets = visible_assets(user).order_by()
    counts = dict(assets.values_list("collection").annotate(n=Count("pk")))
    covers = {asset.collection: asset
              for asset in assets.order_by("collection", "-created", "-pk").distinct("collection")}
    names = set(counts) | (set(rows) if user.is_staff else set())
    return [CollectionCard(name, counts.get(name, 0), covers.get(name), rows.get(name))
            for name in sorted(names, key=lambda n: (n != "", n.casefold(), n))]


@require_safe
def collections(request):
    """The list of collections."""
    if not search_allowed(request.user):
        return redirect_to_login(request.get_full_path())
    return render(request, "search/collections.html", {"collections": collection_cards(request.user)})


@require_safe
def collection_page(request, slug):
    """One collection's pictures, newest first, ``COLLECTION_PAGE`` to a page."""
    if not search_allowed(request.user):
        return redirect_to_login(request.get_full_path())
    name = collection_from_slug(slug)
    row = Collection.objects.filter(name=name).first()
    if row is not None and not may_see(request.user, row.visibility):
        raise Http404("No such collection.")
    pictures = ImageAsset.objects.filter(collection=name).prefetch_related("captions").order_by("-created", "-pk")
    page = Paginator(pictures, COLLECTION_PAGE).get_page(request.GET.get("page"))
    if row is None and not page.paginator.count:
        raise Http404("No such collection.")
    card = CollectionCard(name, page.paginator.count, None, row)
    return render(request, "search/collection.html", {"collection": card, "pictures": page})
