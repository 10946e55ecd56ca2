"""The embedded servers of a state folder: a second process joins them and leaves them running."""

from __future__ import annotations

import socket

import psycopg
import pytest
import redis

from portal.localservices import LocalServices


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


def test_a_second_user_of_a_state_folder_joins_its_servers_and_leaves_them_running(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTAL_VALKEY_PORT", str(_free_port()))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    owner = LocalServices(tmp_path / "state")
    urls = owner.start()
    try:
        assert _answers(urls)
        second = LocalServices(tmp_path / "state")
        assert second.start() == urls
        second.stop()
        assert _answers(urls), "the second user's stop left the owner's servers running"
    finally:
        owner.stop()
    assert not _answers(urls)


def test_servers_that_no_longer_answer_are_started_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTAL_VALKEY_PORT", str(_free_port()))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    state = tmp_path / "state"
    state.mkdir()
    (state / "services.json").write_text('{"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x", '
                                         '"REDIS_URL": "redis://127.0.0.1:1/0"}')
    services = LocalServices(state)
    urls = services.start()
    try:
        assert _answers(urls) and not services._joined
    finally:
        services.stop()


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
