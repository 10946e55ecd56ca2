"""The uploaded images, served only to those who may see them.

Every URL under ``MEDIA_URL`` comes here: the path must be the stored file name of an asset
(``ImageAsset.file``) whose collection this user may see (``search.visibility``); anything else
is a 404, a picture hidden from this user included, so that a URL does not tell whether it
exists. Django decides; the bytes go out by whichever way the deployment has:

- ``MEDIA_ACCEL_REDIRECT`` set (nginx): an ``X-Accel-Redirect`` to that internal prefix;
- ``MEDIA_SENDFILE`` on (Apache's mod_xsendfile, lighttpd): an ``X-Sendfile`` absolute path;
- neither: Django streams the file itself (``SERVE_MEDIA``, on by default; bin/run, tests).

Files the portal writes itself under ``GENERATED_PREFIXES`` (benchmark sample grids, shown on
the public benchmark pages) are served to everyone.
"""

from __future__ import annotations

import mimetypes
import os
import posixpath
from pathlib import Path

from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.http import FileResponse, Http404, HttpResponse, HttpResponseNotModified
from django.utils._os import safe_join
from django.utils.http import http_date
from django.views.decorators.http import require_safe
from django.views.static import was_modified_since

from search.api.access import search_allowed
from search.models import Collection, ImageAsset
from search.visibility import collection_visibility, may_see

CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                 "BMP": "image/bmp", "TIFF": "image/tiff"}
GENERATED_PREFIXES = ("benchmarks/",)


def _clean_name(path: str) -> str:
    """The stored name this URL path means; 404 for anything that is not a plain relative
    path inside MEDIA_ROOT (``..``, absolute, backslashes, NUL, empty parts)."""
    if (not path or "\x00" in path or "\\" in path or path.startswith("/")
            or posixpath.normpath(path) != path or ".." in path.split("/")):
        raise Http404("No such file.")
    try:
        safe_join(settings.MEDIA_ROOT, path)
    except (SuspiciousFileOperation, ValueError):
        raise Http404("No such file.") from None
    return path


def _find(request, name: str) -> tuple[str, str]:
    """``(content type, visibility)`` of the file ``name`` for this user; 404 when it is no
    asset's file or the user may not see it."""
    if name.startswith(GENERATED_PREFIXES):
        if not os.path.isfile(safe_join(settings.MEDIA_ROOT, name)):
            raise Http404("No such file.")
        return mimetypes.guess_type(name)[0] or "application/octet-stream", Collection.Visibility.PUBLIC
    asset = ImageAsset.objects.filter(file=name).values("format", "collection").first()
    if asset is None:
        raise Http404("No such file.")
    visibility = collection_visibility(asset["collection"])
    if not may_see(request.user, visibility):
        raise Http404("No such file.")
    return CONTENT_TYPES.get(asset["format"], "application/octet-stream"), visibility


@require_safe
def media_file(request, path):
    """One stored file, if this user may see it (module docstring)."""
    name = _clean_name(path)
    if not name.startswith(GENERATED_PREFIXES) and not search_allowed(request.user):
        raise Http404("No such file.")  # a portal for logged-in users only keeps its pictures too
    content_type, visibility = _find(request, name)
    full_path = Path(safe_join(settings.MEDIA_ROOT, name))
    if settings.MEDIA_ACCEL_REDIRECT:
        response = HttpResponse(content_type=content_type)
        response["X-Accel-Redirect"] = f"{settings.MEDIA_ACCEL_REDIRECT.rstrip('/')}/{name}"
    elif settings.MEDIA_SENDFILE:
        response = HttpResponse(content_type=content_type)
        response["X-Sendfile"] = str(full_path)
    else:
        response = _stream(request, full_path, content_type)
    if visibility == Collection.Visibility.PUBLIC:
        response["Cache-Control"] = f"public, max-age={settings.MEDIA_CACHE_SECONDS}"
    else:
        # Kept by the browser only, and checked again on each use: logging out ends access.
        response["Cache-Control"] = "private, no-cache"
    response["X-Content-Type-Options"] = "nosniff"
    return response


def _stream(request, full_path: Path, content_type: str) -> HttpResponse:
    """Django sends the bytes itself, answering If-Modified-Since with a 304."""
    try:
        stat = full_path.stat()
    except OSError:
        raise Http404("No such file.") from None  # the row is there, its file was lost
    if not was_modified_since(request.META.get("HTTP_IF_MODIFIED_SINCE"), stat.st_mtime):
        return HttpResponseNotModified()
    response = FileResponse(full_path.open("rb"), content_type=content_type)
    response["Last-Modified"] = http_date(stat.st_mtime)
    return response
