"""Who sees what: the one place that turns a collection's visibility into what a user may see.

A collection is public, for logged-in users, or for staff (``Collection.visibility``). Assets
name their collection (``ImageAsset.collection``); an asset whose collection has no row counts
as public. Listings, asset pages, the API, the media files and the searches all ask here, so a
rule changed here changes everywhere at once.
"""

from __future__ import annotations

from search.models import Collection, ImageAsset

_LEVEL = Collection.Visibility


def _is_staff(user) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


def hidden_levels(user) -> tuple[str, ...]:
    """The visibility levels this user may not see."""
    if _is_staff(user):
        return ()
    if user is not None and user.is_authenticated and user.is_active:
        return (_LEVEL.STAFF,)
    return (_LEVEL.USERS, _LEVEL.STAFF)


def may_see(user, visibility: str) -> bool:
    """Whether this user may see a collection of this visibility."""
    return visibility not in hidden_levels(user)


def hidden_collections(user) -> list[str]:
    """Names of the collections this user may not see: one query on a table of a few rows,
    none at all for staff (every search asks)."""
    levels = hidden_levels(user)
    if not levels:
        return []
    return list(Collection.objects.filter(visibility__in=levels).order_by().values_list("name", flat=True))


def visible_assets(user, queryset=None):
    """``queryset`` (all assets by default) without the assets of collections hidden from this
    user. Still lazy: the hidden names go in as a subquery of the same SQL statement."""
    queryset = ImageAsset.objects.all() if queryset is None else queryset
    levels = hidden_levels(user)
    if not levels:
        return queryset
    return queryset.exclude(collection__in=Collection.objects.filter(visibility__in=levels).values("name"))


def collection_visibility(name: str) -> str:
    """The visibility of the collection of this name; public when it has no row."""
    found = Collection.objects.filter(name=name).values_list("visibility", flat=True).first()
    return found or _LEVEL.PUBLIC


def can_view(user, asset) -> bool:
    """Whether this user may see this asset (its page, its file, its place in a listing)."""
    return _is_staff(user) or may_see(user, collection_visibility(asset.collection))


def visible_collections(user):
    """The ``Collection`` rows this user may see."""
    levels = hidden_levels(user)
    return Collection.objects.exclude(visibility__in=levels) if levels else Collection.objects.all()
