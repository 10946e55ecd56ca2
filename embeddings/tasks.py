"""Embedding on Celery workers.

Reliability, together with the settings (acks late, requeue on a lost worker, a short
visibility timeout):

- a task is acknowledged only after it ran, so a worker killed mid-task leaves it to be
  delivered again; running it twice stores nothing twice (``services.embed_asset`` is
  idempotent and the unique constraints back it up);
- transient failures (database or broker briefly away) are retried with backoff;
- a permanent failure (unreadable file, no model) marks the asset failed with the reason;
- an image on which the worker keeps dying is marked failed after EMBED_MAX_CRASHES
  deliveries instead of taking the worker down for ever.
"""

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.cache import cache
from django.db import InterfaceError, OperationalError

from embeddings import services

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, InterfaceError, ConnectionError, TimeoutError)
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
def embed_asset(self, asset_id: int) -> int:
    # The model loads before this delivery is counted: a worker that dies while loading it
    # (a fresh worker takes seconds) has not died on this image, and must not count against it.
    try:
        services.encoder_for(services.active_model())
    except services.ModelNotAvailable as exc:
        services.mark_failed(asset_id, f"{type(exc).__name__}: {exc}")
        raise
    crashes = _crashes_before(self, asset_id)
    if crashes >= settings.EMBED_MAX_CRASHES:
        log.error("asset %s: the worker stopped %s times while embedding it; marking it failed", asset_id, crashes)
        services.mark_failed(
            asset_id,
            f"The worker stopped {crashes} times while embedding this image, so it is no longer tried. "
            "Use “Embed again” in the admin to retry it.",
        )
        _forget_deliveries(self)
        return 0
    try:
        stored = services.embed_asset(asset_id)
    except TRANSIENT:
        raise
    except SoftTimeLimitExceeded:
        services.mark_failed(asset_id, f"Embedding took longer than {EMBED_TIME_LIMIT - 30} seconds.")
        _forget_deliveries(self)
        raise
    except (ValueError, OSError, services.ModelNotAvailable) as exc:
        services.mark_failed(asset_id, f"{type(exc).__name__}: {exc}")
        _forget_deliveries(self)
        raise
    _forget_deliveries(self)
    return stored


@shared_task(bind=True, acks_late=False, time_limit=24 * 3600, soft_time_limit=24 * 3600 - 60)
def train_model(self, options: dict, name: str | None = None, activate: bool = False) -> dict:
    """Fine-tune (or train from scratch) and register the checkpoint; progress in the task state."""
    from embeddings import training_service

    def report(fraction, info):
        self.update_state(state="PROGRESS", meta={"percent": round(100 * fraction, 1),
                                                  **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}})

    model, result = training_service.train_and_register(options, name=name, activate=activate, on_progress=report)
    return {"model": model.name, "checkpoint": str(result.checkpoint_dir), "final_metrics": result.final_metrics}
