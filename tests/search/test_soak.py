"""A short run of the mixed-load soak (``tests/faults/soak.py``) on a private stack: uploads of
fresh and repeated bytes, deletes, admin edits and bulk deletes and searches at once, the worker
killed at random; afterwards nothing acknowledged is lost and nothing is left over. The full run:

    .venv/bin/python -m tests.faults.soak --minutes 10
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from tests.faults import soak
from tests.faults.stack import FaultStack

LOAD_SECONDS = 40


def test_a_mixed_load_with_worker_kills_loses_nothing_and_leaves_no_orphan(tiny_checkpoint):
    from django.conf import settings

    root = Path(tempfile.mkdtemp(prefix="soak-", dir=settings.STATE_DIR))
    shutil.copytree(tiny_checkpoint, root / "tiny-siglip")
    lines = []
    stack = FaultStack(root / "stack", log=lines.append)
    try:
        stack.start(checkpoint=root / "tiny-siglip")
        stack.start_web(workers=2)
        report = soak.Soak(stack, LOAD_SECONDS, random.Random(7), lines.append, kill_every=(2.0, 5.0)).run()
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    detail = "\n".join(lines) + f"\n{report}"
    assert soak.violations(report) == {}, detail
    requests = report["requests"]
    # The run really did what it is meant to: every kind of writer, and faults among them.
    assert requests.get("upload fresh 201", 0) > 20 and requests.get("upload repeated 200", 0) > 20, detail
    assert requests.get("delete 204", 0) > 5 and requests.get("admin bulk delete 200", 0) > 0, detail
    assert report["edited_captions"] > 0 and requests.get("search text 200", 0) > 10, detail
    assert sum(n for name, n in report["faults"].items() if "killed" in name) >= 4, detail
    assert report["kept"] > 0 and report["deleted"] > 0, detail
