"""Index maintenance on Celery workers: debounced syncs, rebuilds and the periodic reconciler.

All are safe to run twice (a redelivered message after a worker died, or one that
outlived the visibility timeout): a sync of an index already in step writes nothing,
and a rebuild that already finished under the same task id is skipped.
"""

import logging

from celery import shared_task
from django.core.cache import cache
from django.db import InterfaceError, OperationalError

from embeddings.models import EmbeddingModel

from search import indexing

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
def sync_indices(model_id: int) -> dict:
    indexing.clear_sync_pending(model_id)
    model = EmbeddingModel.objects.filter(pk=model_id).first()
    if model is None:
        return {}  # the model was deleted after this was queued
    results = indexing.sync_indices(model)
    return {r.modality: {"added": r.added, "removed": r.removed} for r in results}


@shared_task(bind=True, autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=120, max_retries=8)
def rebuild_indices(self, model_id: int) -> dict:
    if _already_done(self):
        return {"skipped": "already rebuilt by an earlier delivery"}
    model = EmbeddingModel.objects.filter(pk=model_id).first()
    if model is None:
        return {}
    results = indexing.sync_indices(model, rebuild=True)
    _mark_done(self)
    return {r.modality: r.build.vector_count if r.build else 0 for r in results}


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=120, max_retries=3)
def reconcile(files: bool = False) -> dict:
    """Periodic (Celery beat): re-queue stuck assets, check every index against Postgres."""
    from search import reconciler

    try:
        if not cache.add("reconcile-running", 1, timeout=15 * 60):
            return {"skipped": "another reconcile is running"}
    except Exception:
        pass  # no Valkey, no lock: running twice is harmless
    try:
        return reconciler.reconcile(files=files).as_dict()
    finally:
        try:
            cache.delete("reconcile-running")
        except Exception:
            pass
