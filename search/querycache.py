"""Caches of text queries: their embeddings, so a repeated query skips the text
tower, and (shared level only) the neighbours an index version gave them, so a
repeat that reaches another web process skips the scan too.

Two levels:

* a per-process LRU (``SEARCH_QUERY_CACHE_SIZE`` entries, 3 KB each for a base
  model): a hit costs microseconds;
* the shared Django cache (Redis / Valkey), so a query embedded by one web
  process is a hit in the others: a hit costs one round trip (a fraction of a
  millisecond on the same host). Entries expire after
  ``SEARCH_QUERY_CACHE_TTL`` seconds (default one day), which bounds what the
  shared level holds; the server's memory policy bounds it further.

The key is the embedding model (its id and checkpoint), the inference backend
and the query *as the model's tokenizer sees it*: the 64 token ids. So texts
that differ only in what SigLIP's tokenizer drops (case, punctuation, extra
spaces) or past the 64th token share one entry, and nothing else does.

The shared level pays where the text tower is slow: on a CPU a shared hit (about
0.4 ms) saves a 25 ms tower. On a GPU the tower takes about a millisecond, so a
round trip that misses costs a third of one while a hit saves little, and a repeat
that reaches another process is cheaper to encode again.
``SEARCH_QUERY_CACHE_SHARED`` says which: ``auto`` (default: shared unless the
encoder runs on CUDA), ``on`` or ``off``. Without it, both kinds of entry stay
per process.

A broken or unreachable shared cache only costs the shared level: the search
goes on with the local one and the encoder. Writes to the shared level are done
by a background thread of the process (``write_behind``), so a search does not
wait for them; a write that is lost only costs a later miss.

Neighbour lists are keyed by model, modality, index version, k and the query
vector; their local level is the served index version's result cache
(``search.indexing.ServedIndex``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
from django.conf import settings
from django.core.cache import cache

log = logging.getLogger(__name__)

KEY_PREFIX = "query-embedding:v1"
NEIGHBOURS_PREFIX = "query-neighbours:v1"
DEFAULT_SIZE = 4096
DEFAULT_TTL = 24 * 3600

HIT_LOCAL = "local"
HIT_SHARED = "shared"
MISS = "miss"


def _size() -> int:
    return max(0, int(getattr(settings, "SEARCH_QUERY_CACHE_SIZE", DEFAULT_SIZE)))


def _ttl() -> int:
    return max(1, int(getattr(settings, "SEARCH_QUERY_CACHE_TTL", DEFAULT_TTL)))


def shared_level(encoder) -> bool:
    """Whether queries encoded by ``encoder`` use the shared level (module docstring)."""
    choice = str(getattr(settings, "SEARCH_QUERY_CACHE_SHARED", "auto")).strip().lower()
    if choice in {"on", "off"}:
        return choice == "on"
    return not str(getattr(encoder, "device", "cpu")).startswith("cuda")


def cache_key(model, encoder, input_ids: np.ndarray) -> str:
    """The key of one query: model, checkpoint, backend and token ids."""
    digest = hashlib.sha256()
    digest.update(f"{model.pk}\0{model.source}\0{encoder.backend}\0".encode())
    digest.update(np.ascontiguousarray(input_ids, dtype="<i8").tobytes())
    return f"{KEY_PREFIX}:{model.pk}:{digest.hexdigest()}"


class LRU:
    """A bounded, thread-safe map that drops the least recently used entry first.

    ``size`` is a number or a function read at each insertion (so a setting
    changed at run time applies); 0 keeps nothing.
    """

    def __init__(self, size: int | Callable[[], int]):
        self._size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return max(0, int(self._size() if callable(self._size) else self._size))

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        size = self.size
        if not size:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > size:
                self._items.popitem(last=False)


class WriteBehind:
    """Shared-cache writes handed to one background thread per process.

    The queue is bounded: when Redis is slow or away, writes beyond it are
    dropped rather than held. A forked child starts its own thread on first use.
    """

    def __init__(self, capacity: int = 1024):
        self._capacity = capacity
        self._queue: queue.Queue | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def set(self, key: str, value, timeout: int) -> None:
        try:
            self._started().put_nowait((key, value, timeout))
        except queue.Full:
            log.warning("query cache writes are behind; dropping one")

    def flush(self) -> None:
        """Wait until every write handed over so far is done (for tests and shutdown)."""
        if self._queue is not None and self._pid == os.getpid():
            self._queue.join()

    def _started(self) -> queue.Queue:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._queue = queue.Queue(maxsize=self._capacity)
                    threading.Thread(target=self._run, args=(self._queue,), name="query-cache-writes",
                                     daemon=True).start()
                    self._pid = os.getpid()
        return self._queue

    @staticmethod
    def _run(jobs: queue.Queue) -> None:
        while True:
            key, value, timeout = jobs.get()
            try:
                cache.set(key, value, timeout=timeout)
            except Exception as exc:
                log.warning("query cache unavailable: %s", exc)
            finally:
                jobs.task_done()


write_behind = WriteBehind()


def _read_shared(key: str) -> bytes | None:
    """The bytes stored under ``key`` in the shared cache, or None (also when it is away)."""
    try:
        blob = cache.get(key)
    except Exception as exc:  # the search must not fail because the cache did
        log.warning("query cache unavailable: %s", exc)
        return None
    return blob if isinstance(blob, bytes) else None


def neighbours_key(model_id: int, modality: str, version: str, k: int, vector_digest: bytes) -> str:
    return f"{NEIGHBOURS_PREFIX}:{model_id}:{modality}:{version}:{k}:{vector_digest.hex()}"


def get_shared_neighbours(key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, scores) stored under ``key`` by any web process, or None."""
    blob = _read_shared(key)
    if blob is None or len(blob) % 12:
        return None
    n = len(blob) // 12
    return np.frombuffer(blob, dtype="<i8", count=n), np.frombuffer(blob, dtype="<f4", offset=8 * n)


def put_shared_neighbours(key: str, ids: np.ndarray, scores: np.ndarray) -> None:
    blob = np.asarray(ids, dtype="<i8").tobytes() + np.asarray(scores, dtype="<f4").tobytes()
    write_behind.set(key, blob, _ttl())


class QueryEmbeddingCache:
    """Per-process LRU in front of the shared Django cache."""

    def __init__(self, size: int | None = None):
        self._local = LRU(_size if size is None else size)

    @property
    def size(self) -> int:
        return self._local.size

    def __len__(self) -> int:
        return len(self._local)

    def clear(self) -> None:
        """Empty this process's level (the shared one expires by itself)."""
        self._local.clear()

    @staticmethod
    def _get_shared(key: str) -> np.ndarray | None:
        blob = _read_shared(key)
        if blob is None or len(blob) % 4:
            return None
        return np.frombuffer(blob, dtype="<f4")

    @staticmethod
    def _put_shared(key: str, vector: np.ndarray) -> None:
        write_behind.set(key, np.asarray(vector, dtype="<f4").tobytes(), _ttl())

    # -- use -----------------------------------------------------------------

    def text_embedding(self, model, encoder, text: str) -> tuple[np.ndarray, str]:
        """The unit vector of ``text`` and where it came from
        (:data:`HIT_LOCAL`, :data:`HIT_SHARED` or :data:`MISS`)."""
        input_ids = encoder.token_ids([text])
        key = cache_key(model, encoder, input_ids)
        vector = self._local.get(key)
        if vector is not None:
            return vector, HIT_LOCAL
        shared = shared_level(encoder)
        vector = self._get_shared(key) if shared else None
        if vector is not None and vector.shape == (encoder.dim,):
            vector.setflags(write=False)
            self._local.put(key, vector)
            return vector, HIT_SHARED
        vector = np.array(encoder.encode_token_ids(input_ids)[0], dtype=np.float32)
        vector.setflags(write=False)
        self._local.put(key, vector)
        if shared:
            self._put_shared(key, vector)
        return vector, MISS


query_cache = QueryEmbeddingCache()


def text_embedding(model, encoder, text: str) -> tuple[np.ndarray, str]:
    """:meth:`QueryEmbeddingCache.text_embedding` on the process-wide cache."""
    return query_cache.text_embedding(model, encoder, text)
