"""Work on Celery workers: embedding assets, index syncs and rebuilds, the periodic
reconciler; and the helpers callers use to queue them after a service returned.

Embedding, together with the settings (acks late, requeue on a lost worker, a short
visibility timeout):

- a task is acknowledged only after it ran, so a worker killed mid-task leaves it to be
  delivered again; running it twice stores nothing twice (``asset_vectors.embed_asset`` is
  idempotent and the unique constraints back it up);
- transient failures (database or broker briefly away) are retried with backoff;
- a permanent failure (unreadable file, no model) marks the asset failed with the reason;
- an image on which the worker keeps dying is marked failed after EMBED_MAX_CRASHES
  deliveries instead of taking the worker down for ever.

Index maintenance is safe to run twice as well (a redelivered message after a worker died,
or one that outlived the visibility timeout): a sync of an index already in step writes
nothing, and a rebuild that already finished under the same task id is skipped.
"""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.cache import cache
from django.db import InterfaceError, OperationalError, transaction

from embeddings import services
from embeddings.core.siglip import ModelNotAvailable
from embeddings.models import EmbeddingModel
from search import asset_vectors, index_merge, index_sync, reconciler

log = logging.getLogger(__name__)


TRANSIENT = (OperationalError, InterfaceError, ConnectionError, TimeoutError)


DONE_TTL = 24 * 3600


def _already_done(task) -> bool:
    try:
        return bool(task.request.id) and cache.get(f"task-done:{task.request.id}") is not None
    except Exception:
        return False


def _mark_done(task) -> None:
    try:
        if task.request.id:
            cache.set(f"task-done:{task.request.id}", 1, timeout=DONE_TTL)
    except Exception:
        pass


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=120, max_retries=8)
def sync_indices_task(model_id: int) -> dict:
    clear_sync_pending(model_id)
    model = EmbeddingModel.objects.filter(pk=model_id).first()
    if model is None:
        return {}  # the model was deleted after this was queued
    results = index_sync.sync_indices(model)
    queue_merges(model_id, results)
    return {r.modality: {"added": r.added, "removed": r.removed, "merge_due": r.merge_due} for r in results}


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=120, max_retries=8)
def merge_index_task(model_id: int, modality: str) -> dict:
    """Fold an index's segments (search.index_merge); queue the next merge if one is due."""
    clear_merge_pending(model_id, modality)
    model = EmbeddingModel.objects.filter(pk=model_id).first()
    result = index_merge.merge_index(model, modality) if model is not None else None
    if result is not None:
        queue_merges(model_id, [result])
    return result.as_dict() if result is not None else {}


@shared_task(bind=True, autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=120, max_retries=8)
def rebuild_indices_task(self, model_id: int) -> dict:
    if _already_done(self):
        return {"skipped": "already rebuilt by an earlier delivery"}
    model = EmbeddingModel.objects.filter(pk=model_id).first()
    if model is None:
        return {}
    results = index_sync.sync_indices(model, rebuild=True)
    _mark_done(self)
    return {r.modality: r.build.vector_count if r.build else 0 for r in results}


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=120, max_retries=3)
def reconcile_task(files: bool = False) -> dict:
    """Periodic (Celery beat): re-queue stuck assets, check every index against Postgres."""
    try:
        if not cache.add("reconcile-running", 1, timeout=15 * 60):
            return {"skipped": "another reconcile is running"}
    except Exception:
        pass  # no Valkey, no lock: running twice is harmless
    try:
        report = reconciler.reconcile(files=files)
        queue_requeued(report)
        return report.as_dict()
    finally:
        try:
            cache.delete("reconcile-running")
        except Exception:
            pass


# Short enough for the visibility timeout: a task that outlives it would be delivered twice.
EMBED_TIME_LIMIT = 240


def _crashes_before(task, asset_id: int) -> int:
    """How many earlier deliveries of this task ended with the worker dying.

    Each delivery counts itself; Celery's own retries are not crashes. When Valkey is
    unreachable nothing is counted (and the task runs).
    """
    key = f"embed-deliveries:{task.request.id or asset_id}"
    try:
        cache.add(key, 0, timeout=24 * 3600)
        deliveries = cache.incr(key)
    except Exception:
        return 0
    return max(0, deliveries - 1 - (task.request.retries or 0))


def _forget_deliveries(task) -> None:
    try:
        cache.delete(f"embed-deliveries:{task.request.id}")
    except Exception:
        pass


@shared_task(bind=True, autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=120, max_retries=8,
             time_limit=EMBED_TIME_LIMIT, soft_time_limit=EMBED_TIME_LIMIT - 30)
def embed_asset_task(self, asset_id: int) -> int:
    # The model loads before this delivery is counted: a worker that dies while loading it
    # (a fresh worker takes seconds) has not died on this image, and must not count against it.
    try:
        model = services.active_model()
        services.encoder_for(model)
    except ModelNotAvailable as exc:
        asset_vectors.mark_failed(asset_id, f"{type(exc).__name__}: {exc}")
        raise
    crashes = _crashes_before(self, asset_id)
    if crashes >= settings.EMBED_MAX_CRASHES:
        log.error("asset %s: the worker stopped %s times while embedding it; marking it failed", asset_id, crashes)
        asset_vectors.mark_failed(
            asset_id,
            f"The worker stopped {crashes} times while embedding this image, so it is no longer tried. "
            "Use “Embed again” in the admin to retry it.",
        )
        _forget_deliveries(self)
        return 0
    try:
        stored = asset_vectors.embed_asset(asset_id, model)
    except TRANSIENT:
        raise
    except SoftTimeLimitExceeded:
        asset_vectors.mark_failed(asset_id, f"Embedding took longer than {EMBED_TIME_LIMIT - 30} seconds.")
        _forget_deliveries(self)
        raise
    except (ValueError, OSError, ModelNotAvailable) as exc:
        asset_vectors.mark_failed(asset_id, f"{type(exc).__name__}: {exc}")
        _forget_deliveries(self)
        raise
    _forget_deliveries(self)
    if stored:
        schedule_index_sync(model.pk)
    return stored


# --- Queueing: what callers use after a service returned --------------------------


def _pending_key(model_id: int) -> str:
    return f"index-sync-pending:{model_id}"


def schedule_index_sync(model_id: int) -> None:
    """Queue one index sync after commit; a burst of uploads shares a single sync."""

    def enqueue():
        if cache.add(_pending_key(model_id), 1, timeout=600):
            sync_indices_task.delay(model_id)

    # robust: with Valkey away the commit still stands; the reconciler repairs the index later.
    transaction.on_commit(enqueue, robust=True)


def schedule_index_syncs() -> None:
    """An index sync of every model (after rows that all of them index went away)."""
    for model_id in EmbeddingModel.objects.values_list("pk", flat=True):
        schedule_index_sync(model_id)


def clear_sync_pending(model_id: int) -> None:
    cache.delete(_pending_key(model_id))


def _merge_pending_key(model_id: int, modality: str) -> str:
    return f"index-merge-pending:{model_id}:{modality}"


def queue_merges(model_id: int, results) -> None:
    """Queue a merge of each index a sync or merge result says is due for one (at most one
    queued per index; a merge that finds nothing due does nothing). A queue that is down
    only delays it: the next sync asks again."""
    for result in results:
        if not result.merge_due:
            continue
        key = _merge_pending_key(model_id, result.modality)
        try:
            if cache.add(key, 1, timeout=3600):
                merge_index_task.apply_async((model_id, str(result.modality)),
                                             queue=settings.INDEX_MERGE_QUEUE or None)
        except Exception as exc:
            log.warning("could not queue a merge of the %s index of model %s: %s", result.modality, model_id, exc)
            clear_merge_pending(model_id, result.modality)


def clear_merge_pending(model_id: int, modality: str) -> None:
    try:
        cache.delete(_merge_pending_key(model_id, modality))
    except Exception:
        pass


def queue_embedding(*asset_ids: int) -> None:
    """Queue embedding of these assets once the transaction commits.

    ``robust``: when Valkey is down the upload still succeeds; the asset stays
    pending and the reconciler queues it again later.
    """
    for asset_id in asset_ids:
        transaction.on_commit(lambda asset_id=asset_id: embed_asset_task.delay(asset_id), robust=True)


def queue_follow_ups(result) -> None:
    """Queue what a curation result (``search.curation``) asks for: embedding, index syncs."""
    queue_embedding(*result.to_embed)
    if result.changes_indices:
        schedule_index_syncs()


def queue_requeued(report) -> None:
    """Queue the stuck assets a reconciler report picked; a queue that is down ends it
    (the next run tries again)."""
    for asset_id in report.to_requeue:
        try:
            embed_asset_task.delay(asset_id)
        except Exception as exc:
            report.errors.append(f"could not queue asset {asset_id}: {exc}")
            break
        report.requeued.append(asset_id)
    for model_id in report.to_sync:
        schedule_index_sync(model_id)
