"""Run the whole portal locally: services, migrations, a model, the web server, a worker
and Celery beat (which runs the reconciler every RECONCILE_INTERVAL seconds).

    python -m portal.launch            # what `bin/run` calls

PostgreSQL and Valkey are the embedded ones unless DATABASE_URL / REDIS_URL are
set. Ctrl-C stops the web server and the worker, then the embedded servers.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

from portal.localservices import LocalServices, needs_local_services, state_dir

PYTHON = sys.executable


def manage(env, *args, check=True):
    return subprocess.run([PYTHON, "manage.py", *args], env=env, check=check)


def ensure_admin(env) -> None:
    """A local staff account so the admin can be used at once; its password is kept in the state folder."""
    password_file = state_dir() / "admin-password"
    password = password_file.read_text().strip() if password_file.exists() else secrets.token_urlsafe(12)
    code = (
        "from django.contrib.auth import get_user_model as g; U = g()\n"
        "if not U.objects.filter(is_superuser=True).exists():\n"
        f"    U.objects.create_superuser('admin', '', {password!r}); print('created')\n"
    )
    out = subprocess.run([PYTHON, "manage.py", "shell", "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    if "created" in out:
        password_file.write_text(password)
        password_file.chmod(0o600)
    if password_file.exists():
        print(f"Admin login: admin / {password_file.read_text().strip()}  (kept in {password_file})")


def main() -> int:
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    services = LocalServices(state_dir()) if needs_local_services() else None
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # gunicorn below serves plain http: secure-only cookies and the https redirect would
    # lock everyone out. Set SECURE_HTTPS=1 when a TLS proxy sits in front.
    env.setdefault("SECURE_HTTPS", "0")
    state_dir().mkdir(parents=True, exist_ok=True)  # beat keeps its schedule there
    children: list[subprocess.Popen] = []
    try:
        if services is not None:
            print("Starting embedded PostgreSQL and Valkey …")
            env.update({k: v for k, v in services.start().items() if not os.environ.get(k)})
        manage(env, "migrate", "--noinput", "-v", "0")
        manage(env, "collectstatic", "--noinput", "-v", "0")
        manage(env, "ensure_model")
        ensure_admin(env)
        host, port = env.get("HOST", "127.0.0.1"), env.get("PORT", "8000")
        children.append(subprocess.Popen(
            [PYTHON, "-m", "celery", "-A", "portal", "worker", "--loglevel=INFO",
             f"--concurrency={env.get('WORKER_CONCURRENCY', '1')}"], env=env))
        children.append(subprocess.Popen(
            [PYTHON, "-m", "celery", "-A", "portal", "beat", "--loglevel=INFO",
             "--schedule", str(state_dir() / "celerybeat-schedule")], env=env))
        children.append(subprocess.Popen(
            [PYTHON, "-m", "gunicorn", "portal.wsgi", "-c", "python:portal.gunicorn", "--bind", f"{host}:{port}",
             "--workers", env.get("WEB_WORKERS", "2"), "--threads", "4", "--timeout", "120"], env=env))
        # Anything uploaded while no worker ran is picked up now.
        manage(env, "embed_missing", check=False)
        # With the offline demo model: its unseen test pictures become the gallery (once).
        manage(env, "demo", "--if-active", check=False)
        manage(env, "rebuild_index", "--sync", check=False)
        print(f"\nPortal: http://{host}:{port}/   (Ctrl-C to stop)\n", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        # Ctrl-C stops everything even when started from a shell that ignores SIGINT (a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        if services is not None:
            services.stop()
            print("Embedded servers stopped.")


if __name__ == "__main__":
    sys.exit(main())
