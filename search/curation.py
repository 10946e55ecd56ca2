"""Curation: storing uploaded images as assets with captions, editing captions, deleting.

Every way in (admin, bulk upload, API, dataset import) goes through ``ingest_image``,
which checks the bytes first (``search.validation``). The results say what to queue
next (the assets to embed, whether indices lost rows); the caller queues it with
``search.tasks.queue_follow_ups``, so nothing here knows about Celery.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import DatabaseError, transaction
from django.utils import timezone

from embeddings.models import Embedding
from search.archives import basename
from search.locking import lock_assets, lock_content, retry_on_conflict
from search.models import Caption, Collection, ImageAsset, image_upload_path, normalise_text
from search.validation import EXTENSIONS, InvalidUpload, clean_captions, clean_name, inspect_image, read_upload

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FollowUps:
    """What a curation call leaves to queue (``search.tasks.queue_follow_ups``): the assets to
    embed; ``changes_indices``, whether rows the indices hold went away."""

    to_embed: list[int] = field(default_factory=list)
    changes_indices: bool = False


@dataclass
class IngestResult(FollowUps):
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
) -> IngestResult:
    """Store an image (deduplicated by sha256) and its captions; the result names the asset
    to embed when it has anything new.

    Re-uploading the same bytes returns the existing asset, adding any captions it did not
    have yet (and its file, should that have been lost). Uploads of the same bytes are
    serialised by the content lock (``search.locking``), so of any number of concurrent
    ones exactly one creates the asset and the others add their captions to it.
    """
    info = inspect_image(data)
    captions = clean_captions(captions)
    digest = hashlib.sha256(data).hexdigest()
    user = user if getattr(user, "is_authenticated", False) else None
    ensure_collection(collection)
    return _store_upload(data, info, digest, captions, original_name=clean_name(original_name), user=user,
                         collection=collection)


def ensure_collection(name: str) -> None:
    """Give a collection named for the first time its row, with the default visibility
    (``COLLECTION_DEFAULT_VISIBILITY``); an existing row keeps its own.

    Called before an upload's transaction takes its locks: the usual case (the row is there)
    is one read and locks nothing; a new name is one ``INSERT … ON CONFLICT DO NOTHING``, so
    two uploads naming it at once both go on.
    """
    if not Collection.objects.filter(name=name).exists():
        Collection.objects.bulk_create([Collection(name=name, visibility=settings.COLLECTION_DEFAULT_VISIBILITY)],
                                       ignore_conflicts=True)


@retry_on_conflict
def _store_upload(data, info, digest, captions, *, original_name, user, collection) -> IngestResult:
    storage = ImageAsset._meta.get_field("file").storage
    with transaction.atomic():
        lock_content(digest)
        existing = ImageAsset.objects.select_for_update().filter(sha256=digest).first()
        if existing is not None:
            restored = _ensure_file(storage, existing.file.name, data, digest)
            if restored:
                log.warning("asset %s had lost its image file; the upload of the same bytes restored it", existing.pk)
            new = _add_captions_locked(existing, captions)
            if new or restored:
                _mark_pending(existing)
            _note_captions(existing)
            return IngestResult(asset=existing, created=False, new_captions=new,
                                to_embed=[existing.pk] if new or restored else [])
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
        _note_captions(asset)
        return IngestResult(asset=asset, created=True, new_captions=new, to_embed=[asset.pk])


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
        ImageAsset.objects.filter(pk=asset.pk).update(status=ImageAsset.Status.PENDING, error="", updated=timezone.now())
        asset.status, asset.error = ImageAsset.Status.PENDING, ""


def _gone(asset_id) -> ImageAsset.DoesNotExist:
    return ImageAsset.DoesNotExist(f"Image {asset_id} was deleted meanwhile.")


def add_captions(asset, captions, *, created=False) -> IngestResult:
    """Add the captions the asset does not have yet (compared normalised); the asset is to
    embed when it is new (``created``) or got captions."""
    captions = clean_captions(captions)
    with transaction.atomic():
        if not lock_assets([asset.pk]):
            raise _gone(asset.pk)
        new = _add_captions_locked(asset, captions)
        if new:
            _mark_pending(asset)
    return IngestResult(asset=asset, created=created, new_captions=new, to_embed=[asset.pk] if created or new else [])


@dataclass
class CaptionChanges(FollowUps):
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
            changes.to_embed = [asset.pk]
            changes.changes_indices = True
    return changes


def delete_assets(queryset) -> int:
    """Delete assets (rows first, so they leave every search at once), then their files;
    how many this call deleted (an asset another call deleted first is not counted).
    The caller schedules the index syncs (``search.tasks.schedule_index_syncs``).

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


@dataclass
class BulkUploadResult(FollowUps):
    created: list[ImageAsset] = field(default_factory=list)
    existing: list[ImageAsset] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def ingest_many(files, captions_by_name=None, *, user=None, collection="") -> BulkUploadResult:
    """Ingest several (name, bytes or uploaded file) pairs; a bad file is reported, the others
    still land. Uploaded files are read one at a time."""
    captions_by_name = captions_by_name or {}
    if len(files) > settings.UPLOAD_MAX_FILES:
        raise InvalidUpload(f"{len(files)} files sent; the limit is {settings.UPLOAD_MAX_FILES} per request.")
    result = BulkUploadResult()
    for name, data in files:
        try:
            if not isinstance(data, bytes):
                data = read_upload(data)
            outcome = ingest_image(
                data,
                captions_by_name.get(basename(name), []),
                original_name=name,
                user=user,
                collection=collection,
            )
        except InvalidUpload as exc:
            result.errors.append(f"{name}: {exc}")
            continue
        (result.created if outcome.created else result.existing).append(outcome.asset)
        result.to_embed += outcome.to_embed
    return result
