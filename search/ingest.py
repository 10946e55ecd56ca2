"""Ingestion: validate uploaded image bytes, store them as assets with captions.

Every way in (admin, bulk upload, API, dataset import) goes through
``ingest_image``; embedding is queued after the transaction commits.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from PIL import Image, UnidentifiedImageError

from .models import Caption, ImageAsset, image_upload_path, normalise_text

ALLOWED_FORMATS = {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
CAPTION_MAX_CHARS = 2000


class InvalidUpload(ValueError):
    """The upload is rejected; the message says why, for the person who sent it."""


@dataclass
class ImageInfo:
    width: int
    height: int
    format: str


def inspect_image(data: bytes) -> ImageInfo:
    """Check by decoding, not by name: size caps, pixel cap, allowed formats, complete data."""
    if not data:
        raise InvalidUpload("The file is empty.")
    if len(data) > settings.UPLOAD_MAX_BYTES:
        raise InvalidUpload(
            f"The file is {len(data):,} bytes; the limit is {settings.UPLOAD_MAX_BYTES:,} bytes."
        )
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            width, height = img.size
            if fmt not in ALLOWED_FORMATS:
                raise InvalidUpload(
                    f"Unsupported image format {fmt}; allowed: {', '.join(sorted(ALLOWED_FORMATS))}."
                )
            # Checked from the header, before any pixel is decoded.
            if width * height > settings.UPLOAD_MAX_PIXELS:
                raise InvalidUpload(
                    f"The image is {width}×{height} pixels; the limit is {settings.UPLOAD_MAX_PIXELS:,} pixels."
                )
            img.load()  # decodes the first frame fully: truncated files fail here
    except InvalidUpload:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidUpload("The image has too many pixels.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidUpload(f"The file is not a readable image ({exc}).") from exc
    return ImageInfo(width=width, height=height, format=fmt)


def clean_captions(captions) -> list[str]:
    cleaned, seen = [], set()
    for text in captions or []:
        if not isinstance(text, str):
            raise InvalidUpload("Captions must be text.")
        text = text.strip()
        if not text:
            continue
        if len(text) > CAPTION_MAX_CHARS:
            raise InvalidUpload(f"A caption is longer than {CAPTION_MAX_CHARS} characters.")
        key = normalise_text(text)
        if key not in seen:
            seen.add(key)
            cleaned.append(text)
    return cleaned


@dataclass
class IngestResult:
    asset: ImageAsset
    created: bool
    new_captions: list[Caption] = field(default_factory=list)


def ingest_image(
    data: bytes,
    captions=(),
    *,
    original_name: str = "",
    user=None,
    collection: str = "",
    queue_embedding: bool = True,
) -> IngestResult:
    """Store an image (deduplicated by sha256) and its captions; queue embedding on commit.

    Re-uploading the same bytes returns the existing asset, adding any captions it
    did not have yet.
    """
    info = inspect_image(data)
    captions = clean_captions(captions)
    digest = hashlib.sha256(data).hexdigest()
    user = user if getattr(user, "is_authenticated", False) else None

    existing = ImageAsset.objects.filter(sha256=digest).first()
    if existing is not None:
        return add_captions(existing, captions, created=False, queue_embedding=queue_embedding)

    asset = ImageAsset(
        sha256=digest,
        original_name=(original_name or "")[-255:],
        width=info.width,
        height=info.height,
        format=info.format,
        collection=collection,
        uploaded_by=user,
    )
    name = image_upload_path(asset, f"upload.{EXTENSIONS[info.format]}")
    storage = asset.file.storage
    if storage.exists(name) and storage.size(name) == len(data):
        asset.file.name = name  # content-addressed: a file left by an earlier failed attempt is these bytes
    else:
        asset.file.save(name, ContentFile(data), save=False)
    try:
        with transaction.atomic():
            asset.save()
            result = add_captions(asset, captions, created=True, queue_embedding=queue_embedding)
    except IntegrityError:
        # The same bytes arrived concurrently: keep the winner, drop our file.
        asset.file.storage.delete(asset.file.name)
        winner = ImageAsset.objects.get(sha256=digest)
        return add_captions(winner, captions, created=False, queue_embedding=queue_embedding)
    except BaseException:
        asset.file.storage.delete(asset.file.name)
        raise
    return result


def add_captions(asset, captions, *, created=False, queue_embedding=True) -> IngestResult:
    """Add the captions the asset does not have yet (compared normalised); queue embedding."""
    captions = clean_captions(captions)
    with transaction.atomic():
        known = set(asset.captions.values_list("normalized_text", flat=True))
        new = []
        for text in captions:
            if normalise_text(text) not in known:
                new.append(Caption.objects.create(asset=asset, text=text))
                known.add(normalise_text(text))
        if (created or new) and queue_embedding:
            if new and asset.status != ImageAsset.Status.PENDING:
                ImageAsset.objects.filter(pk=asset.pk).update(status=ImageAsset.Status.PENDING)
            queue_embed(asset.pk)
    return IngestResult(asset=asset, created=created, new_captions=new)


def queue_embed(asset_id: int) -> None:
    from embeddings.tasks import embed_asset

    transaction.on_commit(lambda: embed_asset.delay(asset_id))


# --- Bulk uploads ---------------------------------------------------------------


def captions_from_file(name: str, data: bytes) -> dict[str, list[str]]:
    """Captions per image file name, from JSON ``{"file.jpg": ["...", ...]}`` or
    tab-separated lines ``file.jpg<TAB>caption``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidUpload(f"{name} is not UTF-8 text.") from exc
    if name.lower().endswith(".json"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidUpload(f"{name} is not valid JSON: {exc}.") from exc
        if not isinstance(parsed, dict) or not all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in parsed.values()
        ):
            raise InvalidUpload(f'{name} must map file names to lists of captions: {{"a.jpg": ["..."]}}.')
        return {_basename(k): v for k, v in parsed.items()}
    mapping: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise InvalidUpload(f"{name}, line {lineno}: expected 'file name<TAB>caption'.")
        filename, caption = line.split("\t", 1)
        mapping.setdefault(_basename(filename.strip()), []).append(caption)
    return mapping


def _basename(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]


CAPTION_FILE_NAMES = ("captions.json", "captions.tsv", "captions.txt")


def files_from_zip(data: bytes) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    """Image files and the captions file of a zip archive (read in memory, never extracted)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise InvalidUpload("The archive is not a valid zip file.") from exc
    images, captions = [], {}
    members = [m for m in archive.infolist() if not m.is_dir() and not _basename(m.filename).startswith(".")]
    if len(members) > settings.UPLOAD_MAX_FILES + 1:
        raise InvalidUpload(f"The archive holds {len(members)} files; the limit is {settings.UPLOAD_MAX_FILES}.")
    total = 0
    for member in members:
        total += member.file_size
        if member.file_size > settings.UPLOAD_MAX_BYTES or total > settings.UPLOAD_MAX_BYTES * 10:
            raise InvalidUpload("The archive expands to more data than allowed.")
        name = _basename(member.filename)
        if name.lower() in CAPTION_FILE_NAMES:
            captions = captions_from_file(name, archive.read(member))
        else:
            images.append((name, archive.read(member)))
    return images, captions


@dataclass
class BulkResult:
    created: list[ImageAsset] = field(default_factory=list)
    existing: list[ImageAsset] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def ingest_many(files, captions_by_name=None, *, user=None, collection="") -> BulkResult:
    """Ingest several (name, bytes) files; a bad file is reported, the others still land."""
    captions_by_name = captions_by_name or {}
    if len(files) > settings.UPLOAD_MAX_FILES:
        raise InvalidUpload(f"{len(files)} files sent; the limit is {settings.UPLOAD_MAX_FILES} per request.")
    result = BulkResult()
    for name, data in files:
        try:
            outcome = ingest_image(
                data,
                captions_by_name.get(_basename(name), []),
                original_name=name,
                user=user,
                collection=collection,
            )
        except InvalidUpload as exc:
            result.errors.append(f"{name}: {exc}")
            continue
        (result.created if outcome.created else result.existing).append(outcome.asset)
    return result
