"""Search filters: what a searcher may narrow a search to, checked, and turned into the rows the
vector search may return.

A filter is applied inside the vector search, never to a short list afterwards: a filter keeping
0.1 % of the pictures still returns k of them. The FAISS backends get the ids of the matching
rows (``vector_index.Subset(ids)``), read from a per-process table of every image's filterable
attributes (``search.core.facets.FacetTable``, a millisecond or two per million rows); pgvector
gets an SQL condition, so the filter runs in the same query as the vector ordering.

The table is refreshed with the rows whose ``updated`` time is recent, at most every
``SEARCH_FILTER_REFRESH`` seconds and whenever the image index's version changes (only then
can new pictures be found at all). The rows a search returns are checked against the filter
again as they are read from PostgreSQL (``SearchFilters.admits``), so a table a moment old can
leave a just-moved picture out, never let a wrong one in.

What a user may not see (``search.visibility``) is one more filter every search carries.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass, fields

import numpy as np
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import F, Q
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from search import visibility
from search.core.facets import ORIENTATIONS, Conditions, FacetTable
from search.core.lru import LRU
from search.core.vector_index.base import Subset
from search.errors import InvalidQuery
from search.models import Collection, ImageAsset
from search.validation import ALLOWED_FORMATS

__all__ = ["FILTER_PARAMETERS", "SORTS", "SearchFilters", "facets", "hidden_names", "parse_filters", "subset_for"]

#: The request parameters of a filter (repeat a list parameter for several values).
FILTER_PARAMETERS = ("collection", "exclude_collection", "uploader", "date_from", "date_to", "format",
                     "min_width", "min_height", "orientation")
SORTS = ("relevance", "newest", "oldest", "name")
MAX_PIXELS_SIDE = 100_000
MAX_VALUES = 50  # values of one list parameter
# Rows changed this long before the newest one seen are read again at each refresh: a
# transaction that commits late may carry an older `updated` time than rows already read.
REREAD_SECONDS = 120.0


@dataclass(frozen=True)
class SearchFilters:
    """A checked filter. ``hidden``: the collections the user may not see (not asked for; every
    search of that user carries them)."""

    collections: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    uploaders: tuple[str, ...] = ()  # user names, as asked
    uploader_ids: tuple[int, ...] = ()
    date_from: dt.date | None = None
    date_to: dt.date | None = None  # inclusive
    formats: tuple[str, ...] = ()
    min_width: int | None = None
    min_height: int | None = None
    orientation: str = ""
    hidden: tuple[str, ...] = ()

    @property
    def asked(self) -> bool:
        """Whether the searcher asked for any filter."""
        return any(getattr(self, f.name) for f in fields(self) if f.name not in {"hidden", "uploader_ids"})

    @property
    def restricts(self) -> bool:
        return self.asked or bool(self.hidden)

    def key(self) -> str:
        """Names this filter (and what is hidden) in a cursor's digest and a cache key."""
        return repr(tuple(getattr(self, f.name) for f in fields(self) if f.name != "uploaders"))

    def params(self) -> dict:
        """The filter as request parameters, for links to the same search."""
        out = {"collection": list(self.collections), "exclude_collection": list(self.excluded),
               "uploader": list(self.uploaders), "format": list(self.formats)}
        for name in ("date_from", "date_to", "min_width", "min_height", "orientation"):
            value = getattr(self, name)
            out[name] = [str(value)] if value else []
        return {name: values for name, values in out.items() if values}

    def _bounds(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        """created ≥ the first, < the second: whole days in the portal's time zone."""
        zone = timezone.get_current_timezone()
        start = dt.datetime.combine(self.date_from, dt.time(), zone) if self.date_from else None
        end = dt.datetime.combine(self.date_to + dt.timedelta(days=1), dt.time(), zone) if self.date_to else None
        return start, end

    def conditions(self) -> Conditions:
        start, end = self._bounds()
        return Conditions(
            collections=self.collections, excluded=self.excluded + self.hidden, uploaders=self.uploader_ids,
            created_from=start.timestamp() if start else None, created_to=end.timestamp() if end else None,
            formats=self.formats, min_width=self.min_width, min_height=self.min_height, orientation=self.orientation,
        )

    def q(self) -> Q:
        """The same filter for the ORM (listings, pgvector's SQL)."""
        q = Q()
        if self.collections:
            q &= Q(collection__in=self.collections)
        if self.excluded or self.hidden:
            q &= ~Q(collection__in=self.excluded + self.hidden)
        if self.uploader_ids:
            q &= Q(uploaded_by_id__in=self.uploader_ids)
        start, end = self._bounds()
        if start:
            q &= Q(created__gte=start)
        if end:
            q &= Q(created__lt=end)
        if self.formats:
            q &= Q(format__in=self.formats)
        if self.min_width:
            q &= Q(width__gte=self.min_width)
        if self.min_height:
            q &= Q(height__gte=self.min_height)
        if self.orientation:
            q &= {"landscape": Q(width__gt=F("height")), "portrait": Q(width__lt=F("height")),
                  "square": Q(width=F("height"))}[self.orientation]
        return q

    def admits(self, row) -> bool:
        """Whether a row read from PostgreSQL meets the filter (any object with the asset's
        attributes: an ``ImageAsset``, or a caption read with its asset's columns)."""
        if not self.restricts:
            return True
        if self.collections and row.collection not in self.collections:
            return False
        if row.collection in self.excluded or row.collection in self.hidden:
            return False
        if self.uploader_ids and row.uploaded_by_id not in self.uploader_ids:
            return False
        start, end = self._bounds()
        if (start and row.created < start) or (end and row.created >= end):
            return False
        if self.formats and row.format not in self.formats:
            return False
        if (self.min_width and row.width < self.min_width) or (self.min_height and row.height < self.min_height):
            return False
        if self.orientation:
            shape = "landscape" if row.width > row.height else "portrait" if row.width < row.height else "square"
            return shape == self.orientation
        return True


# -- reading a filter from a request --------------------------------------------------------


def _values(data, name: str) -> list[str]:
    """A parameter's values: repeated in a query string or form, a list or a string in JSON."""
    if hasattr(data, "getlist"):
        values = data.getlist(name)
        # A JSON body parsed by DRF is a dict, whose lists arrive whole.
        values = [v for value in values for v in (value if isinstance(value, list) else [value])]
    else:
        value = data.get(name)
        values = value if isinstance(value, list) else [] if value is None else [value]
    values = [str(v).strip() if not isinstance(v, str) else v.strip() for v in values if v is not None]
    values = [v for v in values if v != ""]
    if len(values) > MAX_VALUES:
        raise InvalidQuery(f"{name}: at most {MAX_VALUES} values.")
    return values


def _one(data, name: str) -> str:
    values = _values(data, name)
    if len(values) > 1:
        raise InvalidQuery(f"{name} takes one value, got {len(values)}.")
    return values[0] if values else ""


def _date(data, name: str) -> dt.date | None:
    value = _one(data, name)
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidQuery(f"{name} must be a date as YYYY-MM-DD, not {value!r}.") from None


def _side(data, name: str) -> int | None:
    value = _one(data, name)
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise InvalidQuery(f"{name} must be a whole number of pixels, not {value!r}.") from None
    if not 1 <= number <= MAX_PIXELS_SIDE:
        raise InvalidQuery(f"{name} must be between 1 and {MAX_PIXELS_SIDE} pixels.")
    return number


def _collections(names: list[str], hidden: tuple[str, ...], name: str) -> tuple[str, ...]:
    """Known collection names; one unknown (or hidden from this user: the same answer, so a
    private collection's name does not leak) is refused. "(unnamed)" stands for ""."""
    names = ["" if n == "(unnamed)" else n for n in dict.fromkeys(names)]
    known = set(Collection.objects.filter(name__in=names).values_list("name", flat=True))
    known |= set(ImageAsset.objects.filter(collection__in=set(names) - known).values_list("collection", flat=True))
    for collection in names:
        if collection not in known or collection in hidden:
            raise InvalidQuery(f"{name}: there is no collection named {collection or '(unnamed)'!r}.")
    return tuple(names)


class HiddenNames:
    """The collections hidden from each kind of user (``visibility.hidden_collections``), read
    at most every SEARCH_FILTER_REFRESH seconds per process: every search needs them, and the
    round trip cost more than all the rest of an unfiltered search's filter work. A collection
    made private is hidden from searches within that time (at once in the process that saved it);
    pages, listings and files check it on every request."""

    def __init__(self):
        self._names: dict[tuple, tuple[float, tuple[str, ...]]] = {}

    def forget(self) -> None:
        self._names = {}

    def of(self, user) -> tuple[str, ...]:
        level = visibility.hidden_levels(user)
        if not level:
            return ()
        found = self._names.get(level)
        if found is not None and time.monotonic() - found[0] < settings.SEARCH_FILTER_REFRESH:
            return found[1]
        names = tuple(visibility.hidden_collections(user))
        self._names = {**self._names, level: (time.monotonic(), names)}
        return names


hidden_names = HiddenNames()


@receiver([post_save, post_delete], sender=Collection)
def _visibility_changed(**kwargs) -> None:
    hidden_names.forget()


def parse_filters(data, user) -> SearchFilters:
    """The filter a request asks for (query string, form or JSON body), checked; what ``user``
    may not see is added. Bad or contradictory values raise ``InvalidQuery`` with the reason."""
    hidden = hidden_names.of(user)
    if not any(_values(data, name) for name in FILTER_PARAMETERS):
        return SearchFilters(hidden=hidden)  # the common case: no query to build for nothing
    collections = _collections(_values(data, "collection"), hidden, "collection")
    excluded = _collections(_values(data, "exclude_collection"), hidden, "exclude_collection")
    both = set(collections) & set(excluded)
    if both:
        raise InvalidQuery(f"Collection {sorted(both)[0] or '(unnamed)'!r} is both asked for and excluded.")
    uploaders = tuple(dict.fromkeys(_values(data, "uploader")))
    found = dict(get_user_model().objects.filter(username__in=uploaders).values_list("username", "pk"))
    for name in uploaders:
        if name not in found:
            raise InvalidQuery(f"uploader: there is no user named {name!r}.")
    date_from, date_to = _date(data, "date_from"), _date(data, "date_to")
    if date_from and date_to and date_from > date_to:
        raise InvalidQuery(f"date_from ({date_from}) is after date_to ({date_to}).")
    formats = tuple(dict.fromkeys(f.upper() for f in _values(data, "format")))
    for fmt in formats:
        if fmt not in ALLOWED_FORMATS:
            raise InvalidQuery(f"format must be one of {', '.join(sorted(ALLOWED_FORMATS))}, not {fmt!r}.")
    orientation = _one(data, "orientation").lower()
    if orientation and orientation not in ORIENTATIONS:
        raise InvalidQuery(f"orientation must be one of {', '.join(ORIENTATIONS)}, not {orientation!r}.")
    return SearchFilters(
        collections=collections, excluded=excluded, uploaders=uploaders,
        uploader_ids=tuple(found[name] for name in uploaders), date_from=date_from, date_to=date_to,
        formats=formats, min_width=_side(data, "min_width"), min_height=_side(data, "min_height"),
        orientation=orientation, hidden=hidden,
    )


def parse_sort(value) -> str:
    value = (value or "relevance").strip().lower() if isinstance(value, str) or value is None else value
    if value not in SORTS:
        raise InvalidQuery(f"sort must be one of {', '.join(SORTS)}, not {value!r}.")
    return value


# -- the rows a vector search may return ----------------------------------------------------


class ProcessFacets:
    """This process's table of every image's filterable attributes (module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.forget()

    def forget(self) -> None:
        self._table = FacetTable.empty()
        self._newest: dt.datetime | None = None
        self._read_at = float("-inf")
        self._version = None
        self._matches = LRU(64)

    @property
    def rows(self) -> int:
        """How many pictures the table holds now (0 before its first read)."""
        return len(self._table)

    def table(self, version=None) -> FacetTable:
        """The table, refreshed when older than SEARCH_FILTER_REFRESH seconds or read for another
        index version. While one thread refreshes, the others use the table as it was."""
        fresh = time.monotonic() - self._read_at < settings.SEARCH_FILTER_REFRESH and version == self._version
        if fresh:
            return self._table
        first = self._read_at == float("-inf")
        if not self._lock.acquire(blocking=first):
            return self._table
        try:
            if time.monotonic() - self._read_at >= settings.SEARCH_FILTER_REFRESH or version != self._version:
                self._refresh()
                self._version = version
        finally:
            self._lock.release()
        return self._table

    def _refresh(self) -> None:
        since = self._newest - dt.timedelta(seconds=REREAD_SECONDS) if self._newest else None
        read_at = time.monotonic()
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, collection, uploaded_by_id, EXTRACT(EPOCH FROM created)::float8, format, width, height, "
                f"updated FROM {ImageAsset._meta.db_table}" + (" WHERE updated >= %s" if since else ""),
                [since] if since else [],
            )
            rows = cursor.fetchall()
        if rows:
            self._table = self._table.merged(row[:7] for row in rows)
            newest = max(row[7] for row in rows)
            self._newest = max(newest, self._newest) if self._newest else newest
            self._matches = LRU(64)
        self._read_at = read_at

    def matching(self, conditions: Conditions, version=None) -> np.ndarray:
        """The ids that meet the conditions; the answers for the last 64 filters are kept (a
        collection asked often, what the anonymous may not see)."""
        table = self.table(version)
        matches = self._matches
        found = matches.get(conditions)
        if found is None:
            found = table.matching(conditions)
            found.setflags(write=False)
            matches.put(conditions, found)
        return found


facets = ProcessFacets()


def subset_for(filters: SearchFilters | None, index, version=None) -> Subset | None:
    """The rows of ``index`` (image vectors by asset id) a search with this filter may return;
    None for no filter. ``version``: the index version served, so new rows are read with it."""
    if filters is None or not filters.restricts:
        return None
    if index.sql_subsets:
        sql, params = ImageAsset.objects.filter(filters.q()).order_by().values("id").query.sql_with_params()
        return Subset(sql=f"id IN ({sql})", sql_params=tuple(params))
    return Subset(facets.matching(filters.conditions(), version))
