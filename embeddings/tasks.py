"""Embedding on Celery workers.

Reliability, together with the settings (acks late, requeue on a lost worker, a short
visibility timeout):

- a task is acknowledged only after it ran, so a worker killed mid-task leaves it to be
  delivered again; running it twice stores nothing twice (``asset_vectors.embed_asset`` is
  idempotent and the unique constraints back it up);
- transient failures (database or broker briefly away) are retried with backoff;
- a permanent failure (unreadable file, no model) marks the asset failed with the reason;
- an image on which the worker keeps dying is marked failed after EMBED_MAX_CRASHES
  deliveries instead of taking the worker down for ever.
"""

import logging

from celery import shared_task
from django.db import InterfaceError, OperationalError

from embeddings import services

log = logging.getLogger(__name__)


TRANSIENT = (OperationalError, InterfaceError, ConnectionError, TimeoutError)


@shared_task(bind=True, acks_late=False, time_limit=24 * 3600, soft_time_limit=24 * 3600 - 60)
def train_model(self, options: dict, name: str | None = None, activate: bool = False) -> dict:
    """Fine-tune (or train from scratch) and register the checkpoint; progress in the task state."""

    def report(fraction, info):
        self.update_state(state="PROGRESS", meta={"percent": round(100 * fraction, 1),
                                                  **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}})

    model, result = services.train_and_register(options, name=name, activate=activate, on_progress=report)
    return {"model": model.name, "checkpoint": str(result.checkpoint_dir), "final_metrics": result.final_metrics}
