"""Mixed-load soak against a private copy of the portal (real PostgreSQL, Valkey, gunicorn and
Celery processes on loopback): curators, searchers and the worker writing the same assets at
once, the worker killed at random, then a check that nothing acknowledged was lost.

    .venv/bin/python -m tests.faults.soak                 # 3 minutes
    .venv/bin/python -m tests.faults.soak --minutes 10

Concurrent clients, each in its own thread, until the time is up:

fresh uploads      new pictures with captions (``POST /api/assets/``)
repeated uploads   the same few pictures from several clients at once, each with a new
                   caption: the same-bytes race, and caption additions to existing assets
deletes            ``DELETE /api/assets/{id}/`` of assets just uploaded (often while the worker
                   embeds them, or while a repeated upload adds a caption)
admin              a logged-in curator edits caption texts in the admin and deletes several
                   assets at once with "Delete selected"
searches           text searches and "similar to this asset" searches

Meanwhile the worker (prefork pool) is killed with SIGKILL at random intervals, alternately
its pool process and the whole worker, and the reconciler runs now and then (it checks and
repairs every index while the debounced index syncs run).

At the end, with the portal quiet (clients stopped, a worker running until nothing is
pending and the indices are in step), it checks:

- every acknowledged upload that was not deleted is embedded exactly once with every
  acknowledged caption (edited ones with their new text, and the vector of that text);
- every acknowledged delete is gone from the database, the media folder and search;
- no 5xx (nor any request without an answer) in the whole run;
- no orphan: no stored file without its asset, no asset without its file, no vector without
  its image or caption, no index row for a deleted asset.

It prints the requests by kind and status, the faults injected, and the assets lost,
duplicates and orphans (which must be 0), and exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import collections
import http.cookiejar
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.images import base_picture, save
from tests.faults.stack import FaultStack, HttpResult, wait_until

WORDS = ["red", "blue", "green", "square", "circle", "striped", "small", "large", "bright", "dark", "left",
         "right", "pale", "round", "tall", "wide"]


def caption(rng: random.Random) -> str:
    """A caption no other request sends (the ledger tells captions apart by text)."""
    return f"{rng.choice(WORDS)} {rng.choice(WORDS)} {uuid.uuid4().hex[:10]}"


class Pictures:
    """Distinct PNGs, made on demand."""

    def __init__(self):
        self._lock = threading.Lock()
        self._n = 0

    def fresh(self) -> bytes:
        with self._lock:
            self._n += 1
            n = self._n
        img = base_picture(seed=n)
        img.putpixel((1, 1), (n % 256, (n // 256) % 256, 99))
        img.putpixel((2, 1), ((n // 65536) % 256, 17, 3))
        return save(img, "PNG")


@dataclass
class Ledger:
    """What the portal acknowledged, as the clients saw it."""

    captions: dict = field(default_factory=lambda: collections.defaultdict(set))  # asset id -> texts sent
    deleted: set = field(default_factory=set)
    edits: dict = field(default_factory=dict)  # old caption text -> new text
    statuses: collections.Counter = field(default_factory=collections.Counter)  # (kind, status) -> count
    bad: list = field(default_factory=list)  # 5xx and unanswered requests
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, kind: str, result: HttpResult) -> HttpResult:
        with self.lock:
            self.statuses[(kind, result.status)] += 1
            if result.status >= 500 or result.status == 0:
                self.bad.append(f"{kind}: {result.status} {result.error} {result.body[:300]!r}")
        return result

    def uploaded(self, asset_id: int, texts) -> None:
        with self.lock:
            self.captions[asset_id].update(texts)

    def known_ids(self) -> list[int]:
        with self.lock:
            return [i for i in self.captions if i not in self.deleted]

    def as_dict(self) -> dict:
        with self.lock:
            return {"captions": {str(k): sorted(v) for k, v in self.captions.items()},
                    "deleted": sorted(self.deleted), "edits": dict(self.edits)}


class Curator:
    """A staff user logged in to the admin, with its cookies (session, CSRF)."""

    def __init__(self, stack: FaultStack, username: str, password: str):
        self.base = f"http://127.0.0.1:{stack.web_port}"
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        page = self.request("GET", "/admin/login/")
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.body)
        result = self.request("POST", "/admin/login/?next=/admin/", {
            "csrfmiddlewaretoken": token.group(1).decode(), "username": username, "password": password,
            "next": "/admin/"})
        if "sessionid" not in {c.name for c in self.jar}:
            raise RuntimeError(f"admin login failed: {result.status} {result.body[:300]!r}")

    def csrf(self) -> str:
        return next(c.value for c in self.jar if c.name == "csrftoken")

    def request(self, method, path, form=None, timeout=30.0) -> HttpResult:
        body = None
        headers = {}
        if form is not None:
            body = urllib.parse.urlencode(form, doseq=True).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded", "Referer": self.base + path}
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        started = time.monotonic()
        try:
            with self.opener.open(req, timeout=timeout) as resp:  # follows the redirect after a save
                return HttpResult(resp.status, time.monotonic() - started, resp.read())
        except urllib.error.HTTPError as exc:
            return HttpResult(exc.code, time.monotonic() - started, exc.read())
        except (urllib.error.URLError, OSError) as exc:
            return HttpResult(0, time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")

    def edit_caption(self, asset_id: int, captions: list[tuple[int, str]], which: int, new_text: str) -> HttpResult:
        form = {"csrfmiddlewaretoken": self.csrf(), "collection": "soak", "_save": "Save",
                "captions-TOTAL_FORMS": str(len(captions)), "captions-INITIAL_FORMS": str(len(captions)),
                "captions-MIN_NUM_FORMS": "0", "captions-MAX_NUM_FORMS": "1000"}
        for i, (caption_id, text) in enumerate(captions):
            form[f"captions-{i}-id"] = str(caption_id)
            form[f"captions-{i}-asset"] = str(asset_id)
            form[f"captions-{i}-text"] = new_text if i == which else text
        return self.request("POST", f"/admin/search/imageasset/{asset_id}/change/", form)

    def delete_selected(self, ids: list[int]) -> HttpResult:
        form = {"csrfmiddlewaretoken": self.csrf(), "action": "delete_selected", "post": "yes",
                "_selected_action": [str(i) for i in ids]}
        return self.request("POST", "/admin/search/imageasset/", form)


class Soak:
    def __init__(self, stack: FaultStack, seconds: float, rng: random.Random, log=print, kill_every=(3.0, 9.0)):
        self.stack = stack
        self.seconds = seconds
        self.rng = rng
        self.log = log
        self.kill_every = kill_every
        self.ledger = Ledger()
        self.pictures = Pictures()
        self.shared = [self.pictures.fresh() for _ in range(6)]  # bytes several clients send at once
        self.stop = threading.Event()
        self.faults = collections.Counter()
        self.worker = None
        self.errors: list[str] = []

    # --- clients --------------------------------------------------------------------

    def _loop(self, name, step):
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            try:
                step(rng)
            except Exception as exc:  # a bug in the driver, not an answer of the portal
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def _upload(self, kind, data, texts) -> int | None:
        result = self.ledger.answer(kind, self.stack.upload(f"{kind}.png", data, texts, collection="soak"))
        if result.status in (200, 201):
            asset_id = result.json()["id"]
            self.ledger.uploaded(asset_id, texts)
            return asset_id
        return None

    def fresh_uploads(self, rng):
        asset_id = self._upload("upload fresh", self.pictures.fresh(), [caption(rng) for _ in range(rng.randint(1, 3))])
        if asset_id is not None and rng.random() < 0.3:
            self._delete(asset_id, rng)  # at once: while the worker embeds it, most often
        time.sleep(rng.uniform(0.1, 0.5))

    def repeated_uploads(self, rng):
        self._upload("upload repeated", rng.choice(self.shared), [caption(rng)])
        time.sleep(rng.uniform(0.2, 0.8))

    def _delete(self, asset_id, rng):
        result = self.ledger.answer("delete", self.stack.request(
            "DELETE", f"/api/assets/{asset_id}/", headers={"Authorization": f"Token {self.stack.token}"}, timeout=30))
        if result.status in (204, 404):
            with self.ledger.lock:
                self.ledger.deleted.add(asset_id)  # 404: another request deleted it first

    def deletes(self, rng):
        ids = self.ledger.known_ids()
        if ids:
            self._delete(rng.choice(ids[-20:]), rng)  # recent ones: often still being embedded
        time.sleep(rng.uniform(0.2, 0.8))

    def admin(self, rng):
        curator = self.curator
        ids = self.ledger.known_ids()
        if not ids:
            time.sleep(0.2)
            return
        if rng.random() < 0.75:
            asset_id = rng.choice(ids[-30:])
            rows = self.stack.sql("SELECT id, text FROM search_caption WHERE asset_id = %s ORDER BY id", (asset_id,))
            if rows:
                which = rng.randrange(len(rows))
                new_text = caption(rng)
                result = self.ledger.answer("admin caption edit",
                                            curator.edit_caption(asset_id, rows, which, new_text))
                if result.status == 200 and b"was changed successfully" in result.body:
                    with self.ledger.lock:
                        self.ledger.edits[rows[which][1]] = new_text
        else:
            chosen = rng.sample(ids[-30:], min(len(ids[-30:]), rng.randint(2, 4)))
            result = self.ledger.answer("admin bulk delete", curator.delete_selected(chosen))
            if result.status == 200:
                with self.ledger.lock:
                    self.ledger.deleted.update(chosen)  # gone, by this request or an earlier one
        time.sleep(rng.uniform(0.1, 0.5))

    def searches(self, rng):
        if rng.random() < 0.6:
            self.ledger.answer("search text", self.stack.search_text(f"{rng.choice(WORDS)} {rng.choice(WORDS)}",
                                                                     timeout=30))
        else:
            ids = self.ledger.known_ids()
            if ids:
                body = json.dumps({"asset_id": rng.choice(ids), "k": 5}).encode()
                self.ledger.answer("search similar", self.stack.request(
                    "POST", "/api/search/image/", body, {"Content-Type": "application/json"}, timeout=30))
        time.sleep(rng.uniform(0.05, 0.2))

    # --- faults ---------------------------------------------------------------------

    def kill_worker_now_and_then(self, rng):
        if self.stop.wait(rng.uniform(*self.kill_every)):
            return
        if rng.random() < 0.5:
            pool = _children(self.worker.pid)
            if pool:
                try:
                    os.kill(pool[0], signal.SIGKILL)
                    self.faults["pool process killed"] += 1
                except ProcessLookupError:
                    pass
                return
        self.stack.kill_worker(self.worker)
        self.faults["whole worker killed"] += 1
        time.sleep(rng.uniform(0.2, 1.5))
        self.worker = self.stack.start_worker(embed_delay=0.05)

    def reconcile_now_and_then(self, rng):
        if self.stop.wait(rng.uniform(15.0, 30.0)):  # each run is a process of its own: CPU the portal needs
            return
        out = self.stack.manage("reconcile", "--no-files", "--json", check=False)
        self.faults["reconciler runs"] += 1
        if out.returncode != 0:
            self.errors.append(f"reconcile exited {out.returncode}: {out.stderr[-500:]}")

    # --- the run ----------------------------------------------------------------------

    def run(self) -> dict:
        admin = self.stack.helper("soak-setup")
        self.curator = Curator(self.stack, admin["username"], admin["password"])
        self.worker = self.stack.start_worker(embed_delay=0.05)
        self.stack.wait_worker_ready(self.worker)
        clients = [("fresh uploads", self.fresh_uploads)] * 2 + [("repeated uploads", self.repeated_uploads)] * 3 + [
            ("deletes", self.deletes), ("admin", self.admin), ("searches", self.searches),
            ("worker kills", self.kill_worker_now_and_then), ("reconciler", self.reconcile_now_and_then)]
        threads = [threading.Thread(target=self._loop, args=c, daemon=True) for c in clients]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while time.monotonic() - started < self.seconds:
            time.sleep(min(10.0, self.seconds - (time.monotonic() - started)) if self.seconds > 0 else 0)
            self.log(f"  {time.monotonic() - started:5.0f}s: {sum(self.ledger.statuses.values())} requests, "
                     f"{sum(self.faults.values())} faults")
        self.stop.set()
        for thread in threads:
            thread.join(timeout=120)
        load_seconds = time.monotonic() - started
        return self.settle_and_check(load_seconds)

    def settle_and_check(self, load_seconds: float) -> dict:
        """Quiet portal: one worker until nothing is pending and the indices are in step; then
        the invariants, checked in a Django process of the stack and over HTTP."""
        if self.worker is None or self.worker.poll() is not None:
            self.worker = self.stack.start_worker()
        quiet = time.monotonic()
        try:
            self.wait_for_backlog()
            wait_until(lambda: not any(self.stack.index_drift().values()), 120, "the indices to catch up", 1.0)
        except TimeoutError as exc:
            self.errors.append(str(exc))
        settle_seconds = time.monotonic() - quiet
        ledger_path = self.stack.root / "soak-ledger.json"
        ledger_path.write_text(json.dumps(self.ledger.as_dict()))
        check = self.stack.helper("soak-check", str(ledger_path), timeout=600)
        # Search: no deleted asset comes back, whatever is asked.
        deleted = set(self.ledger.deleted)
        for query in ("red square", "blue circle", "striped", "a picture"):
            result = self.ledger.answer("search text", self.stack.request(
                "POST", "/api/search/text/", json.dumps({"query": query, "k": 100}).encode(),
                {"Content-Type": "application/json"}, timeout=30))
            if result.status == 200:
                found = {hit["asset"]["id"] for hit in result.json()["results"]}
                check["deleted_in_search"] += len(found & deleted)
        self.stack.stop_worker(self.worker)
        return {"load_seconds": round(load_seconds, 1), "settle_seconds": round(settle_seconds, 1),
                "requests": {f"{kind} {status}": n for (kind, status), n in sorted(self.ledger.statuses.items())},
                "faults": dict(self.faults), "server_errors": len(self.ledger.bad),
                "server_error_examples": self.ledger.bad[:5], "driver_errors": self.errors[:5], **check}


    def wait_for_backlog(self, stall_seconds: float = 90.0) -> None:
        """Until nothing is pending, however long the queue is, as long as the worker gets
        through it: a count that stops going down for ``stall_seconds`` is a failure."""
        best, last_progress = None, time.monotonic()
        while True:
            try:
                left = self.stack.pending("soak")
            except Exception:
                left = best
            if left == 0:
                return
            if best is None or (left is not None and left < best):
                best, last_progress = left, time.monotonic()
                self.log(f"  settling: {left} assets still pending")
            elif time.monotonic() - last_progress > stall_seconds:
                raise TimeoutError(f"{left} assets stayed pending for {stall_seconds:.0f}s with the worker running")
            time.sleep(5.0)


VIOLATIONS = ("server_errors", "lost", "duplicates", "stale_caption_vectors", "deleted_present", "deleted_in_search",
              "orphan_files", "assets_without_file", "orphan_vectors", "index_rows_of_deleted", "index_drift",
              "unacknowledged_pending")


def violations(report: dict) -> dict:
    found = {name: report[name] for name in VIOLATIONS if report.get(name)}
    if report.get("driver_errors"):
        found["driver_errors"] = len(report["driver_errors"])
    return found


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(seconds: float, seed: int = 0, log=print, stack: FaultStack | None = None, root: Path | None = None) -> dict:
    own = stack is None
    tmp = None
    if own:
        base = Path(root or os.environ.get("PORTAL_STATE_DIR") or Path(__file__).resolve().parents[2] / ".state")
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="soak-", dir=base))
        stack = FaultStack(tmp / "stack", log=log).start()
        stack.start_web(workers=2)
    try:
        return Soak(stack, seconds, random.Random(seed), log).run()
    finally:
        if own:
            stack.stop()
            shutil.rmtree(tmp, ignore_errors=True)


def print_report(report: dict) -> None:
    print(f"\nload {report['load_seconds']:.0f}s, then {report['settle_seconds']:.0f}s until quiet")
    print("\nrequests                         count")
    for name, count in report["requests"].items():
        print(f"  {name:<30} {count:>6}")
    print("\nfaults injected")
    for name, count in report["faults"].items():
        print(f"  {name:<30} {count:>6}")
    print(f"\nassets acknowledged {report['acknowledged']}, of which deleted {report['deleted']}, "
          f"kept {report['kept']} with {report['kept_captions']} captions ({report['edited_captions']} edited)")
    print("\nmust be 0")
    for name in VIOLATIONS:
        print(f"  {name:<30} {report.get(name, 0):>6}")
    for example in report["server_error_examples"] + report["driver_errors"] + report.get("problems", []):
        print(f"  ! {example}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the load runs (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run(args.minutes * 60, seed=args.seed, log=(lambda line: None) if args.json else print)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    bad = violations(report)
    if bad:
        print(f"\nFAILED: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
