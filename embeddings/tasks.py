"""Training on a Celery worker: fine-tune or train from scratch, then register the checkpoint."""

import logging

from celery import shared_task

from embeddings import services

log = logging.getLogger(__name__)



@shared_task(bind=True, acks_late=False, time_limit=24 * 3600, soft_time_limit=24 * 3600 - 60)
def train_model_task(self, options: dict, name: str | None = None, activate: bool = False) -> dict:
    """Fine-tune (or train from scratch) and register the checkpoint; progress in the task state."""

    def report(fraction, info):
        self.update_state(state="PROGRESS", meta={"percent": round(100 * fraction, 1),
                                                  **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}})

    model, result = services.train_and_register(options, name=name, activate=activate, on_progress=report)
    return {"model": model.name, "checkpoint": str(result.checkpoint_dir), "final_metrics": result.final_metrics}
