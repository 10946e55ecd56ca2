"""Ingestion: validate uploaded image bytes, store them as assets with captions.

Every way in (admin, bulk upload, API, dataset import) goes through
``ingest_image``; embedding is queued after the transaction commits.

Hostile input is refused before it costs anything: a file over UPLOAD_MAX_BYTES is
not even stored by the upload handler, the pixel count is checked from the header
before any pixel is decoded, only the allowed formats are parsed at all, and the
whole first frame is decoded so truncated files fail here rather than in a worker.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from struct import error as struct_error
import zipfile
import zlib
from dataclasses import dataclass, field

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from django.db import DatabaseError, transaction
from PIL import Image, UnidentifiedImageError

from embeddings.models import Embedding

from search.locking import lock_assets, lock_content, retry_on_conflict
from search.models import Caption, ImageAsset, image_upload_path, normalise_text

log = logging.getLogger(__name__)

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
    limit = settings.UPLOAD_MAX_BYTES if limit is None else limit
    return f"The file is {size:,} bytes; the limit is {limit:,} bytes."


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
    if len(data) > settings.UPLOAD_MAX_BYTES:
        raise InvalidUpload(
            f"The file is {len(data):,} bytes; the limit is {settings.UPLOAD_MAX_BYTES:,} bytes."
        )
    try:
        # Only the allowed formats' parsers ever see the bytes.
        with Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS)) as img:
            fmt = FORMAT_ALIASES.get(img.format, img.format)
            width, height = img.size
            if fmt not in ALLOWED_FORMATS:
                raise InvalidUpload(f"The file is not a readable image: {fmt} is not allowed ({ALLOWED_LIST}).")
            # Checked from the header, before any pixel is decoded.
            if width * height > settings.UPLOAD_MAX_PIXELS:
                raise InvalidUpload(
                    f"The image is {width}×{height} pixels; the limit is {settings.UPLOAD_MAX_PIXELS:,} pixels."
                )
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

    Re-uploading the same bytes returns the existing asset, adding any captions it did not
    have yet (and its file, should that have been lost). Uploads of the same bytes are
    serialised by the content lock (``search.locking``), so of any number of concurrent
    ones exactly one creates the asset and the others add their captions to it.
    """
    info = inspect_image(data)
    captions = clean_captions(captions)
    digest = hashlib.sha256(data).hexdigest()
    user = user if getattr(user, "is_authenticated", False) else None
    return _store_upload(data, info, digest, captions, original_name=clean_name(original_name), user=user,
                         collection=collection, queue_embedding=queue_embedding)


@retry_on_conflict
def _store_upload(data, info, digest, captions, *, original_name, user, collection, queue_embedding) -> IngestResult:
    storage = ImageAsset._meta.get_field("file").storage
    with transaction.atomic():
        lock_content(digest)
        existing = ImageAsset.objects.select_for_update().filter(sha256=digest).first()
        if existing is not None:
            restored = _ensure_file(storage, existing.file.name, data, digest)
            if restored:
                log.warning("asset %s had lost its image file; the upload of the same bytes restored it", existing.pk)
            new = _add_captions_locked(existing, captions)
            if (new or restored) and queue_embedding:
                _mark_pending(existing)
                queue_embed(existing.pk)
            _note_captions(existing)
            return IngestResult(asset=existing, created=False, new_captions=new)
        asset = ImageAsset(sha256=digest, original_name=original_name, width=info.width, height=info.height,
                           format=info.format, collection=collection, uploaded_by=user)
        name = image_upload_path(asset, f"upload.{EXTENSIONS[info.format]}")
        wrote = _ensure_file(storage, name, data, digest)
        asset.file.name = name
        try:
            with transaction.atomic():
                asset.save()
                new = _add_captions_locked(asset, captions)
        except BaseException:
            if wrote:  # still under the content lock: no other upload can be using this file
                storage.delete(name)
            raise
        if queue_embedding:
            queue_embed(asset.pk)
        _note_captions(asset)
        return IngestResult(asset=asset, created=True, new_captions=new)


def _ensure_file(storage, name: str, data: bytes, digest: str) -> bool:
    """Make ``name`` hold exactly these bytes; whether it had to be written. Only under the
    content lock of ``digest``: the name is made from the hash, so no other writer is at it."""
    if _holds(storage, name, digest):
        return False  # content-addressed: a file left by an earlier attempt or asset is these bytes
    if storage.exists(name):
        storage.delete(name)  # torn by a writer that died mid-write
    saved = storage.save(name, ContentFile(data))
    if saved != name:
        storage.delete(saved)
        raise OSError(f"the image could not be stored under {name} (the storage chose {saved})")
    return True


def _holds(storage, name: str, digest: str) -> bool:
    """Whether the stored file ``name`` exists and has exactly the bytes with this sha256."""
    try:
        if not storage.exists(name):
            return False
        with storage.open(name, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest() == digest
    except OSError:
        return False


def _add_captions_locked(asset, captions) -> list[Caption]:
    """Create the captions the asset does not have yet (compared normalised); its row is locked."""
    known = set(Caption.objects.filter(asset_id=asset.pk).values_list("normalized_text", flat=True))
    new = []
    for text in captions:
        if normalise_text(text) not in known:
            new.append(Caption.objects.create(asset=asset, text=text))
            known.add(normalise_text(text))
    return new


def _note_captions(asset) -> None:
    """The asset's caption texts as this transaction leaves them (``caption_texts``, as a search
    gathers them), so an answer about it needs no later read."""
    asset.caption_texts = list(Caption.objects.filter(asset_id=asset.pk).order_by("id").values_list("text", flat=True))


def _mark_pending(asset) -> None:
    if asset.status != ImageAsset.Status.PENDING or asset.error:
        ImageAsset.objects.filter(pk=asset.pk).update(status=ImageAsset.Status.PENDING, error="")
        asset.status, asset.error = ImageAsset.Status.PENDING, ""


def _gone(asset_id) -> ImageAsset.DoesNotExist:
    return ImageAsset.DoesNotExist(f"Image {asset_id} was deleted meanwhile.")


def add_captions(asset, captions, *, created=False, queue_embedding=True) -> IngestResult:
    """Add the captions the asset does not have yet (compared normalised); queue embedding."""
    captions = clean_captions(captions)
    with transaction.atomic():
        if not lock_assets([asset.pk]):
            raise _gone(asset.pk)
        new = _add_captions_locked(asset, captions)
        if (created or new) and queue_embedding:
            if new:
                _mark_pending(asset)
            queue_embed(asset.pk)
    return IngestResult(asset=asset, created=created, new_captions=new)


@dataclass
class CaptionChanges:
    added: list[Caption] = field(default_factory=list)
    edited: list[Caption] = field(default_factory=list)
    removed: list[Caption] = field(default_factory=list)


def update_captions(asset, *, add=(), edit=None, remove=()) -> CaptionChanges:
    """Add, edit (``{caption id: new text}``) and remove captions of an asset, under its row
    lock. An edited caption loses its vectors (they describe the old text) and is embedded
    again, like an added one; a vector of the old text that a worker was about to store is
    refused by the worker, which compares the texts under the same lock."""
    add = clean_captions(add)
    edit = {int(k): clean_captions([v]) for k, v in (edit or {}).items()}
    remove = {int(i) for i in remove}
    changes = CaptionChanges()
    with transaction.atomic():
        if not lock_assets([asset.pk]):
            raise _gone(asset.pk)
        captions = {c.pk: c for c in Caption.objects.filter(asset_id=asset.pk)}
        for caption_id in sorted(remove & set(captions)):
            changes.removed.append(captions.pop(caption_id))
        Caption.objects.filter(pk__in=[c.pk for c in changes.removed]).delete()
        taken = {c.normalized_text for c in captions.values() if c.pk not in edit}
        for caption_id, texts in sorted(edit.items()):
            caption = captions.get(caption_id)
            if caption is None or not texts or texts[0] == caption.text:
                continue
            if normalise_text(texts[0]) in taken:
                raise InvalidUpload(f"The caption “{texts[0]}” is already there.")
            caption.text = texts[0]
            caption.save()
            taken.add(caption.normalized_text)
            changes.edited.append(caption)
        Embedding.objects.filter(caption__in=[c.pk for c in changes.edited]).delete()
        changes.added = _add_captions_locked(asset, [t for t in add if normalise_text(t) not in taken])
        if changes.added or changes.edited:
            _mark_pending(asset)
        if changes.added or changes.edited or changes.removed:
            # The worker embeds what has no vector and marks the asset complete again.
            queue_embed(asset.pk)
            _schedule_syncs()
    return changes


def queue_embed(asset_id: int) -> None:
    """Queue embedding once the transaction commits.

    ``robust``: when Valkey is down the upload still succeeds; the asset stays
    pending and the reconciler queues it again later.
    """
    from embeddings.tasks import embed_asset

    transaction.on_commit(lambda: embed_asset.delay(asset_id), robust=True)


def _schedule_syncs() -> None:
    from embeddings.models import EmbeddingModel

    from search.indexing import schedule_index_sync

    for model_id in EmbeddingModel.objects.values_list("pk", flat=True):
        schedule_index_sync(model_id)


def delete_assets(queryset) -> int:
    """Delete assets (rows first, so they leave every search at once), then their files;
    how many this call deleted (an asset another call deleted first is not counted).

    The asset rows are locked before anything else is touched, so a worker storing vectors
    or an upload adding captions finishes first or finds the asset gone; the files are
    removed after the commit, each under its content lock and only when no asset refers to
    it (an upload of the same bytes may have come back meanwhile). A crash between the two
    steps leaves an orphan file, which the reconciler removes later.
    """
    return _delete_rows(list(queryset.values_list("pk", flat=True)))


@retry_on_conflict
def _delete_rows(ids) -> int:
    with transaction.atomic():
        live = lock_assets(ids)
        if not live:
            return 0
        files = list(ImageAsset.objects.filter(pk__in=live).values_list("sha256", "file"))
        ImageAsset.objects.filter(pk__in=live).delete()
        _schedule_syncs()
        transaction.on_commit(lambda: remove_unused_files(files), robust=True)
    return len(live)


def remove_unused_files(files) -> list[str]:
    """Remove the stored files of these ``(sha256, name)`` pairs that no asset refers to, each
    under its content lock; the names removed. Failures are logged: the reconciler retries."""
    storage = ImageAsset._meta.get_field("file").storage
    removed = []
    for digest, name in files:
        if not name:
            continue
        try:
            with transaction.atomic():
                lock_content(digest)
                if ImageAsset.objects.filter(file=name).exists():
                    continue
                storage.delete(name)
                removed.append(name)
        except (OSError, DatabaseError):
            log.warning("could not delete %s; the reconciler will", name, exc_info=True)
    return removed


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
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
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
        content = _read_member(archive, member, name)
        if name.lower() in CAPTION_FILE_NAMES:
            captions = captions_from_file(name, content)
        else:
            images.append((name, content))
    return images, captions


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, name: str) -> bytes:
    """A member's bytes, never more than its declared size (which was checked against the caps)."""
    try:
        with archive.open(member) as handle:
            content = handle.read(member.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise InvalidUpload(f"{name} in the archive cannot be read ({exc}).") from exc
    if len(content) != member.file_size:
        raise InvalidUpload(f"{name} in the archive is damaged (its size does not match the directory).")
    return content


@dataclass
class BulkResult:
    created: list[ImageAsset] = field(default_factory=list)
    existing: list[ImageAsset] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def ingest_many(files, captions_by_name=None, *, user=None, collection="") -> BulkResult:
    """Ingest several (name, bytes or uploaded file) pairs; a bad file is reported, the others
    still land. Uploaded files are read one at a time."""
    captions_by_name = captions_by_name or {}
    if len(files) > settings.UPLOAD_MAX_FILES:
        raise InvalidUpload(f"{len(files)} files sent; the limit is {settings.UPLOAD_MAX_FILES} per request.")
    result = BulkResult()
    for name, data in files:
        try:
            if not isinstance(data, bytes):
                data = read_upload(data)
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
