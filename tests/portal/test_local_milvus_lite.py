"""The Milvus Lite server of a state folder: one per folder, reached by URI from every process,
started only when no Milvus server is named, stopped with the other servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from portal.localservices import LocalServices


def _env(state, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "MILVUS_URI")}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        valkey_port = sock.getsockname()[1]
    env.update(PORTAL_STATE_DIR=str(state), PORTAL_VALKEY_PORT=str(valkey_port), PORTAL_MILVUS_PORT="0", **extra)
    return env


def _services(*args, env) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "portal.localservices", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _collections(uri: str) -> list:
    """The collections of the server at ``uri``, waiting for it to listen (it starts in the background)."""
    from pymilvus import MilvusClient, MilvusException

    deadline = time.monotonic() + 30
    while True:
        try:
            return MilvusClient(uri=uri).list_collections()
        except MilvusException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _lite_pid(state: Path) -> int:
    """The pid of the folder's Milvus Lite server, which runs at the URI its folder names."""
    services = LocalServices(state)
    assert services.milvus_running(json.loads(services.urls_file.read_text())["MILVUS_URI"])
    return int((state / "milvus" / "server.pid").read_text())


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not Path(f"/proc/{pid}").exists()


CREATE = ("import os, numpy; from search.core.vector_index import create_index; "
          "create_index('milvus', 4, collection='from_exec').add([1], numpy.ones((1, 4))); print(os.environ['MILVUS_URI'])")


def test_one_milvus_lite_serves_every_process_of_the_folder_until_down(tmp_path):
    state = tmp_path / "state"
    env = _env(state)
    urls = json.loads(_services("up", env=env).stdout)
    try:
        assert urls["MILVUS_URI"].startswith("http://127.0.0.1:")
        assert _collections(urls["MILVUS_URI"]) == []
        joined = subprocess.run([sys.executable, "-m", "portal.localservices", "exec", "--", sys.executable, "-c",
                                 CREATE], env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True,
                                text=True, timeout=120)
        assert joined.returncode == 0, joined.stderr
        assert joined.stdout.split()[-1] == urls["MILVUS_URI"], "the second process reached the same server"
        assert _collections(urls["MILVUS_URI"]) == ["from_exec"]
        assert (state / "milvus" / "data").is_dir()
        pid = _lite_pid(state)
    finally:
        _services("down", env=env)
    assert _gone(pid), "down stops it"


def test_a_folder_started_without_milvus_lite_gets_it_from_the_next_process(tmp_path):
    state = tmp_path / "state"
    env = _env(state)
    urls = json.loads(_services("up", env={**env, "PORTAL_MILVUS_LITE": "0"}).stdout)
    try:
        assert "MILVUS_URI" not in urls
        _services("exec", "--", sys.executable, "-c", "pass", env=env)
        uri = json.loads((state / "services.json").read_text())["MILVUS_URI"]
        assert _collections(uri) == [], "the joiner left the server it started running"
        pid = _lite_pid(state)
    finally:
        _services("down", env=env)
    assert _gone(pid), "down stops it"


def test_a_named_milvus_server_is_used_instead_of_milvus_lite(tmp_path):
    state = tmp_path / "state"
    env = _env(state, MILVUS_URI="http://milvus.example:19530")
    printed = _services("exec", "--", sys.executable, "-c", "import os; print(os.environ['MILVUS_URI'])", env=env)
    assert printed.stdout.strip() == "http://milvus.example:19530"
    assert not (state / "milvus").exists()
