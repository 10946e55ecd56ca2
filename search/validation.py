"""Checking what people upload before anything is stored: size, format, pixels, captions.

Hostile input is refused before it costs anything: a file over UPLOAD_MAX_BYTES is
not even stored by the upload handler, the pixel count is checked from the header
before any pixel is decoded, only the allowed formats are parsed at all, and the
whole first frame is decoded so truncated files fail here rather than in a worker.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from struct import error as struct_error

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from PIL import Image, UnidentifiedImageError

from embeddings.core.limits import too_large, too_many_pixels
from search.models import normalise_text

ALLOWED_FORMATS = {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"}


# Camera JPEGs with extra pictures (MPO) are JPEGs to everyone but Pillow.
FORMAT_ALIASES = {"MPO": "JPEG"}


EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


ALLOWED_LIST = "BMP, GIF, JPEG, PNG, TIFF, WebP"


CAPTION_MAX_CHARS = 2000


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class InvalidUpload(ValueError):
    """The upload is rejected; the message says why, for the person who sent it."""


def too_large_message(size: int, limit: int | None = None) -> str:
    return too_large(size, settings.UPLOAD_MAX_BYTES if limit is None else limit)


def upload_limit(file_name: str) -> int:
    """Zip archives (bulk uploads) may be larger than single images."""
    if (file_name or "").lower().endswith(".zip"):
        return max(settings.UPLOAD_MAX_ARCHIVE_BYTES, settings.UPLOAD_MAX_BYTES)
    return settings.UPLOAD_MAX_BYTES


class OversizedUpload(UploadedFile):
    """What the upload handler keeps of a file over UPLOAD_MAX_BYTES: its name and size, no bytes.

    Reading it raises InvalidUpload, so every way in refuses it with the reason.
    """

    def __init__(self, name, content_type, size, limit):
        super().__init__(io.BytesIO(), name, content_type, size)
        self.limit = limit

    def read(self, *args, **kwargs):
        raise InvalidUpload(too_large_message(self.size, self.limit))

    def chunks(self, chunk_size=None):
        raise InvalidUpload(too_large_message(self.size, self.limit))

    def __iter__(self):
        raise InvalidUpload(too_large_message(self.size, self.limit))


class UploadLimitHandler(FileUploadHandler):
    """First upload handler: stops passing a file on once it is over UPLOAD_MAX_BYTES.

    The rest of the file is counted but never stored (in memory or on disk), and
    the form or serializer receives an ``OversizedUpload`` in its place.
    """

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        self.received = 0
        self.limit = upload_limit(self.file_name)

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        return None if self.received > self.limit else raw_data

    def file_complete(self, file_size):
        if self.received > self.limit:
            return OversizedUpload(self.file_name, self.content_type, self.received, self.limit)
        return None


def read_upload(upload, limit: int | None = None) -> bytes:
    """The bytes of an uploaded file, refusing it (unread) when it is over the size cap."""
    limit = settings.UPLOAD_MAX_BYTES if limit is None else limit
    size = getattr(upload, "size", None)
    if size is not None and size > limit:
        raise InvalidUpload(too_large_message(size, limit))
    data = upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidUpload(too_large_message(len(data), limit))
    return data


def clean_text(text: str, what: str) -> str:
    """Text that PostgreSQL will store: valid Unicode, no NUL or other control characters
    (tabs and line breaks are kept)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidUpload(f"{what} is not valid Unicode text.") from None
    return _CONTROL_CHARS.sub("", text)


def clean_name(name: str) -> str:
    """An original file name kept for display only (files are stored under generated names)."""
    name = (name or "").encode("utf-8", "replace").decode("utf-8")
    name = _CONTROL_CHARS.sub("", name.replace("\n", " ").replace("\r", " ").replace("\t", " "))
    return name[-255:]


@dataclass
class ImageInfo:
    width: int
    height: int
    format: str
    image: Image.Image | None = field(default=None, repr=False, compare=False)  # with keep_decoded


def inspect_image(data: bytes, *, keep_decoded: bool = False) -> ImageInfo:
    """Check by decoding, not by name: size caps, pixel cap, allowed formats, complete data.

    With ``keep_decoded`` the decoded (first frame of the) image comes back in
    ``ImageInfo.image``, so a search need not decode the upload a second time."""
    if not data:
        raise InvalidUpload("The file is empty.")
    if too_large(len(data), settings.UPLOAD_MAX_BYTES):
        raise InvalidUpload(too_large_message(len(data)))
    try:
        # Only the allowed formats' parsers ever see the bytes.
        with Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS)) as img:
            fmt = FORMAT_ALIASES.get(img.format, img.format)
            width, height = img.size
            if fmt not in ALLOWED_FORMATS:
                raise InvalidUpload(f"The file is not a readable image: {fmt} is not allowed ({ALLOWED_LIST}).")
            # Checked from the header, before any pixel is decoded.
            refused = too_many_pixels(width, height, settings.UPLOAD_MAX_PIXELS)
            if refused:
                raise InvalidUpload(refused)
            if width < 1 or height < 1:
                raise InvalidUpload("The file is not a readable image: it has no pixels.")
            img.load()  # decodes the first frame fully: truncated files fail here
            kept = img.copy() if keep_decoded else None  # the decoded pixels outlive the file
    except InvalidUpload:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidUpload("The image has too many pixels.") from exc
    except UnidentifiedImageError as exc:
        raise InvalidUpload(
            f"The file is not a readable image in an allowed format ({ALLOWED_LIST})."
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as exc:
        raise InvalidUpload(f"The file is not a readable image: it is truncated or damaged ({exc}).") from exc
    return ImageInfo(width=width, height=height, format=fmt, image=kept)


def clean_captions(captions) -> list[str]:
    cleaned, seen = [], set()
    for text in captions or []:
        if not isinstance(text, str):
            raise InvalidUpload("Captions must be text.")
        text = clean_text(text, "A caption").strip()
        if not text:
            continue
        if len(text) > CAPTION_MAX_CHARS:
            raise InvalidUpload(f"A caption is longer than {CAPTION_MAX_CHARS} characters.")
        key = normalise_text(text)
        if key not in seen:
            seen.add(key)
            cleaned.append(text)
    return cleaned
