"""Fault tests with real processes: a short run of ``tests/faults/run_faults.py`` on a private
stack (its own PostgreSQL, Valkey, gunicorn and Celery workers on loopback), so CI exercises
every fault. The full run (20+ kills each) is

    .venv/bin/python -m tests.faults.run_faults
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.faults import run_faults
from tests.faults.stack import FaultStack


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    from django.conf import settings

    # Under the session's own state folder: pytest's shared temp root is pruned by other runs,
    # and the database server (another system user) must be able to reach the folder.
    root = Path(tempfile.mkdtemp(prefix="faults-", dir=settings.STATE_DIR))
    checkpoint = root / "tiny-siglip"
    shutil.copytree(tiny_checkpoint, checkpoint)
    lines = []
    fault_stack = FaultStack(root / "stack", log=lines.append)
    try:
        fault_stack.start(checkpoint=checkpoint)
        fault_stack.start_web(workers=1)
        fault_stack.lines = lines
        yield fault_stack
    finally:
        fault_stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def check(report, lines, faults):
    detail = "\n".join(lines) + f"\n{report.as_dict()}"
    assert report.faults >= faults, detail
    assert report.lost == 0, detail
    assert report.duplicates == 0, detail
    assert not report.problems, detail


def test_index_writes_killed_in_every_phase_leave_the_last_good_version_served(stack):
    report = run_faults.index_kills(stack, 3, stack.lines.append, random.Random(1), vectors=1500, tear_every=3)
    check(report, stack.lines, 4)
    assert report.details["torn_files"] == 1 and report.details["temp_files_after_next_write"] == 0


def test_delta_syncs_killed_before_and_after_each_write_lose_nothing_and_bring_nothing_back(stack):
    report = run_faults.delta_kills(stack, len(run_faults.DELTA_PHASES), stack.lines.append, random.Random(5))
    check(report, stack.lines, len(run_faults.DELTA_PHASES))
    assert report.details["ghosts"] == 0 and report.details["wrong_after_kill"] == 0


def test_merges_killed_before_and_after_each_write_leave_the_last_version_served(stack):
    report = run_faults.merge_kills(stack, len(run_faults.MERGE_PHASES), stack.lines.append, random.Random(6))
    check(report, stack.lines, len(run_faults.MERGE_PHASES))
    assert report.details["ghosts"] == 0 and report.details["wrong_after_kill"] == 0


def test_a_worker_killed_while_embedding_loses_nothing_and_duplicates_nothing(stack):
    report = run_faults.worker_kills(stack, 2, stack.lines.append, random.Random(2))
    check(report, stack.lines, 2)
    assert report.details["failed"] == 0 and report.details["index_drift"] == 0
    assert report.details["tasks_run_again"] >= 1  # the killed tasks really were delivered again


def test_valkey_restarts_lose_no_queued_task_and_uploads_go_on(stack):
    report = run_faults.valkey_restarts(stack, 1, stack.lines.append, random.Random(3), uploads=4)
    check(report, stack.lines, 2)


def test_a_postgres_restart_under_load_gives_fast_503s_and_recovers(stack):
    report = run_faults.postgres_restarts(stack, 1, stack.lines.append, random.Random(4), outage=2.0, uploads=12)
    check(report, stack.lines, 1)
    assert set(report.details["answers"]) <= {"200", "503"}
    assert report.details["slowest_503_ms"] < 2000 and report.details["recovery_s"] < 15
