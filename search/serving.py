"""Serving searches: the loaded index versions, the query caches and the serving-model check.

Everything a web process keeps between searches lives here:

* **loaded indices** (``loaded_indices``): the newest ready version of each model's
  indices, loaded once per process and swapped for a newer one without a restart
  (the versions are written by ``search.index_sync``); each served version keeps a
  result cache of its neighbour lists;
* **query caches** (``QueryEmbeddingCache``, the shared neighbour lists), below;
* **the serving model** (``ServingModel``, ``ServingCheck``): the active model a
  search starts from, checked in the search's own row query.

Query caches
------------

Caches of text queries: their embeddings, so a repeated query skips the text
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
(``ServedIndex``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.db.models import OuterRef, Subquery

from embeddings.models import EmbeddingModel
from embeddings.services import NoActiveModel
from search.core.lru import LRU
from search.core.vector_index import VectorIndex
from search.core.vector_index.base import Subset
from search.core.vector_index.segment_files import read_manifest
from search.core.vector_index.segments import SegmentedIndex
from search.index_sync import MODALITIES, is_manifest, latest_build, mark_version_failed, open_version, ready_builds
from search.models import IndexBuild

_UNKNOWN = object()


def version_attribute(modality: str) -> str:
    return f"latest_{str(modality)}_version"


def with_latest_versions(models):
    """``models`` (an ``EmbeddingModel`` queryset) annotated with the newest ready
    index version of each modality, so a search needs no query of its own for it."""
    return models.annotate(**{
        version_attribute(modality): Subquery(
            IndexBuild.objects.filter(model=OuterRef("pk"), modality=modality, status=IndexBuild.Status.READY)
            .order_by("-version")
            .values("version")[:1]
        )
        for modality in MODALITIES
    })


RESULT_CACHE_MAX_K = 400  # longest neighbour list the result cache keeps

INLINE_LOAD_BYTES = 64 << 20  # a newer version needing more than this is opened in the background


def _inline_load_bytes() -> int:
    return int(getattr(settings, "SEARCH_INDEX_INLINE_LOAD_BYTES", INLINE_LOAD_BYTES))


def _result_cache_size() -> int:
    return int(getattr(settings, "SEARCH_RESULT_CACHE_SIZE", 4096))


@dataclass
class ServedIndex:
    """One loaded index version, with the neighbours of the vectors it was last asked
    about (an LRU of ``SEARCH_RESULT_CACHE_SIZE`` entries per index version, and for
    text queries the shared level of the query caches).

    What a version holds is fixed once it is written, so its answers stay right until
    a newer version replaces it, and that drops them: no invalidation to get wrong. Rows
    deleted since the version was written are filtered out by the search reading
    them from Postgres, cached or not.
    """

    model_id: int
    modality: str
    version: int
    index: VectorIndex
    checksum: str = ""  # of the version's file: part of the shared key, should a version number recur
    results: LRU = field(default_factory=lambda: LRU(_result_cache_size))

    def nearest(self, vector: np.ndarray, k: int, *, shared_read: bool = False,
                shared_write: bool = False, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """(ids, scores, where) of the ``k`` rows nearest to one vector, among ``subset`` when
        given (a filter: searched every time); ``where`` is ``HIT_LOCAL``, ``HIT_SHARED`` or
        ``MISS`` (the index was searched)."""
        vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        # SEARCH_RESULT_CACHE_SIZE=0: no result cache at all. Long lists (a search widened
        # far past deleted rows) are not kept: they would crowd out thousands of short ones.
        if subset is not None:
            return (*self._search(vector, k, subset), MISS)
        if not self.results.size or k > RESULT_CACHE_MAX_K:
            return (*self._search(vector, k), MISS)
        digest = hashlib.blake2b(vector.tobytes(), digest_size=16).digest()
        found = self.results.get((k, digest))
        if found is not None:
            return found[0], found[1], HIT_LOCAL
        shared_key = None
        if shared_read or shared_write:
            shared_key = neighbours_key(self.model_id, self.modality,
                                                   f"{self.version}-{self.checksum[:16]}", k, digest)
        if shared_read:
            found = get_shared_neighbours(shared_key)
            if found is not None and len(found[0]) == k:
                self.results.put((k, digest), found)
                return found[0], found[1], HIT_SHARED
        ids, scores = self._search(vector, k)
        self.results.put((k, digest), (ids, scores))
        if shared_write:
            put_shared_neighbours(shared_key, ids, scores)
        return ids, scores, MISS

    def _search(self, vector: np.ndarray, k: int, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The index's answer for one (1, dim) vector, as read-only 1-d arrays."""
        ids, scores = self.index.search(vector, k) if subset is None else self.index.search(vector, k, subset)
        ids, scores = ids[0], scores[0]
        ids.setflags(write=False)
        scores.setflags(write=False)
        return ids, scores


class LoadedIndices:
    """Per-process cache of the newest index version of each model and modality.

    A version is a manifest of segments (``search.index_sync``); this process keeps the
    segments of the version it serves, by file and checksum, and opens a newer version with
    them: after an upload only the new delta segment is read, and the base is never read
    twice. Bases are mapped from their files (``open_base(mapped=True)``): their pages are
    the page cache's, shared by the web processes of the host.

    A newer version that needs more than ``SEARCH_INDEX_INLINE_LOAD_BYTES`` of segments not
    held (a new base after a merge) is opened by a background thread; searches go on with
    the version served until it is complete, then it is swapped in and the segments no
    longer named are let go. The first version of a process is opened by the search that
    asks for it.
    """

    def __init__(self):
        self._lock = threading.Lock()  # one opening of a version at a time (the background one aside)
        self._swap = threading.Lock()  # what is served and held changes together
        self._loaded: dict[tuple[int, str], ServedIndex] = {}
        self._held: dict[tuple[int, str], dict] = {}  # (file, sha256) -> HeldSegment, per index
        self._loading: dict[tuple[int, str], threading.Thread] = {}
        # Called with a model whose newest version would not load, so that a worker writes a
        # fresh one; the app wires it to ``search.tasks.schedule_index_sync`` as it starts.
        self.on_unusable = lambda model: None

    def get(self, model: EmbeddingModel, modality: str) -> VectorIndex | None:
        """The newest ready version's index (see :meth:`served`)."""
        served = self.served(model, modality)
        return served.index if served is not None else None

    def served(self, model: EmbeddingModel, modality: str) -> ServedIndex | None:
        """The newest ready version, loaded once per process. A model fetched with
        ``with_latest_versions`` carries that version already (no query here)."""
        version = getattr(model, version_attribute(modality), _UNKNOWN)
        if version is _UNKNOWN:
            build = latest_build(model, modality)
            version = build.version if build is not None else None
        key = (model.pk, modality)
        current = self._loaded.get(key)
        if version is None:
            return None
        if current is not None and (current.version == version or self._busy(key)):
            return current
        with self._lock:
            current = self._loaded.get(key)
            if current is not None and (current.version == version or self._busy(key)):
                return current
            if current is not None and self._to_load(model, modality, key) > _inline_load_bytes():
                thread = threading.Thread(target=self._load_in_background, args=(model, modality, key),
                                          name=f"index-load-{model.pk}-{modality}", daemon=True)
                self._loading[key] = thread
                thread.start()
                return current
            return self._open_newest(model, modality, key)

    def loading(self, model: EmbeddingModel, modality: str) -> bool:
        """Whether a newer version of the index is being opened in the background."""
        return self._busy((model.pk, modality))

    def held_segments(self, model: EmbeddingModel, modality: str) -> list[str]:
        """The segment files this process holds for the index (for checks)."""
        return sorted(name for name, _ in self._held.get((model.pk, modality), {}))

    def _busy(self, key) -> bool:
        thread = self._loading.get(key)
        return thread is not None and thread.is_alive()

    def _to_load(self, model, modality, key) -> int:
        """Bytes of the newest version's segments this process does not hold."""
        build = latest_build(model, modality)
        if build is None or not is_manifest(build):
            return 0
        try:
            manifest = read_manifest(build.file_path, build.checksum)
        except Exception:
            return 0  # opened (and refused) inline, with the fallback below
        held = self._held.get(key, {})
        return sum(ref.bytes for ref in manifest.segments if (ref.file, ref.sha256) not in held)

    def _load_in_background(self, model, modality, key) -> None:
        try:
            self._open_newest(model, modality, key)
        except Exception:
            log.exception("opening the newest %s index of %s failed", modality, model)
        finally:
            connection.close()  # this thread's own connection

    def _open_newest(self, model, modality, key) -> ServedIndex | None:
        """Open the newest version that loads (marking torn ones failed), reusing the
        segments held, and serve it; the segments it does not name are let go."""
        newest = latest_build(model, modality)
        for build in ready_builds(model, modality):
            held = dict(self._held.get(key, {}))
            try:
                index = open_version(build, held, mapped=True)
            except Exception as exc:  # a missing or torn file: fall back to the previous version
                mark_version_failed(build, exc)
                continue
            if newest is None or build.version != newest.version:
                # The newest version was torn or missing: serve the last good one and have a
                # worker write a fresh version from Postgres.
                self.on_unusable(model)
            names = {(ref.file, ref.sha256) for ref in index.manifest.segments} if isinstance(
                index, SegmentedIndex) else set()
            served = ServedIndex(model.pk, str(modality), build.version, index, build.checksum or "")
            with self._swap:
                self._held[key] = {name: segment for name, segment in held.items() if name in names}
                self._loaded[key] = served
            return served
        self.on_unusable(model)
        return self._loaded.get(key)


loaded_indices = LoadedIndices()


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


@functools.cache
def _serving_model_sql() -> tuple[str, tuple]:
    """The active model with its newest index versions, and that row as text (its
    ``serving_signature``): what a search checks its remembered model against."""
    models = with_latest_versions(EmbeddingModel.objects.filter(is_active=True)).order_by("pk")[:1]
    sql, params = models.query.sql_with_params()
    return f"SELECT serving::text AS serving_signature, serving.* FROM ({sql}) serving", params


@functools.cache
def _signature_sql() -> tuple[str, tuple]:
    sql, params = _serving_model_sql()
    return f"(SELECT checked.serving_signature FROM ({sql}) checked)", params


class StaleServingModel(Exception):
    """The database no longer serves the model a search started from."""


class ServingModel:
    """The active model with its index versions as this process last read them.

    A search starts from the remembered model and has the query that fetches its hit
    rows check it (:class:`ServingCheck`: one more column, no round trip of its own).
    When the model or an index version changed meanwhile, the search runs again on a
    fresh lookup, so no answer comes from a model or version the database has left.
    """

    def __init__(self):
        self._model: EmbeddingModel | None = None

    def remembered(self) -> EmbeddingModel | None:
        return self._model

    def lookup(self) -> EmbeddingModel:
        """Read the serving model from the database (one query) and remember it."""
        sql, params = _serving_model_sql()
        model = next(iter(EmbeddingModel.objects.raw(sql, params)), None)
        self._model = model
        if model is None:
            raise NoActiveModel()
        return model

    def forget(self) -> None:
        self._model = None


served_model = ServingModel()


def serving_model() -> EmbeddingModel:
    """The active model with its newest index versions, read now."""
    return served_model.lookup()


class ServingCheck:
    """Checks a remembered model in the first row query of a search."""

    def __init__(self, model: EmbeddingModel):
        self.model = model
        self.pending = True

    def verify(self, signature: str | None) -> None:
        self.pending = False
        if signature != self.model.serving_signature:
            raise StaleServingModel()

    def settle(self) -> None:
        """A search that fetched no row (an empty index) checks with a lookup of its own."""
        if self.pending:
            self.verify(served_model.lookup().serving_signature)


def _on_serving_model(search):
    """``search(model, check)`` on the remembered serving model, checked by the search's
    first row query; once more on a fresh lookup if the database serves another model
    or versions, or if the remembered model failed before it could be checked (a
    deleted model's files, say)."""
    model = served_model.remembered()
    if model is not None:
        check = ServingCheck(model)
        try:
            result = search(model, check)
            check.settle()
            return result
        except StaleServingModel:
            pass
        except Exception:
            if not check.pending:
                raise  # the model was current: a real failure
        served_model.forget()
    return search(served_model.lookup(), None)
