"""Shared fixtures: a tiny SigLIP checkpoint built here, named users, a real Celery worker.

The suite runs against the PostgreSQL and Valkey that `bin/test` starts (or the
ones DATABASE_URL / REDIS_URL point at); nothing is mocked and nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import image_bytes

ROOT = Path(__file__).resolve().parent.parent
TEST_CAPTIONS = [
    "a red square on a white background",
    "a blue circle in the middle",
    "a green triangle pointing up",
    "two dogs playing in the snow",
    "a man riding a surfboard on a wave",
    "a bowl of fruit on a wooden table",
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from embeddings.core.checkpoints import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("tiny-siglip"), TEST_CAPTIONS, seed=0)


@pytest.fixture(autouse=True)
def fresh_search_throttles():
    """Each test starts with the search and upload throttles' counters empty: a whole run sends
    more searches from the test client's one address in a minute than a visitor may. Only those
    keys go; the tests of the throttles themselves fill their own."""
    yield
    from django.conf import settings

    if "redis" not in settings.CACHES["default"]["BACKEND"].lower():
        return
    import redis

    try:
        client = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"], socket_timeout=2)
        keys = list(client.scan_iter(match="*throttle_*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass  # a test that stopped Valkey: nothing to forget


@pytest.fixture(autouse=True)
def forget_the_serving_model():
    """Each test has its own rows: no search starts from a model an earlier test served."""
    serving = sys.modules.get("search.serving")
    if serving is not None:
        serving.served_model.forget()
    filters = sys.modules.get("search.filters")
    if filters is not None:  # nor from an earlier test's table of filterable attributes
        filters.facets.forget()
        filters.hidden_names.forget()


@pytest.fixture(scope="session")
def clean_state(django_db_setup):
    """Start each session with empty media and index folders and an empty queue."""
    from django.conf import settings
    from django.core.cache import cache

    for folder in (settings.MEDIA_ROOT, settings.INDEX_DIR):
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True, exist_ok=True)
    cache.clear()
    import redis

    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()


@pytest.fixture
def tiny_model(db, clean_state, tiny_checkpoint):
    from embeddings.services import register_model

    return register_model(str(tiny_checkpoint), name="tiny-test-siglip", kind="random")




@pytest.fixture
def make_image():
    return image_bytes


@pytest.fixture
def staff_user(django_user_model):
    return django_user_model.objects.create_user("curator", password="pw-curator", is_staff=True)


@pytest.fixture
def plain_user(django_user_model):
    return django_user_model.objects.create_user("visitor", password="pw-visitor")


@pytest.fixture
def staff_client(staff_user):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff_user).key}")
    return client


@pytest.fixture
def api_client():
    from rest_framework.test import APIClient

    return APIClient()


def _test_database_url() -> str:
    from django.db import connection

    base = os.environ["DATABASE_URL"].split("?", 1)[0].rsplit("/", 1)[0]
    return f"{base}/{connection.settings_dict['NAME']}"


@pytest.fixture
def celery_worker_process(transactional_db, clean_state):
    """A real `celery worker` process on the test database; stopped after the test."""
    from django.conf import settings

    from portal.celery import app

    env = dict(os.environ, DATABASE_URL=_test_database_url(), DJANGO_SETTINGS_MODULE="portal.settings",
               MEDIA_ROOT=str(settings.MEDIA_ROOT), INDEX_DIR=str(settings.INDEX_DIR))
    hostname = f"test-worker-{os.getpid()}-{time.monotonic_ns()}@localhost"
    log_path = Path(settings.STATE_DIR) / "test-worker.log"
    log = open(log_path, "ab")
    log_start = log.tell()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "portal", "worker", "--pool=solo", "--loglevel=INFO",
         "--without-gossip", "--without-mingle", "-n", hostname],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[hostname], timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"celery worker did not start; see {log.name}")
    proc.log_path, proc.log_start = log_path, log_start  # what this test's worker logged starts here
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()




