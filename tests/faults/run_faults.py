"""Fault injection against a private copy of the portal (real PostgreSQL, Valkey, gunicorn and
Celery processes on loopback), then counts of what was lost.

    .venv/bin/python -m tests.faults.run_faults                    # the full run
    .venv/bin/python -m tests.faults.run_faults --worker-kills 4 --index-kills 3 --delta-kills 5 \\
        --merge-kills 6 --valkey-restarts 1 --postgres-restarts 1  # what the test suite runs

Scenarios:

worker kills     assets are uploaded, then the worker is killed with SIGKILL while it embeds:
                 alternately only the pool process running the task (the worker sees it die and
                 re-queues the task: reject_on_worker_lost) and the whole worker (nothing is told;
                 the task comes back after the visibility timeout, when a worker starts again).
                 Every asset must end embedded exactly once.
valkey restarts  tasks queued while no worker runs, Valkey stopped and started; an upload made
                 while it is down must still succeed (it is picked up by the reconciler); a second
                 restart while the worker is busy. Everything must complete.
index kills      a process writing a new index version is killed in each phase (while writing
                 the temp file, after the rename but before the version is committed, after the
                 commit); some newest files are also torn on purpose. A freshly started process
                 must then serve the last good version, complete, and never an empty or torn one.
delta kills      vectors are stored and assets deleted, then the sync writing them as a delta is
                 killed before and after each write step (the delta file, the manifest, the
                 commit). A fresh process must serve the newest committed version, whole; after
                 the next sync it must hold exactly what Postgres holds (nothing lost, no deleted
                 row back: no ghost), with no temp or unnamed file left.
merge kills      the same around a merge folding the deltas into a new base (the base file, its
                 keys, the manifest, the commit); the next merge must succeed and clean up.
postgres restart PostgreSQL stopped and started under search load, with the worker embedding:
                 the portal must answer 503 quickly (never 500, never hang) and recover, and no
                 upload may be lost.

Prints one line per fault and a summary; exits 1 if anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.images import base_picture, save
from tests.faults.stack import FaultStack, wait_until

EMBED_DELAY = 0.35  # seconds a worker spends on each image, so kills land inside tasks
POSTRUN_DELAY = 0.15  # after the vectors are stored, before the task is acknowledged


@dataclass
class Report:
    faults: int = 0
    lost: int = 0
    duplicates: int = 0
    details: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.problems)

    def as_dict(self) -> dict:
        return {"faults": self.faults, "lost": self.lost, "duplicates": self.duplicates,
                "problems": self.problems, **self.details}


_counter = [0]


def unique_image() -> bytes:
    _counter[0] += 1
    img = base_picture(seed=_counter[0])
    img.putpixel((0, 0), (_counter[0] % 256, (_counter[0] // 256) % 256, 7))
    return save(img, "PNG")


def upload_many(stack: FaultStack, count: int, collection: str, log) -> list[int]:
    ids = []
    for i in range(count):
        result = stack.upload(f"{collection}-{i}.png", unique_image(), [f"{collection} caption {i}", f"another {i}"],
                              collection=collection)
        if result.status != 201:
            raise RuntimeError(f"upload failed: {result.status} {result.body[:300]!r} {result.error}")
        ids.append(result.json()["id"])
    log(f"  uploaded {count} assets to {collection!r}")
    return ids


class Events:
    """The worker's task start/end lines."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def lines(self):
        try:
            return [line.split() for line in self.path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def embed_starts(self):
        return [parts for parts in self.lines() if parts[2] == "start" and parts[3].endswith("embed_asset_task")]

    def executions_per_asset(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for parts in self.embed_starts():
            if len(parts) > 4:
                counts[int(parts[4])] = counts.get(int(parts[4]), 0) + 1
        return counts


def wait_all_embedded(stack, collection, timeout, log) -> None:
    started = time.monotonic()
    wait_until(lambda: stack.pending(collection) == 0, timeout, f"{collection!r} to be embedded", interval=0.5)
    log(f"  {collection!r}: nothing pending after {time.monotonic() - started:.1f}s")


def wait_indices_in_step(stack, timeout=60) -> dict:
    """Until the debounced syncs have caught up; returns the remaining drift per index."""
    deadline = time.monotonic() + timeout
    drift = stack.index_drift()
    while any(drift.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
        drift = stack.index_drift()
    return drift


# --- scenarios ----------------------------------------------------------------------------


def worker_kills(stack: FaultStack, kills: int, log, rng: random.Random) -> Report:
    report = Report()
    collection = "worker-kills"
    events = Events(stack.root / "events-kills.txt")
    upload_many(stack, max(8, kills * 3), collection, log)
    worker = None
    for i in range(kills):
        mode = "pool process" if i % 2 == 0 else "whole worker"
        if worker is None:
            worker = stack.start_worker(embed_delay=EMBED_DELAY, postrun_delay=POSTRUN_DELAY, events=events.path)
        seen = len(events.embed_starts())
        try:
            wait_until(lambda: len(events.embed_starts()) > seen, 120, "a task to start")
        except TimeoutError:
            if stack.pending(collection) == 0:
                log(f"  queue drained after {i} kills; uploading more")
                upload_many(stack, 6, collection, log)
                wait_until(lambda: len(events.embed_starts()) > seen, 120, "a task to start")
            else:
                raise
        start = events.embed_starts()[-1]
        time.sleep(rng.uniform(0.0, EMBED_DELAY + POSTRUN_DELAY))
        if mode == "pool process":
            try:
                os.kill(int(start[1]), signal.SIGKILL)  # the pool process running the task
            except ProcessLookupError:
                pass
        else:
            stack.kill_worker(worker)
            worker = None
            # The task stays unacknowledged in Valkey; it becomes visible again once the
            # visibility timeout has passed, and a starting worker restores it.
            time.sleep(stack.visibility_timeout + 0.5)
        report.faults += 1
        log(f"  kill {i + 1}/{kills}: {mode}, during the task for asset {start[4] if len(start) > 4 else '?'}")
    if worker is None:
        worker = stack.start_worker(embed_delay=EMBED_DELAY, postrun_delay=POSTRUN_DELAY, events=events.path)
    wait_all_embedded(stack, collection, 180, log)
    outcome = stack.outcome(collection)
    executions = events.executions_per_asset()
    report.lost, report.duplicates = outcome["lost"], outcome["duplicates"]
    report.details = {
        "assets": outcome["assets"],
        "failed": outcome["failed"],
        "tasks_run_again": sum(n - 1 for n in executions.values() if n > 1),
    }
    drift = wait_indices_in_step(stack)
    report.details["index_drift"] = sum(drift.values())
    if any(drift.values()):
        report.problems.append(f"indices out of step after the kills: {drift}")
    stack.stop_worker(worker)
    return report


def valkey_restarts(stack: FaultStack, restarts: int, log, rng: random.Random, uploads: int = 6) -> Report:
    report = Report()
    collections = []
    warm_up(stack)  # model loading in a fresh web process is not what is measured here
    for i in range(restarts):
        collection = f"valkey-{i}"
        collections.append(collection)
        # 1. Tasks queued with no worker running; Valkey stopped and started.
        upload_many(stack, uploads, collection, log)
        queued = stack.redis().llen("celery")
        stack.stop_valkey()
        during = stack.upload(f"during-outage-{i}.png", unique_image(), [f"uploaded while Valkey was down {i}"],
                              collection=collection)
        search = stack.search_text(timeout=30)
        if during.status != 201:
            report.problems.append(f"upload while Valkey was down: {during.status} {during.body[:200]!r} "
                                   f"{during.error}")
        if search.status != 200:
            report.problems.append(f"search while Valkey was down: {search.status} after {search.seconds:.1f}s "
                                   f"{search.body[:200]!r} {search.error}")
        stack.start_valkey()
        after = stack.redis().llen("celery")
        report.faults += 1
        log(f"  restart {i + 1}/{restarts}: {queued} tasks queued before, {after} after; upload during the "
            f"outage {during.status} ({during.seconds * 1000:.0f} ms), search {search.status} "
            f"({search.seconds * 1000:.0f} ms)")
        if after < queued:
            report.problems.append(f"Valkey lost queued tasks: {queued} before the restart, {after} after")
        worker = stack.start_worker(embed_delay=0.1)
        # 2. Restart again while that worker is busy with the queue.
        upload_many(stack, uploads, collection, log)
        time.sleep(rng.uniform(0.2, 0.8))
        stack.stop_valkey()
        time.sleep(stack.visibility_timeout + 0.5)
        stack.start_valkey()
        report.faults += 1
        log(f"  restart {i + 1}/{restarts} with the worker busy")
        # The upload made during the outage has no task: the reconciler queues it.
        wait_until(lambda: stack.pending(collection) <= 1, 120, "the queued tasks", interval=0.5)
        reconcile = json.loads(stack.manage("reconcile", "--stuck-after", "0", "--no-files", "--json").stdout)
        log(f"  reconciler re-queued {len(reconcile['requeued'])} stuck asset(s)")
        wait_all_embedded(stack, collection, 120, log)
        stack.stop_worker(worker)
    for collection in collections:
        outcome = stack.outcome(collection)
        report.lost += outcome["lost"]
        report.duplicates += outcome["duplicates"]
        report.details.setdefault("assets", 0)
        report.details["assets"] += outcome["assets"]
    return report


def index_kills(stack: FaultStack, kills: int, log, rng: random.Random, vectors: int = 3000,
                tear_every: int = 6) -> Report:
    report = Report()
    stack.helper("index-setup", str(vectors))
    events_path = stack.root / "events-index.txt"
    slow = {"FAULT_EVENTS": str(events_path), "FAULT_CHUNK": "16384", "FAULT_PAUSE": "0.01", "FAULT_HOLD": "0.4"}
    fast = {"FAULT_PAUSE": "0", "FAULT_HOLD": "0"}
    good = stack.helper("index-write", env=fast)  # a first good version
    log(f"  a good index version v{good['version']} with {good['count']} vectors")
    phases = ["writing", "renamed", "committed"]
    torn = served_wrong = 0
    after = stack.helper("index-check")
    for i in range(kills):
        phase = phases[i % len(phases)]
        before = after
        events_path.write_text("")
        writer = stack.spawn_helper("index-write", env=slow, log_name="index-writer")
        try:
            wait_until(lambda: f" {phase}\n" in events_path.read_text(), 60, f"the writer to reach {phase!r}",
                       interval=0.01)
        except TimeoutError:
            writer.kill()
            raise
        if phase == "writing":
            time.sleep(rng.uniform(0.0, 0.15))  # somewhere inside the write of the temp file
        stack.kill_worker(writer)  # SIGKILL to its process group
        report.faults += 1
        tear = (i % tear_every == tear_every - 1)  # after a commit (every other one by default)
        if tear:
            # Also tear the newest committed file, as a crash on storage without atomic rename would.
            (path,), = stack.sql(
                "SELECT file_path FROM search_indexbuild b JOIN embeddings_embeddingmodel m ON m.id = b.model_id "
                "WHERE m.name = 'fault-index-model' AND b.modality = 'image' AND b.status = 'ready' "
                "ORDER BY b.version DESC LIMIT 1")
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            torn += 1
            report.faults += 1
        after = stack.helper("index-check")
        expected_version = (after["ready_versions"][1] if tear and len(after["ready_versions"]) > 1
                            else after["ready_versions"][0] if after["ready_versions"] else None)
        ok = (after["served_matches_postgres"] and after["served_count"] == after["expected"]
              and after["served_version"] == expected_version)
        if phase != "committed" and not tear and after["served_version"] != before["served_version"]:
            ok = False  # a version that was never committed must not be served
        if not ok:
            served_wrong += 1
            report.problems.append(f"kill {i + 1} ({phase}{', torn' if tear else ''}): before {before}, after {after}")
        log(f"  kill {i + 1}/{kills} while {phase}{' + newest file torn' if tear else ''}: serving "
            f"v{after['served_version']} ({after['served_count']}/{after['expected']} vectors, "
            f"{'complete' if after['served_matches_postgres'] else 'WRONG'}); temp files left {after['temp_files']}")
    final = stack.helper("index-write", env=fast)
    check = stack.helper("index-check")
    if check["temp_files"]:
        report.problems.append(f"{check['temp_files']} temp files left after a clean write")
    if not check["served_matches_postgres"] or check["served_version"] != final["version"]:
        report.problems.append(f"the final clean write is not served: {check}")
    report.lost = served_wrong
    report.details = {"torn_files": torn, "served_wrong_or_empty": served_wrong,
                      "temp_files_after_next_write": check["temp_files"]}
    return report


DELTA_PHASES = ("writing-delta", "renamed-delta", "writing-manifest", "renamed-manifest", "committed")
MERGE_PHASES = ("writing-base", "renamed-base", "renamed-keys", "writing-manifest", "renamed-manifest", "committed")


def segment_kills(stack: FaultStack, kills: int, log, rng: random.Random, *, merge: bool = False,
                  vectors: int = 1500) -> Report:
    """A sync writing a delta (or a merge writing a new base) killed with SIGKILL before and
    after each of its write steps, in turn; then what a fresh process serves, and what it
    serves once the next sync (and merge) has run."""
    report = Report()
    stack.helper("index-setup", str(vectors))
    events_path = stack.root / "events-segments.txt"
    slow = {"FAULT_EVENTS": str(events_path), "FAULT_CHUNK": "128" if not merge else "8192", "FAULT_PAUSE": "0.01",
            "FAULT_HOLD": "0.4"}
    stack.helper("index-sync")  # the last good version to start from
    phases = MERGE_PHASES if merge else DELTA_PHASES
    kind = "merge" if merge else "delta"
    problems_before = len(report.problems)
    lost = ghosts = 0
    for i in range(kills):
        phase = phases[i % len(phases)]
        changed = stack.helper("index-mutate", "3", "2")
        if merge:
            stack.helper("index-sync")  # a delta to fold
        before = stack.helper("index-check")
        events_path.write_text("")
        writer = stack.spawn_helper("index-merge-write" if merge else "index-delta-write", env=slow,
                                    log_name=f"{kind}-writer")
        try:
            wait_until(lambda: f" {phase}\n" in events_path.read_text(), 60, f"the {kind} to reach {phase!r}",
                       interval=0.005)
        except TimeoutError:
            writer.kill()
            raise
        if phase.startswith("writing"):
            time.sleep(rng.uniform(0.0, 0.05))  # inside the write of the temp file
        stack.kill_worker(writer)
        report.faults += 1
        after = stack.helper("index-check")
        newest = after["ready_versions"][0] if after["ready_versions"] else None
        ok = (after["served_version"] == newest and after["served_count"] == after["served_build_count"])
        if phase != "committed" and after["served_version"] != before["served_version"]:
            ok = False  # a version that was never committed must not be served
        if not ok:
            report.problems.append(f"{kind} kill {i + 1} ({phase}): before {before}, after {after}")
        # The next writers: the changes the killed one did not commit are written, its files removed.
        stack.helper("index-mutate", "1", "1")
        stack.helper("index-sync")
        if merge:
            stack.helper("index-merge")
        check = stack.helper("index-check")
        lost, ghosts = lost + check["lost"], ghosts + check["ghosts"]
        if check["lost"] or check["ghosts"] or check["temp_files"] or check["unreferenced_files"]:
            report.problems.append(f"{kind} kill {i + 1} ({phase}), after the next writes: {check}")
        log(f"  kill {i + 1}/{kills} at {phase} ({len(changed['added'])} stored, {len(changed['removed'])} deleted "
            f"before it): serving v{after['served_version']} ({after['served_count']} vectors); after the next "
            f"writes v{check['served_version']}, lost {check['lost']}, ghosts {check['ghosts']}, leftovers "
            f"{check['temp_files'] + check['unreferenced_files']}")
    report.lost = lost
    report.details = {"ghosts": ghosts, "phases": list(phases), "wrong_after_kill": len(report.problems) - problems_before}
    if ghosts:
        report.problems.append(f"{ghosts} deleted rows came back")
    return report


def delta_kills(stack: FaultStack, kills: int, log, rng: random.Random, vectors: int = 1500) -> Report:
    return segment_kills(stack, kills, log, rng, vectors=vectors)


def merge_kills(stack: FaultStack, kills: int, log, rng: random.Random, vectors: int = 1500) -> Report:
    return segment_kills(stack, kills, log, rng, merge=True, vectors=vectors)


def postgres_restarts(stack: FaultStack, restarts: int, log, rng: random.Random, outage: float = 3.0,
                      uploads: int = 24) -> Report:
    report = Report()
    collections = []
    worst_503 = worst_recovery = 0.0
    retried = 0
    codes: dict[str, int] = {}
    for i in range(restarts):
        collection = f"postgres-{i}"
        collections.append(collection)
        events = Events(stack.root / f"events-{collection}.txt")
        worker = stack.start_worker(embed_delay=0.25, events=events.path)
        stack.wait_worker_ready(worker)
        warm_up(stack)
        upload_many(stack, uploads, collection, log)  # still embedding when PostgreSQL goes away
        results: list[tuple[float, str, int, float]] = []
        errors: list[str] = []
        stop = threading.Event()

        def load(kind):
            while not stop.is_set():
                began = time.monotonic()
                result = stack.search_text(timeout=15) if kind == "search" else stack.get("/health/", timeout=15)
                results.append((began, kind, result.status, result.seconds))
                if result.status not in (200, 503):
                    errors.append(f"{kind}: {result.status} after {result.seconds:.2f}s {result.error}"
                                  f"{result.body[:200]!r}")
                time.sleep(0.05)

        threads = [threading.Thread(target=load, args=(kind,), daemon=True)
                   for kind in ("search", "search", "health")]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        down_at = time.monotonic()
        stack.stop_postgres()
        time.sleep(outage)
        stack.start_postgres()
        up_at = time.monotonic()
        report.faults += 1
        try:
            wait_until(lambda: any(t > up_at and s == 200 and k == "search" for t, k, s, _ in list(results)), 60,
                       "searches to succeed again")
        finally:
            time.sleep(1.0)
            stop.set()
            for thread in threads:
                thread.join(timeout=20)
        recovered = min(t for t, k, s, _ in results if t > up_at and s == 200 and k == "search") - up_at
        during = [(k, s, secs) for t, k, s, secs in results if down_at + 0.2 < t < up_at - 0.2]
        slowest_503 = max((secs for _, s, secs in during if s == 503), default=0.0)
        worst_503, worst_recovery = max(worst_503, slowest_503), max(worst_recovery, recovered)
        for _, _, status, _ in results:
            codes[str(status)] = codes.get(str(status), 0) + 1
        if errors:
            report.problems.append(f"answers other than 200/503 around the restart: {errors[:5]}")
        if not any(s == 503 for _, s, _ in during):
            report.problems.append("no 503 while PostgreSQL was down")
        if slowest_503 > 2.0:
            report.problems.append(f"a 503 took {slowest_503:.2f}s")
        log(f"  restart {i + 1}/{restarts}: {len(during)} requests during the {outage:.0f}s outage "
            f"({sum(s == 503 for _, s, _ in during)} × 503, slowest {slowest_503 * 1000:.0f} ms); "
            f"searching again {recovered:.2f}s after PostgreSQL was back")
        wait_all_embedded(stack, collection, 180, log)
        retried += sum(n - 1 for n in events.executions_per_asset().values())
        stack.stop_worker(worker)
    for collection in collections:
        outcome = stack.outcome(collection)
        report.lost += outcome["lost"]
        report.duplicates += outcome["duplicates"]
    report.details = {"answers": codes, "slowest_503_ms": round(worst_503 * 1000),
                      "recovery_s": round(worst_recovery, 2), "embed_tasks_retried": retried}
    return report


def warm_up(stack: FaultStack) -> None:
    """Every web worker loads the model before the clock starts (the first search in a
    process loads it, which takes seconds on a busy machine)."""
    for _ in range(2):
        threads = [threading.Thread(target=stack.search_text, kwargs={"timeout": 60}) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


SCENARIOS = {
    "index_kills": index_kills,
    "delta_kills": delta_kills,
    "merge_kills": merge_kills,
    "worker_kills": worker_kills,
    "valkey_restarts": valkey_restarts,
    "postgres_restarts": postgres_restarts,
}


def run(counts: dict[str, int], root: Path | None = None, log=print, seed: int = 0, stack: FaultStack | None = None):
    rng = random.Random(seed)
    own = stack is None
    tmp = None
    if own:
        base = Path(root or os.environ.get("PORTAL_STATE_DIR") or Path(__file__).resolve().parents[2] / ".state")
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="faults-", dir=base))
        stack = FaultStack(tmp / "stack", log=log).start()
        stack.start_web()
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            if counts.get(name):
                log(f"{name.replace('_', ' ')} ×{counts[name]}")
                started = time.monotonic()
                report = scenario(stack, counts[name], log, rng)
                report.details["seconds"] = round(time.monotonic() - started, 1)
                results[name] = report
                log(f"  -> faults {report.faults}, lost {report.lost}, duplicates {report.duplicates}"
                    + (f", problems: {report.problems}" if report.problems else ""))
    finally:
        if own:
            stack.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.run_faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker-kills", type=int, default=20)
    parser.add_argument("--valkey-restarts", type=int, default=3)
    parser.add_argument("--index-kills", type=int, default=12)
    parser.add_argument("--delta-kills", type=int, default=20)
    parser.add_argument("--merge-kills", type=int, default=12)
    parser.add_argument("--postgres-restarts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    counts = {"worker_kills": args.worker_kills, "valkey_restarts": args.valkey_restarts,
              "index_kills": args.index_kills, "delta_kills": args.delta_kills, "merge_kills": args.merge_kills,
              "postgres_restarts": args.postgres_restarts}
    started = time.monotonic()
    results = run(counts, seed=args.seed)
    summary = {name: report.as_dict() for name, report in results.items()}
    total = {"faults": sum(r.faults for r in results.values()), "lost": sum(r.lost for r in results.values()),
             "duplicates": sum(r.duplicates for r in results.values()),
             "problems": sum(len(r.problems) for r in results.values()),
             "seconds": round(time.monotonic() - started, 1)}
    if args.json:
        print(json.dumps({"scenarios": summary, "total": total}, indent=2))
    else:
        print("\nscenario             faults  lost  duplicates  problems")
        for name, report in results.items():
            print(f"{name:<20} {report.faults:>6} {report.lost:>5} {report.duplicates:>11} {len(report.problems):>9}")
        print(f"{'total':<20} {total['faults']:>6} {total['lost']:>5} {total['duplicates']:>11} "
              f"{total['problems']:>9}   ({total['seconds']:.0f}s)")
        for name, report in results.items():
            print(f"{name}: {json.dumps(report.details)}")
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
