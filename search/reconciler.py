"""The reconciler: finds what fell through the cracks and puts it right.

Run periodically by Celery beat (``search.tasks.reconcile_task``) and by hand with
``python manage.py reconcile``. Each run

1. picks for re-queueing (the caller queues them: ``search.tasks.queue_requeued``) the
   assets left ``pending`` longer than RECONCILE_STUCK_AFTER (their task was
   lost: Valkey wiped, an upload while the queue was down, a task that ran out of
   retries). Each one at most once per threshold window, so a long queue is not
   flooded with copies; running the task twice is harmless anyway.
2. checks every index (image and caption, of the active model and of any model with
   index files) against Postgres: the same ids, hence the same count. A missing,
   torn or stale index is repaired by a sync, which writes a new version.
3. optionally (``files=True``; the command does it by default) removes stored images
   and index files that no row refers to any more (left by a crash between the two
   steps of an upload, a delete or an index write) once they are an hour old, and
   lists assets whose image file is missing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from embeddings.models import Embedding, EmbeddingModel
from search import curation, index_changes, index_sync
from search.locking import lock_assets, lock_content
from search.models import ImageAsset, IndexBuild

log = logging.getLogger(__name__)

ORPHAN_GRACE_SECONDS = 3600
REQUEUE_LIMIT = 1000


@dataclass
class IndexCheck:
    model: str
    modality: str
    expected: int  # vectors in Postgres
    indexed: int  # vectors in the newest loadable version, before any repair
    missing: int
    extra: int
    version: int | None  # served version after the check (and repair)
    repaired: bool = False
    error: str = ""

    @property
    def in_step(self) -> bool:
        return not self.missing and not self.extra and not self.error


@dataclass
class ReconcileReport:
    stuck: int = 0
    to_requeue: list[int] = field(default_factory=list)  # queued by search.tasks.queue_requeued
    requeued: list[int] = field(default_factory=list)
    to_sync: list[int] = field(default_factory=list)  # models whose indices lost rows here
    indices: list[IndexCheck] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    orphan_index_files: list[str] = field(default_factory=list)
    missing_files: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False
    took_s: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing needed doing."""
        return not (self.stuck or self.orphan_files or self.orphan_index_files or self.missing_files
                    or self.errors or any(not c.in_step for c in self.indices))

    def as_dict(self) -> dict:
        data = asdict(self)
        data["clean"] = self.clean
        return data


def stuck_assets(older_than: float):
    cutoff = timezone.now() - timedelta(seconds=older_than)
    return ImageAsset.objects.filter(status=ImageAsset.Status.PENDING, created__lte=cutoff).order_by("id")


def requeue_stuck(report: ReconcileReport, older_than: float, *, dry_run: bool = False) -> None:
    ids = list(stuck_assets(older_than).values_list("pk", flat=True)[:REQUEUE_LIMIT])
    report.stuck = len(ids)
    for asset_id in ids:
        if dry_run:
            continue
        if older_than > 0:
            try:
                if not cache.add(f"reconcile-requeued:{asset_id}", 1, timeout=int(older_than)):
                    continue  # re-queued within the last window: its task is probably still queued
            except Exception:
                pass
        report.to_requeue.append(asset_id)


def models_with_indices():
    ids = set(IndexBuild.objects.values_list("model_id", flat=True).distinct())
    active = EmbeddingModel.active()
    if active is not None:
        ids.add(active.pk)
    return list(EmbeddingModel.objects.filter(pk__in=ids).order_by("pk"))


def check_index(model: EmbeddingModel, modality: str, *, repair: bool = True) -> IndexCheck:
    """The ids of the newest good version against Postgres (read from its keys files, no
    vectors loaded); drift is repaired by a sync that compares every id."""
    wanted = index_sync.stored_ids(model, modality)
    present, build = index_sync.indexed_ids(model, modality)
    check = IndexCheck(
        model=model.name,
        modality=modality,
        expected=len(wanted),
        indexed=len(present),
        missing=len(np.setdiff1d(wanted, present)),
        extra=len(np.setdiff1d(present, wanted)),
        version=build.version if build else None,
    )
    if check.in_step or not repair:
        return check
    log.warning("index %s/%s is out of step (%s missing, %s extra): syncing",
                model.name, modality, check.missing, check.extra)
    result = index_sync.sync_index(model, modality, full=True)
    check.repaired = True
    check.version = result.build.version if result.build else None
    if result.build is None or result.build.vector_count != len(index_sync.stored_ids(model, modality)):
        check.error = "the repaired index still differs from Postgres (vectors changed meanwhile?)"
    return check


def check_indices(report: ReconcileReport, *, repair: bool = True) -> None:
    for model in models_with_indices():
        for modality in index_sync.MODALITIES:
            try:
                report.indices.append(check_index(model, modality, repair=repair))
            except Exception as exc:
                log.exception("checking the %s index of %s failed", modality, model)
                report.errors.append(f"{model.name}/{modality}: {type(exc).__name__}: {exc}")


def _old_enough(path: Path, now: float) -> bool:
    try:
        return now - path.stat().st_mtime > ORPHAN_GRACE_SECONDS
    except OSError:
        return False


MISSING_FILE_ERROR = ("The image file is missing from storage, so this image was taken out of search. "
                      "Upload the same image again to restore it, or delete this entry.")


def check_files(report: ReconcileReport, *, dry_run: bool = False) -> None:
    """Stored files no asset refers to (removed, each under its content lock, once they are
    an hour old: an upload may be about to commit its row) and assets whose file is gone
    (marked failed and taken out of search: their vectors are dropped)."""
    now = time.time()
    media = Path(settings.MEDIA_ROOT)
    known = set(ImageAsset.objects.values_list("file", flat=True).iterator())
    images = media / "images"
    candidates = []
    if images.is_dir():
        for path in images.rglob("*"):
            name = path.relative_to(media).as_posix()
            if path.is_file() and name not in known and _old_enough(path, now):
                candidates.append((path.stem, name))
    if dry_run:
        report.orphan_files.extend(name for _, name in candidates)
    else:
        report.orphan_files.extend(curation.remove_unused_files(candidates))
    for asset_id, name in ImageAsset.objects.exclude(error=MISSING_FILE_ERROR).values_list("pk", "file").iterator():
        if not name or not (media / name).is_file():
            report.missing_files.append(asset_id)
    if not dry_run:
        if any([_take_out_of_search(asset_id, media) for asset_id in report.missing_files]):
            report.to_sync = list(EmbeddingModel.objects.values_list("pk", flat=True))
    index_root = Path(settings.INDEX_DIR)
    referenced, complete = index_sync.referenced_files(IndexBuild.objects.all())
    if index_root.is_dir() and complete:
        for path in index_root.glob("model-*/*/*"):
            if path.is_file() and path.resolve() not in referenced and _old_enough(path, now):
                report.orphan_index_files.append(str(path))
                if not dry_run:
                    path.unlink(missing_ok=True)
    if report.missing_files:
        log.warning("%s assets have no image file: %s", len(report.missing_files), report.missing_files[:20])


def _take_out_of_search(asset_id: int, media: Path) -> bool:
    """An asset whose file is gone: failed, with its vectors dropped (under its content lock and
    row lock, and only if the file is still missing then: an upload may have restored it).
    Whether it was taken out."""
    asset = ImageAsset.objects.filter(pk=asset_id).first()
    if asset is None:
        return False
    with transaction.atomic():
        lock_content(asset.sha256)
        if not lock_assets([asset_id]) or (asset.file.name and (media / asset.file.name).is_file()):
            return False
        Embedding.objects.filter(Q(asset_id=asset_id) | Q(caption__asset_id=asset_id)).delete()
        ImageAsset.objects.filter(pk=asset_id).update(status=ImageAsset.Status.FAILED, error=MISSING_FILE_ERROR)
    return True


def reconcile(*, stuck_after: float | None = None, files: bool = False, dry_run: bool = False) -> ReconcileReport:
    started = time.perf_counter()
    stuck_after = settings.RECONCILE_STUCK_AFTER if stuck_after is None else stuck_after
    report = ReconcileReport(dry_run=dry_run)
    requeue_stuck(report, stuck_after, dry_run=dry_run)
    check_indices(report, repair=not dry_run)
    if not dry_run:
        index_changes.forget_deleted_models()
    if files:
        check_files(report, dry_run=dry_run)
    report.took_s = round(time.perf_counter() - started, 3)
    if not report.clean:
        log.info("reconcile: %s", report.as_dict())
    return report
