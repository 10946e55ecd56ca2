from celery import shared_task

from evaluation import services
from evaluation.models import MAX_RUN_SECONDS


# Acknowledged on receipt, not after: a run can outlast the broker's visibility
# timeout, and a redelivered message must not start the same run again.
@shared_task(acks_late=False, time_limit=MAX_RUN_SECONDS, soft_time_limit=MAX_RUN_SECONDS - 300)
def run_benchmark(run_id: int) -> dict:
    return services.run_benchmark(run_id)
