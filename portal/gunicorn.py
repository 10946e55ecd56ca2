"""gunicorn settings shared by every way the portal is served (``-c python:portal.gunicorn``).

Each worker loads the URL configuration (and with it every view module), the active
model and its indices in the background as it starts, so the first searches it serves do
not wait for them (the demo portal's first search took 2.4 s without this, on a 2-core
CPU; importing the URL configuration alone takes 0.34 s); a request that comes first waits
for the same loads.
"""

from __future__ import annotations

import threading


def _warm_up() -> None:
    from django.db import connections
    from django.urls import get_resolver

    from search.queries import warm_up

    try:
        get_resolver().url_patterns  # imports the URL configuration and its views
        warm_up()
    finally:
        connections.close_all()  # the connections this thread opened


def post_worker_init(worker) -> threading.Thread:
    thread = threading.Thread(target=_warm_up, name="warm-up", daemon=True)
    thread.start()
    return thread
