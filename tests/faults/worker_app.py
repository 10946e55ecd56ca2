"""The portal's Celery app, for fault runs: the real tasks and settings, slowed down
deterministically so a kill lands inside a task, and reporting task starts and ends.

    celery -A tests.faults.worker_app worker ...

FAULT_EMBED_DELAY   seconds added after an image is encoded (before its vectors are stored)
FAULT_POSTRUN_DELAY seconds added after a task has returned (stored, not yet acknowledged)
FAULT_EVENTS        file that gets one line per task start and end: time pid event task args
"""

import os
import time

from celery.signals import task_postrun, task_prerun

from embeddings.core import siglip
from portal.celery import app

EMBED_DELAY = float(os.environ.get("FAULT_EMBED_DELAY", "0"))
POSTRUN_DELAY = float(os.environ.get("FAULT_POSTRUN_DELAY", "0"))
EVENTS = os.environ.get("FAULT_EVENTS")

_encode_images = siglip.SiglipEncoder.encode_images


def _slow_encode_images(self, *args, **kwargs):
    vectors = _encode_images(self, *args, **kwargs)
    time.sleep(EMBED_DELAY)
    return vectors


if EMBED_DELAY:
    siglip.SiglipEncoder.encode_images = _slow_encode_images


def _event(kind, task, args):
    if EVENTS:
        with open(EVENTS, "a") as fh:
            fh.write(f"{time.time():.6f} {os.getpid()} {kind} {task.name} {' '.join(map(str, args or ()))}\n")


@task_prerun.connect
def _started(sender=None, task=None, args=None, **kwargs):
    _event("start", task, args)


@task_postrun.connect
def _ended(sender=None, task=None, args=None, **kwargs):
    _event("end", task, args)
    if POSTRUN_DELAY and task.name == "search.tasks.embed_asset_task":
        time.sleep(POSTRUN_DELAY)


__all__ = ["app"]
