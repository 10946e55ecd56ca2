from celery import shared_task
from django.db import OperationalError

from . import services

TRANSIENT = (OperationalError, ConnectionError, TimeoutError)


@shared_task(autoretry_for=TRANSIENT, retry_backoff=True, retry_backoff_max=300, max_retries=8)
def embed_asset(asset_id: int) -> int:
    try:
        return services.embed_asset(asset_id)
    except TRANSIENT:
        raise
    except (ValueError, OSError, services.ModelNotAvailable) as exc:
        services.mark_failed(asset_id, f"{type(exc).__name__}: {exc}")
        raise
