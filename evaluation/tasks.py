"""Benchmark runs on Celery workers, and queueing one."""

from celery import shared_task
from django.db import transaction

from evaluation import services
from evaluation.models import MAX_RUN_SECONDS, BenchmarkRun


# Acknowledged on receipt, not after: a run can outlast the broker's visibility
# timeout, and a redelivered message must not start the same run again.
@shared_task(acks_late=False, time_limit=MAX_RUN_SECONDS, soft_time_limit=MAX_RUN_SECONDS - 300)
def run_benchmark_task(run_id: int) -> dict:
    return services.run_benchmark(run_id)


def queue_benchmark(run: BenchmarkRun) -> BenchmarkRun:
    """Save the run as queued and hand it to a worker once the transaction commits."""
    services.save_queued(run)
    transaction.on_commit(lambda: run_benchmark_task.delay(run.pk))
    return run
