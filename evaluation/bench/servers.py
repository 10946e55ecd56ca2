"""The portal served by gunicorn for the query benchmark, as deployed.

``start_server`` launches ``portal.wsgi`` on a free loopback port in its own
process group (so the CPU time of all its workers can be read from /proc),
``warm_server`` waits until every worker has loaded the encoder and indices, and
``stop_server`` ends it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from django.conf import settings
from django.core.management.base import CommandError

from evaluation.bench.http_client import SearchClient, run_jobs
from evaluation.bench.inputs import photo_jpeg, query_texts


@dataclass
class GunicornServer:
    proc: subprocess.Popen
    log: IO[bytes]
    url: str

    @property
    def pgid(self) -> int:
        """The server's process group: it runs in its own session, its workers share it."""
        return self.proc.pid


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_group_cpu_seconds(pgid: int | None) -> float | None:
    """User + system CPU seconds of every live process in a process group (Linux /proc)."""
    if not pgid:
        return None
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def start_server(backend: str, workers: int, threads: int, extra_env: dict, write) -> GunicornServer:
    """gunicorn serving ``portal.wsgi`` with inference ``backend`` and ``extra_env``; ``write``
    gets the line saying how it was started."""
    port = free_loopback_port()
    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "PORTAL_STATE_DIR": str(settings.STATE_DIR),
        "SIGLIP_INFERENCE": backend,
        # The throttles stay on (their Redis round trip is part of a request) but cannot trip.
        "THROTTLE_SEARCH_ANON": "100000000/minute",
        "THROTTLE_SEARCH_USER": "100000000/minute",
    })
    env.update(extra_env)
    log_path = Path(settings.STATE_DIR) / "bench" / f"gunicorn-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "gunicorn", "portal.wsgi", "-c", "python:portal.gunicorn",
               "--bind", f"127.0.0.1:{port}",
               "--workers", str(workers), "--threads", str(threads),
               "--timeout", "120"]
    settings_text = " ".join(f"{k}={v}" for k, v in extra_env.items())
    write(f"Starting {settings_text + ' ' if settings_text else ''}{' '.join(command[2:])}  (log: {log_path})")
    log = open(log_path, "ab")
    proc = subprocess.Popen(command, cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return GunicornServer(proc, log, f"http://127.0.0.1:{port}")


def stop_server(server: GunicornServer) -> None:
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    server.log.close()


def warm_server(base_url: str) -> None:
    """Wait for the server, then load the encoder and indices in every worker."""
    deadline = time.monotonic() + 300
    client = SearchClient(base_url)
    while True:
        try:
            if client.text("warm up")["status"] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise CommandError(f"the server at {base_url} did not answer a search within 300 s")
        time.sleep(0.5)
    client.close()
    # Several rounds of concurrent requests reach every worker; stop once a round is fast.
    jpeg = photo_jpeg(99)
    words = query_texts(200, "warm-up")
    for round_number in range(20):
        jobs = [("text", words[(round_number * 12 + i) % len(words)]) for i in range(8)]
        jobs += [("image", jpeg)] * 4
        samples = run_jobs(base_url, jobs, 4, 120.0, progress=None)
        slowest = max(s["timing"].get("view", s["wall_ms"]) for s in samples)
        if round_number >= 2 and slowest < 1000:
            break
