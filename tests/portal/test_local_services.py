"""The embedded servers of a state folder: a second process joins them and leaves them running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psycopg
import redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(urls) -> bool:
    try:
        psycopg.connect(urls["DATABASE_URL"], connect_timeout=2).close()
        return bool(redis.Redis.from_url(urls["REDIS_URL"], socket_connect_timeout=2).ping())
    except Exception:
        return False


def _env(state) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(PORTAL_STATE_DIR=str(state), PORTAL_VALKEY_PORT=str(_free_port()))
    return env


PRINT_URLS = "import os; print(os.environ['DATABASE_URL'], os.environ['REDIS_URL'], flush=True)"


def _exec(state, code, **popen) -> subprocess.Popen:
    """``python -m portal.localservices exec -- python -c CODE`` in the background."""
    return subprocess.Popen([sys.executable, "-m", "portal.localservices", "exec", "--", sys.executable, "-c", code],
                            env=_env(state), stdout=subprocess.PIPE, text=True, **popen)


def test_a_second_user_of_a_state_folder_joins_its_servers_and_leaves_them_running(tmp_path):
    state, release = tmp_path / "state", tmp_path / "release"
    # The first user (a running portal, a long benchmark) holds the servers until released.
    first = _exec(state, PRINT_URLS + f"\nimport pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists(): "
                                      "time.sleep(0.1)")
    try:
        database_url, redis_url = first.stdout.readline().split()
        urls = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
        assert _answers(urls)
        second = _exec(state, PRINT_URLS)
        assert second.communicate(timeout=120)[0].split() == [database_url, redis_url]
        assert second.returncode == 0
        assert _answers(urls), "the second user's exit left the first one's servers running"
    finally:
        release.touch()
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert not _answers(urls), "the first user stops what it started"


def test_servers_that_no_longer_answer_are_started_afresh(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    stale = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x", "REDIS_URL": "redis://127.0.0.1:1/0"}
    (state / "services.json").write_text(json.dumps(stale))
    probe = "import psycopg, redis, os; psycopg.connect(os.environ['DATABASE_URL']).close(); " \
            "print(redis.Redis.from_url(os.environ['REDIS_URL']).ping())"
    run = _exec(state, probe)
    assert run.communicate(timeout=120)[0].strip() == "True" and run.returncode == 0


def test_up_leaves_both_servers_running_until_down(tmp_path):
    state = tmp_path / "state"
    env = _env(state)
    up = subprocess.run([sys.executable, "-m", "portal.localservices", "up"], env=env, capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    urls = json.loads(up.stdout)
    try:
        assert _answers(urls), "up's servers outlive the command"
    finally:
        down = subprocess.run([sys.executable, "-m", "portal.localservices", "down"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not _answers(urls)
