from celery import shared_task
from django.db import OperationalError

from embeddings.models import EmbeddingModel

from . import indexing


@shared_task(autoretry_for=(OperationalError, ConnectionError), retry_backoff=True, max_retries=8)
def sync_indices(model_id: int) -> dict:
    indexing.clear_sync_pending(model_id)
    results = indexing.sync_indices(EmbeddingModel.objects.get(pk=model_id))
    return {r.modality: {"added": r.added, "removed": r.removed} for r in results}


@shared_task(autoretry_for=(OperationalError, ConnectionError), retry_backoff=True, max_retries=8)
def rebuild_indices(model_id: int) -> dict:
    results = indexing.sync_indices(EmbeddingModel.objects.get(pk=model_id), rebuild=True)
    return {r.modality: r.build.vector_count if r.build else 0 for r in results}
