"""Settings, read from the environment with safe local defaults.

Services: ``DATABASE_URL`` and ``REDIS_URL``. When they are not set, the URLs of
the embedded local servers (``python -m portal.localservices``) are used; those
are written to ``.state/services.json`` while the servers run.
"""

import json
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("PORTAL_STATE_DIR", BASE_DIR / ".state")).resolve()


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def service_url(name: str) -> str:
    """A service URL from the environment, else from the running local servers."""
    if os.environ.get(name):
        return os.environ[name]
    urls_file = STATE_DIR / "services.json"
    if urls_file.exists():
        return json.loads(urls_file.read_text())[name]
    raise ImproperlyConfigured(
        f"{name} is not set and no local servers are running. Set {name}, or start the "
        "embedded servers with `bin/run` (or `python -m portal.localservices up`)."
    )


def local_service_url(name: str) -> str:
    """A URL from the environment, else from the running local servers; "" when neither has it."""
    if os.environ.get(name):
        return os.environ[name]
    try:
        return json.loads((STATE_DIR / "services.json").read_text()).get(name, "")
    except (OSError, ValueError):
        return ""


def local_secret_key() -> str:
    """A random key kept in the state folder, so local sessions survive restarts."""
    key_file = STATE_DIR / "secret_key"
    if not key_file.exists():
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY") or local_secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# --- HTTPS and cookies -------------------------------------------------------
# On by default when DEBUG is off and the site answers to a name other than
# loopback (ALLOWED_HOSTS), which is what a deployment does; `bin/run` and the
# tests serve plain http on 127.0.0.1 and keep it off. SECURE_HTTPS=1/0 forces it.
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}
SECURE_HTTPS = env_bool("SECURE_HTTPS", not DEBUG and not set(ALLOWED_HOSTS) <= LOOPBACK_HOSTS)
SECURE_SSL_REDIRECT = SECURE_HTTPS
SESSION_COOKIE_SECURE = SECURE_HTTPS
CSRF_COOKIE_SECURE = SECURE_HTTPS
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", str(365 * 24 * 3600))) if SECURE_HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
SECURE_REDIRECT_EXEMPT = [r"^health/$"]  # load balancer probes speak plain http
if env_bool("TRUST_X_FORWARDED_PROTO", False):  # only behind a proxy that sets the header itself
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
# Search pages and the search API: open to everyone, or to logged-in users only.
SEARCH_REQUIRES_LOGIN = env_bool("SEARCH_REQUIRES_LOGIN", False)
# Who may see a collection an upload names for the first time: public, users (logged in) or
# staff. Staff change it per collection in the admin; existing collections keep theirs.
COLLECTION_DEFAULT_VISIBILITY = os.environ.get("COLLECTION_DEFAULT_VISIBILITY", "public")
if COLLECTION_DEFAULT_VISIBILITY not in {"public", "users", "staff"}:
    raise ImproperlyConfigured("COLLECTION_DEFAULT_VISIBILITY must be public, users or staff.")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc as static files: the docs work offline
    "portal",
    "embeddings",
    "search",
    "evaluation",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.middleware.RequestSizeLimitMiddleware",
    "portal.middleware.ServiceUnavailableMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "search.context_processors.active_model_context",
            ],
        },
    },
]

DATABASES = {"default": dj_database_url.parse(service_url("DATABASE_URL"), conn_max_age=60, conn_health_checks=True)}
# Fail fast (the portal answers 503) instead of hanging when the database is unreachable.
DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = int(os.environ.get("DATABASE_CONNECT_TIMEOUT", "3"))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = service_url("REDIS_URL")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "portal",
        # Short timeouts: throttles and sync debouncing fail open rather than hang when Valkey is down.
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", STATE_DIR / "static"))
MEDIA_URL = "media/"
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", STATE_DIR / "media"))
# Every media URL goes through search.media, which checks who may see the picture; the bytes
# then go out by the front server when one is named: MEDIA_ACCEL_REDIRECT, the internal prefix
# of an nginx location aliasing MEDIA_ROOT (X-Accel-Redirect), or MEDIA_SENDFILE=1 (X-Sendfile,
# Apache/lighttpd). Otherwise Django streams them itself, which SERVE_MEDIA=0 forbids: a
# deployment that means a front server to send every file fails at start when none is named.
MEDIA_ACCEL_REDIRECT = os.environ.get("MEDIA_ACCEL_REDIRECT", "").strip()
if MEDIA_ACCEL_REDIRECT and not MEDIA_ACCEL_REDIRECT.startswith("/"):
    raise ImproperlyConfigured("MEDIA_ACCEL_REDIRECT must be a URL path such as /protected-media/.")
MEDIA_SENDFILE = env_bool("MEDIA_SENDFILE", False)
SERVE_MEDIA = env_bool("SERVE_MEDIA", True)
if not (SERVE_MEDIA or MEDIA_ACCEL_REDIRECT or MEDIA_SENDFILE):
    raise ImproperlyConfigured("SERVE_MEDIA=0 needs MEDIA_ACCEL_REDIRECT or MEDIA_SENDFILE: "
                               "media files are checked by Django and sent by the front server.")
# How long browsers and shared caches may keep a picture of a public collection (others: never
# shared, checked again on each use).
MEDIA_CACHE_SECONDS = int(os.environ.get("MEDIA_CACHE_SECONDS", "3600"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

# --- Embeddings and search ---------------------------------------------------
# A hub id or a local checkpoint directory. When unset and the default hub model
# cannot be reached, the run command falls back to the offline demo model.
SIGLIP_MODEL = os.environ.get("SIGLIP_MODEL", "google/siglip-base-patch16-224")
SIGLIP_MODEL_EXPLICIT = bool(os.environ.get("SIGLIP_MODEL"))
SIGLIP_DEVICE = os.environ.get("SIGLIP_DEVICE") or None  # "cuda", "cpu" or auto
# How the towers run: auto (CUDA: torch in bf16; CPU: onnx-int8), torch, torch-int8, onnx, onnx-int8.
SIGLIP_INFERENCE = os.environ.get("SIGLIP_INFERENCE", "auto")
# Bulk ingestion on a GPU: decode JPEGs at a reduced scale (about twice as fast, pixels differ
# slightly from the per-upload path; docs/scaling.md).
INGEST_JPEG_DRAFT = env_bool("INGEST_JPEG_DRAFT", False)
# Text-query embeddings kept per web process (LRU) and, for SEARCH_QUERY_CACHE_TTL seconds, in Redis.
SEARCH_QUERY_CACHE_SIZE = int(os.environ.get("SEARCH_QUERY_CACHE_SIZE", "4096"))
SEARCH_QUERY_CACHE_TTL = int(os.environ.get("SEARCH_QUERY_CACHE_TTL", str(24 * 3600)))
# The Redis level of both caches: auto (on unless the text tower runs on CUDA, where encoding
# again is about as quick as a round trip), on or off. See search/serving.py.
SEARCH_QUERY_CACHE_SHARED = os.environ.get("SEARCH_QUERY_CACHE_SHARED", "auto")
# Neighbour lists kept per web process and index version (LRU entries per index), text queries'
# also in Redis for SEARCH_QUERY_CACHE_TTL seconds; 0 turns the result cache off.
SEARCH_RESULT_CACHE_SIZE = int(os.environ.get("SEARCH_RESULT_CACHE_SIZE", "4096"))
INDEX_DIR = Path(os.environ.get("INDEX_DIR", STATE_DIR / "indices"))
VECTOR_INDEX_BACKEND = os.environ.get("VECTOR_INDEX_BACKEND", "faiss-flat")
# Backend parameters as JSON, e.g. '{"ef_search": 128}' for faiss-hnsw or '{"nprobe": 64}' for
# faiss-ivfpq; defaults and meanings in search/core/vector_index/<backend>.py and docs/scaling.md.
VECTOR_INDEX_PARAMS = json.loads(os.environ.get("VECTOR_INDEX_PARAMS") or "{}")
# The milvus backend's server: Milvus Standalone, a Milvus cluster or Zilliz Cloud when set
# ("http://milvus:19530"); unset, the Milvus Lite server the local services start in the state
# folder (portal/localservices.py). MILVUS_TOKEN: "user:password" or an API key, for servers
# with authentication on.
MILVUS_URI = local_service_url("MILVUS_URI")
MILVUS_TOKEN = os.environ.get("MILVUS_TOKEN", "")
INDEX_VERSIONS_KEPT = int(os.environ.get("INDEX_VERSIONS_KEPT", "3"))
# Index versions are a base segment and small deltas (search/index_sync.py). A merge folds the
# deltas into a new base once they hold INDEX_MERGE_DELTA_FRACTION of the base's rows, or once
# INDEX_MERGE_TOMBSTONE_FRACTION of the base's rows are removed or replaced (neither below
# INDEX_MERGE_MIN_ROWS rows); folds small deltas together past INDEX_MERGE_MAX_DELTAS; and
# rebuilds an IVF-PQ base once the index holds INDEX_REBUILD_GROWTH times the rows it was built
# with. Merges run as merge_index_task on INDEX_MERGE_QUEUE (empty: the default queue).
INDEX_MERGE_DELTA_FRACTION = float(os.environ.get("INDEX_MERGE_DELTA_FRACTION", "0.01"))
INDEX_MERGE_TOMBSTONE_FRACTION = float(os.environ.get("INDEX_MERGE_TOMBSTONE_FRACTION", "0.02"))
INDEX_MERGE_MIN_ROWS = int(os.environ.get("INDEX_MERGE_MIN_ROWS", "1000"))
INDEX_MERGE_MAX_DELTAS = int(os.environ.get("INDEX_MERGE_MAX_DELTAS", "8"))
INDEX_REBUILD_GROWTH = float(os.environ.get("INDEX_REBUILD_GROWTH", "4"))
# For an approximate backend, a merge gives a delta of this many rows an HNSW graph (0: never).
INDEX_DELTA_GRAPH_ROWS = int(os.environ.get("INDEX_DELTA_GRAPH_ROWS", "4096"))
INDEX_MERGE_QUEUE = os.environ.get("INDEX_MERGE_QUEUE", "")
# Seconds a sync waits for transactions still writing vectors before it reads past them.
INDEX_SYNC_WRITER_WAIT = float(os.environ.get("INDEX_SYNC_WRITER_WAIT", "2"))
# A web process opens a newer index version needing more bytes than this that it does not hold
# (a new base after a merge) in the background, serving the older one meanwhile.
SEARCH_INDEX_INLINE_LOAD_BYTES = int(os.environ.get("SEARCH_INDEX_INLINE_LOAD_BYTES", str(64 << 20)))
SEARCH_MAX_K = 100
# A text↔image hit "matches" when the checkpoint's sigmoid head gives it at least this
# probability; below it for every hit, a search says "no good match" (docs/evaluation.md).
SEARCH_MATCH_THRESHOLD = float(os.environ.get("SEARCH_MATCH_THRESHOLD", "0.1"))
# Pages of a text search: at most this many results in all, through cursors valid this long (s).
SEARCH_MAX_RESULTS = int(os.environ.get("SEARCH_MAX_RESULTS", "1000"))
SEARCH_CURSOR_MAX_AGE = int(os.environ.get("SEARCH_CURSOR_MAX_AGE", "3600"))
# Seconds a web process keeps its table of the pictures' filterable attributes before reading
# the rows changed since (search/filters.py); a new index version refreshes it at once.
SEARCH_FILTER_REFRESH = float(os.environ.get("SEARCH_FILTER_REFRESH", "1.0"))

# Upload limits
UPLOAD_MAX_BYTES = int(os.environ.get("UPLOAD_MAX_BYTES", str(20 * 1024 * 1024)))
UPLOAD_MAX_PIXELS = int(os.environ.get("UPLOAD_MAX_PIXELS", str(40_000_000)))
UPLOAD_MAX_FILES = int(os.environ.get("UPLOAD_MAX_FILES", "200"))
DATA_UPLOAD_MAX_MEMORY_SIZE = UPLOAD_MAX_BYTES
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FILES = UPLOAD_MAX_FILES
# A zip archive for the bulk upload, and a whole multipart request; other request bodies
# are capped at DATA_UPLOAD_MAX_MEMORY_SIZE.
UPLOAD_MAX_ARCHIVE_BYTES = int(os.environ.get("UPLOAD_MAX_ARCHIVE_BYTES", str(10 * UPLOAD_MAX_BYTES)))
UPLOAD_MAX_REQUEST_BYTES = int(os.environ.get("UPLOAD_MAX_REQUEST_BYTES", str(512 * 1024 * 1024)))
# The first handler stops storing a file once it passes UPLOAD_MAX_BYTES.
FILE_UPLOAD_HANDLERS = [
    "search.validation.UploadLimitHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]

# --- Celery ------------------------------------------------------------------
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A task taken by a worker that dies (kill -9, OOM, lost machine) goes back to the queue
# once it has been unacknowledged this long; keep it above the longest embed/sync task.
TASK_VISIBILITY_TIMEOUT = int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "300"))
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": TASK_VISIBILITY_TIMEOUT,
    "socket_connect_timeout": 5,
    "socket_timeout": 30,
    "retry_on_timeout": True,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None  # a worker waits for Valkey to come back, however long
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True  # they are redelivered instead
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1}
# A worker that keeps dying on the same image stops retrying it after this many crashes.
EMBED_MAX_CRASHES = int(os.environ.get("EMBED_MAX_CRASHES", "5"))
# The reconciler (Celery beat, and `manage.py reconcile`): re-queues assets left pending
# longer than RECONCILE_STUCK_AFTER and checks every index against Postgres.
RECONCILE_INTERVAL = int(os.environ.get("RECONCILE_INTERVAL", "300"))
RECONCILE_STUCK_AFTER = int(os.environ.get("RECONCILE_STUCK_AFTER", "600"))
CELERY_BEAT_SCHEDULE = {
    "reconcile": {
        "task": "search.tasks.reconcile_task",
        "schedule": RECONCILE_INTERVAL,
        "options": {"expires": RECONCILE_INTERVAL},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(STATE_DIR / "celerybeat-schedule")
CELERY_TASK_TIME_LIMIT = 60 * 60
CELERY_TASK_SOFT_TIME_LIMIT = 55 * 60
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- REST API ----------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first, so that a request without credentials gets 401 with WWW-Authenticate.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["search.api.access.IsStaffOrReadOnly"],
    # Per client (user, else IP address), kept in the Redis cache; "None" switches a scope off.
    "DEFAULT_THROTTLE_RATES": {
        "search_anon": os.environ.get("THROTTLE_SEARCH_ANON", "120/minute"),
        "search_user": os.environ.get("THROTTLE_SEARCH_USER", "600/minute"),
        "upload": os.environ.get("THROTTLE_UPLOAD", "600/minute"),
    },
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "portal.errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Visual search API",
    "DESCRIPTION": "Text→image, image→text and image→image search over SigLIP embeddings.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
