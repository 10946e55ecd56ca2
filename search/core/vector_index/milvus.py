"""Vectors in Milvus: one collection per model and modality, HNSW on inner product.

Milvus is a distributed vector database: the same client code talks to Milvus
Lite (one local process, for development and tests), Milvus Standalone and a
Milvus cluster, so the index can outgrow one machine without a change here.
Each index is a collection::

    id      INT64 primary key (the row id: an asset or caption id)
    vector  FLOAT_VECTOR(dim), index HNSW, metric IP (M = m, efConstruction = ef_construction)

created on first write. Every call passes the consistency level ``consistency``
(Strong by default): a search issued after an ``add`` returned then sees its rows,
from any process, as the portal needs (a worker writes, web processes search).
Milvus Lite shows writes at once whatever the level (measured: no flush needed,
test_milvus_backend.py); a Milvus server does so only at Strong (Bounded lags by
up to a few seconds, Session shows a client only its own writes), and Strong
costs a wait for the write timestamp, not a flush. ``add`` upserts, ``remove``
deletes by primary key and returns how many of the ids were stored, ``search``
runs Milvus's k-NN search with ``ef`` (at least ``k``).

**Filtered searches.** A ``Subset``'s ids go to Milvus as the filter
expression ``id in [...]`` (as the template ``id in {ids}`` with the ids as a
typed parameter on servers that parse templates, Milvus 2.5 and later; inlined
elsewhere, Milvus Lite included), so the engine filters inside its graph walk.
A graph walk may still stop short of ``k`` rows of a very selective subset (a
filtered walk keeps only the subset's rows among those it passes; Milvus's own
HNSW switches to a scan for very selective filters, FAISS's in Milvus Lite does not).
The queries that came back short are then answered exactly when the subset has
at most ``exact_subset_max`` ids: the subset's stored vectors are fetched
(through the same filter expression) and scored here. Larger subsets are asked
again with ``ef`` four times larger, up to ``MAX_EF``.

**Files.** As with ``pgvector``, ``save`` writes a small manifest in the common
file format (the header and JSON naming the collection); ``load`` reopens the
collection it names. Every version therefore shows the live rows
(``snapshot_files = False``).

**Connections.** Each process keeps one ``MilvusClient`` per server, made from
(in this order):

1. the callable given to ``set_server_provider``, called with the index's
   ``alias`` parameter; it returns a URI (``http://host:19530``) or a dict of
   ``MilvusClient`` arguments (``uri``, ``token``, ``db_name``). The portal gives
   ``settings.MILVUS_URI`` (``search/apps.py``);
2. ``$MILVUS_URI`` (and ``$MILVUS_TOKEN``).

Clients are made per process id (a gRPC channel does not survive ``fork``), and
making one waits up to ``CONNECT_WAIT_S`` for a server that is still starting.

Parameters: ``collection`` (default: a new random name; pass one, or use
``params_for_scope``), ``collection_prefix`` ("vecidx_", for names derived from
a scope), ``m`` (16), ``ef_construction`` (64), ``ef`` (64, search parameter),
``exact_subset_max`` (4096, search parameter), ``consistency`` ("Strong"),
``insert_batch`` (5000 rows per upsert request), ``alias`` ("default").
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from typing import Callable

import numpy as np

from search.core.vector_index.base import (
    StorageBackedIndex,
    Subset,
    VectorIndexError,
    _is_int,
    as_ids,
    as_k,
    as_subset,
    as_vectors,
    empty_results,
    upsert_batch,
)

__all__ = ["MilvusIndex", "TOKEN_ENV_VAR", "URI_ENV_VAR", "set_server_provider"]

URI_ENV_VAR = "MILVUS_URI"
TOKEN_ENV_VAR = "MILVUS_TOKEN"
DEFAULTS = {
    "collection": None,
    "collection_prefix": "vecidx_",
    "m": 16,
    "ef_construction": 64,
    "ef": 64,
    "exact_subset_max": 4096,
    "consistency": "Strong",
    "insert_batch": 5000,
    "alias": "default",
}
CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")
MAX_TOPK = 16384  # Milvus's limit on k (topk) and on rows per query request
MAX_EF = 4096  # the widest candidate list a short filtered search is retried with
CONNECT_WAIT_S = 20.0
ID_BATCH = 16384  # ids per point read, delete or page of ids()
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,63})?$")
_COLLECTION_NOT_FOUND = 100
_COLLECTION_NOT_LOADED = 101

_provider: Callable | None = None
_clients: dict = {}  # (pid, uri, token, db_name) -> MilvusClient
_versions: dict = {}  # client key -> the server's version string
_lock = threading.Lock()


class _NoMvccWarning(logging.Filter):
    """pymilvus warns on every query iterator over Milvus Lite, which returns no MVCC
    timestamp; the client-side one it falls back to is what a listing of ids needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("failed to get mvccTs")


logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_NoMvccWarning())


def set_server_provider(provider: Callable | None) -> None:
    """Use ``provider(alias)`` (a URI, or a dict of ``MilvusClient`` arguments) for every
    milvus index in this process; ``None`` leaves ``$MILVUS_URI``."""
    global _provider
    _provider = provider


def _connection_args(alias: str) -> dict:
    found = _provider(alias) if _provider is not None else None
    if found is None and os.environ.get(URI_ENV_VAR):
        found = {"uri": os.environ[URI_ENV_VAR], "token": os.environ.get(TOKEN_ENV_VAR, "")}
    if isinstance(found, str):
        found = {"uri": found}
    if not (isinstance(found, dict) and found.get("uri")):
        raise VectorIndexError(
            f"the milvus backend has no server: set ${URI_ENV_VAR} or call set_server_provider()"
        )
    return {"uri": str(found["uri"]), "token": str(found.get("token") or ""),
            "db_name": str(found.get("db_name") or "")}


def _client(alias: str):
    """This process's client for the server of ``alias``, made on first use."""
    args = _connection_args(alias)
    key = (os.getpid(), args["uri"], args["token"], args["db_name"])
    client = _clients.get(key)
    if client is not None:
        return key, client
    from pymilvus import MilvusClient, MilvusException

    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            client = MilvusClient(**{name: value for name, value in args.items() if value})
            break
        except MilvusException as exc:  # refused: a server still starting (Milvus Lite takes ~1 s)
            if time.monotonic() > deadline:
                raise VectorIndexError(f"cannot reach Milvus at {args['uri']}: {exc}") from exc
            time.sleep(0.2)
    with _lock:
        _clients.setdefault(key, client)
        return key, _clients[key]


def _server_version(key, client) -> str:
    found = _versions.get(key)
    if found is None:
        found = _versions[key] = str(client.get_server_version() or "")
    return found


def _parses_templates(key, client) -> bool:
    """Whether the server takes ``filter_params`` (Milvus >= 2.5; not Milvus Lite)."""
    match = re.match(r"^v?(\d+)\.(\d+)", _server_version(key, client))
    return bool(match) and (int(match[1]), int(match[2])) >= (2, 5)


def _is_lite(key, client) -> bool:
    return _server_version(key, client).startswith("milvus_lite")


def _scope_collection(prefix: str, scope: str) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", str(scope).lower()).strip("_")
    return f"{prefix}{name}"[:255] if name else f"{prefix or 'vecidx_'}{secrets.token_hex(8)}"


def _code(exc) -> int | None:
    return getattr(exc, "code", None)


class MilvusIndex(StorageBackedIndex):
    """Rows in a Milvus collection, searched through its HNSW index."""

    backend = "milvus"
    exact = False
    storage_noun = "collection"
    search_param_names = frozenset({"ef", "exact_subset_max"})

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        merged = {**DEFAULTS, **self.params}
        if merged["collection"] is None:
            merged["collection"] = f"{merged['collection_prefix'] or 'vecidx_'}{secrets.token_hex(8)}"
        self._check_params(merged)
        self.params = merged
        self._ready: set = set()  # client keys on which the collection is known to exist, loaded
        self._ready_lock = threading.Lock()

    def _check_params(self, params: dict) -> None:
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise VectorIndexError(f"unknown {self.backend!r} parameters {unknown}; known: {sorted(DEFAULTS)}")
        if not (isinstance(params["collection_prefix"], str) and _PREFIX.match(params["collection_prefix"])):
            raise VectorIndexError(
                "collection_prefix must be empty or a letter or _ followed by letters, digits or _, "
                f"got {params['collection_prefix']!r}"
            )
        if not (isinstance(params["collection"], str) and _NAME.match(params["collection"])):
            raise VectorIndexError(
                "collection must be a Milvus collection name (a letter or _, then letters, digits or _; "
                f"at most 255), got {params['collection']!r}"
            )
        for name, low, high in (
            ("m", 2, 2048),
            ("ef_construction", 8, 4096),
            ("ef", 1, MAX_TOPK * 2),
            ("exact_subset_max", 0, MAX_TOPK),
            ("insert_batch", 1, 100_000),
        ):
            value = params[name]
            if not _is_int(value) or not low <= value <= high:
                raise VectorIndexError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if params["consistency"] not in CONSISTENCY_LEVELS:
            raise VectorIndexError(
                f"consistency must be one of {list(CONSISTENCY_LEVELS)}, got {params['consistency']!r}"
            )
        if not isinstance(params["alias"], str) or not params["alias"]:
            raise VectorIndexError(f"alias must name a Milvus connection, got {params['alias']!r}")

    @classmethod
    def params_for_scope(cls, params: dict | None, scope: str) -> dict:
        params = dict(params or {})
        if not params.get("collection"):
            prefix = params.get("collection_prefix", DEFAULTS["collection_prefix"])
            params["collection"] = _scope_collection(prefix if isinstance(prefix, str) else "", scope)
        return params

    @property
    def collection(self) -> str:
        return self.params["collection"]

    # -- the collection ----------------------------------------------------------

    def _client(self):
        return _client(self.params["alias"])

    def _call(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, its Milvus errors as VectorIndexError."""
        from pymilvus import MilvusException

        try:
            return fn(*args, **kwargs)
        except MilvusException as exc:
            raise VectorIndexError(f"milvus {what} on collection {self.collection!r} failed: {exc}") from exc

    def _exists(self, key, client) -> bool:
        """Whether the collection exists (then checked and loaded); cached per client."""
        if key in self._ready:
            return True
        if not self._call("has_collection", client.has_collection, self.collection):
            return False
        self._check_dimension(client)
        self._load(client)
        with self._ready_lock:
            self._ready.add(key)
        return True

    def _check_dimension(self, client) -> None:
        described = self._call("describe_collection", client.describe_collection, self.collection)
        fields = {field["name"]: field for field in described.get("fields", [])}
        dim = (fields.get("vector", {}).get("params") or {}).get("dim")
        if "id" not in fields or dim is None or int(dim) != self.dim:
            found = f"vectors of dimension {dim}" if dim is not None else "no 'vector' field"
            raise VectorIndexError(f"collection {self.collection!r} holds {found}, not {self.dim}")

    def _load(self, client) -> None:
        from pymilvus.client.types import LoadState

        state = self._call("get_load_state", client.get_load_state, self.collection)
        if state.get("state") != LoadState.Loaded:
            self._call("load_collection", client.load_collection, self.collection)

    def _ensure(self, key, client) -> None:
        """Create the collection and its index when missing."""
        if self._exists(key, client):
            return
        from pymilvus import DataType, MilvusClient, MilvusException

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        try:
            client.create_collection(self.collection, schema=schema, consistency_level=self.params["consistency"])
        except MilvusException:
            if not client.has_collection(self.collection):  # not a writer racing us to create it
                raise
        self._create_index(key, client)
        if not self._exists(key, client):
            raise VectorIndexError(f"collection {self.collection!r} was not created")

    def _create_index(self, key, client) -> None:
        """The HNSW index on the vectors, unless the collection has it (made by a racing writer).
        Not waited for: the index is declared at once, built as segments fill."""
        from pymilvus import MilvusException

        if client.list_indexes(self.collection, field_name="vector"):
            return
        build = {"M": int(self.params["m"]), "efConstruction": int(self.params["ef_construction"])}
        index_params = client.prepare_index_params()
        # pymilvus 3 sends the build parameters as keys of their own, which Milvus reads;
        # Milvus Lite reads them only from the older form, one JSON value under "params".
        index_params.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                               params={"params": build} if _is_lite(key, client) else build)
        try:
            client.create_index(self.collection, index_params, sync=False)
        except MilvusException:
            if not client.list_indexes(self.collection, field_name="vector"):
                raise

    def _forget(self, key) -> None:
        with self._ready_lock:
            self._ready.discard(key)

    def _retrying(self, key, client, what: str, fn):
        """``fn()``; a collection dropped meanwhile gives None, one released (a server
        restart) is loaded and ``fn`` called again."""
        from pymilvus import MilvusException

        try:
            return fn()
        except MilvusException as exc:
            self._forget(key)
            if not self._exists(key, client):
                return None
            if _code(exc) not in (_COLLECTION_NOT_FOUND, _COLLECTION_NOT_LOADED) and "not loaded" not in str(exc):
                raise VectorIndexError(f"milvus {what} on collection {self.collection!r} failed: {exc}") from exc
            return self._call(what, fn)

    def server_version(self) -> str:
        """The server's version ("v2.6.11"; Milvus Lite: "milvus_lite-3.2.2"), for benchmark records."""
        key, client = self._client()
        return str(self._call("get_server_version", client.get_server_version))

    def drop(self) -> None:
        """Drop the collection (and its index); the index is empty afterwards."""
        key, client = self._client()
        if self._call("has_collection", client.has_collection, self.collection):
            self._call("drop_collection", client.drop_collection, self.collection)
        with self._ready_lock:
            self._ready = set()

    def flush(self, wait_s: float = 3600.0) -> None:
        """Seal what was written into segments and wait until the server reports them
        indexed: after a bulk load, so searches walk graphs instead of scanning unindexed
        rows. (Milvus reports its index builds; Milvus Lite reports its indexes done while
        its background thread may still be building them.)"""
        key, client = self._client()
        if not self._exists(key, client):
            return
        self._call("flush", client.flush, self.collection)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            info = self._call("describe_index", client.describe_index, self.collection, "vector") or {}
            if int(info.get("pending_index_rows") or 0) == 0 and \
                    int(info.get("indexed_rows") or 0) >= int(info.get("total_rows") or 0):
                return
            time.sleep(0.5)
        raise VectorIndexError(f"collection {self.collection!r} was still being indexed after {wait_s:.0f} s")

    # -- data ------------------------------------------------------------------------

    def add(self, ids, vectors) -> None:
        ids, vectors = upsert_batch(ids, vectors, self.dim)
        if not len(ids):
            return
        key, client = self._client()
        self._ensure(key, client)
        step = int(self.params["insert_batch"])
        for start in range(0, len(ids), step):
            rows = [{"id": int(row_id), "vector": vector}
                    for row_id, vector in zip(ids[start:start + step].tolist(), vectors[start:start + step])]
            done = self._retrying(key, client, "upsert", lambda: client.upsert(self.collection, rows))
            if done is None:  # dropped meanwhile: this add recreates it
                self._ensure(key, client)
                self._call("upsert", client.upsert, self.collection, rows)

    def _stored(self, key, client, ids: np.ndarray) -> np.ndarray:
        """Those of ``ids`` that are stored (sorted)."""
        found = []
        for start in range(0, len(ids), ID_BATCH):
            chunk = ids[start:start + ID_BATCH].tolist()
            rows = self._retrying(key, client, "get", lambda: client.get(
                self.collection, ids=chunk, output_fields=["id"], consistency_level=self.params["consistency"]))
            found.extend(row["id"] for row in rows or ())
        return np.unique(np.asarray(found, dtype=np.int64))

    def remove(self, ids) -> int:
        ids = np.unique(as_ids(ids))
        if not len(ids):
            return 0
        key, client = self._client()
        if not self._exists(key, client):
            return 0
        stored = self._stored(key, client, ids)  # Milvus's delete reports the ids asked for, not those found
        for start in range(0, len(stored), ID_BATCH):
            chunk = stored[start:start + ID_BATCH].tolist()
            self._retrying(key, client, "delete", lambda: client.delete(self.collection, ids=chunk))
        return len(stored)

    def count(self) -> int:
        key, client = self._client()
        if not self._exists(key, client):
            return 0
        rows = self._retrying(key, client, "count", lambda: client.query(
            self.collection, filter="", output_fields=["count(*)"], consistency_level=self.params["consistency"]))
        return int(rows[0]["count(*)"]) if rows else 0

    def ids(self) -> np.ndarray:
        key, client = self._client()
        if not self._exists(key, client):
            return np.empty(0, dtype=np.int64)

        def listing():
            pages = []
            iterator = client.query_iterator(self.collection, batch_size=ID_BATCH, filter="", output_fields=["id"],
                                             consistency_level=self.params["consistency"])
            try:
                while page := iterator.next():
                    pages.append(np.fromiter((row["id"] for row in page), dtype=np.int64, count=len(page)))
            finally:
                iterator.close()
            return pages

        pages = self._retrying(key, client, "ids", listing) or []
        return np.sort(np.concatenate(pages)) if pages else np.empty(0, dtype=np.int64)

    # -- search ----------------------------------------------------------------------

    def _filter(self, key, client, ids: np.ndarray) -> dict:
        """The search arguments restricting it to ``ids``."""
        if _parses_templates(key, client):
            return {"filter": "id in {ids}", "filter_params": {"ids": ids.tolist()}}
        return {"filter": f"id in [{','.join(map(str, ids.tolist()))}]"}

    def _search(self, key, client, queries: np.ndarray, k: int, ef: int, restrict: dict):
        """Milvus's k-NN search: per query, (ids, scores) arrays best first; None when the
        collection was dropped meanwhile."""
        def run():
            return client.search(
                self.collection, data=list(queries), limit=k, output_fields=["id"], anns_field="vector",
                search_params={"metric_type": "IP", "params": {"ef": ef}},
                consistency_level=self.params["consistency"], **restrict,
            )

        found = self._retrying(key, client, "search", run)
        if found is None:
            return None
        return [
            (np.fromiter((hit["id"] for hit in hits), dtype=np.int64, count=len(hits)),
             np.fromiter((hit["distance"] for hit in hits), dtype=np.float32, count=len(hits)))
            for hits in found
        ]

    def search(self, queries, k: int, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = as_vectors(queries, self.dim, allow_single=True)
        k = as_k(k)
        subset = as_subset(subset)
        out_ids, out_scores = empty_results(len(queries), k)
        subset_ids = subset.require_ids(self.backend) if subset is not None else None
        if not len(queries) or (subset_ids is not None and not len(subset_ids)):
            return out_ids, out_scores
        if k > MAX_TOPK:
            raise VectorIndexError(f"milvus returns at most {MAX_TOPK} rows per query, asked for k={k}")
        key, client = self._client()
        if not self._exists(key, client):
            return out_ids, out_scores
        restrict = self._filter(key, client, subset_ids) if subset_ids is not None else {}
        ef = max(int(self.params["ef"]), k)
        found = self._search(key, client, queries, k, ef, restrict) or []
        for row, (ids, scores) in enumerate(found):
            out_ids[row, : len(ids)], out_scores[row, : len(ids)] = ids, scores
        if subset_ids is not None:
            self._complete_short(key, client, queries, k, ef, subset_ids, restrict, out_ids, out_scores)
        return out_ids, out_scores

    def _complete_short(self, key, client, queries, k, ef, subset_ids, restrict, out_ids, out_scores) -> None:
        """Queries of a filtered search that came back with fewer than ``k`` rows: exactly
        over a small subset, else again with a wider candidate list (module docstring)."""
        short = self._short_rows(out_ids, k, subset_ids)
        if not len(short):
            return
        if len(subset_ids) <= self.params["exact_subset_max"]:
            ids, vectors = self._subset_vectors(key, client, subset_ids, restrict)
            if not len(ids):
                return
            scores = queries[short] @ vectors.T
            take = min(k, len(ids))
            order = np.argsort(-scores, axis=1, kind="stable")[:, :take]
            out_ids[short, :take] = ids[order]
            out_scores[short, :take] = np.take_along_axis(scores, order, axis=1)
            return
        while len(short) and ef < MAX_EF:
            ef = min(ef * 4, MAX_EF)
            found = self._search(key, client, queries[short], k, ef, restrict) or []
            for row, (ids, scores) in zip(short, found):
                out_ids[row, : len(ids)], out_scores[row, : len(ids)] = ids, scores
            short = self._short_rows(out_ids, k, subset_ids)

    @staticmethod
    def _short_rows(out_ids: np.ndarray, k: int, subset_ids: np.ndarray) -> np.ndarray:
        """Queries with fewer rows than the subset could give (ids it names that are not
        stored count as rows here: only a read can tell)."""
        return np.flatnonzero((out_ids >= 0).sum(axis=1) < min(k, len(subset_ids)))

    def _subset_vectors(self, key, client, subset_ids, restrict) -> tuple[np.ndarray, np.ndarray]:
        """The stored rows of a subset: ids and float32 vectors, read through its filter."""
        def fetch():
            return client.query(self.collection, output_fields=["id", "vector"],
                                consistency_level=self.params["consistency"], limit=len(subset_ids), **restrict)

        rows = self._retrying(key, client, "query", fetch) or []
        if not rows:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dim), dtype=np.float32)
        ids = np.fromiter((row["id"] for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.asarray([row["vector"] for row in rows], dtype=np.float32).reshape(len(rows), self.dim)
        return ids, vectors

    # -- persistence -------------------------------------------------------------------

    def _manifest(self) -> dict:
        return {"collection": self.collection, "dim": self.dim}

    def _storage_exists(self) -> bool:
        key, client = self._client()
        return self._exists(key, client)

    def __repr__(self) -> str:
        return f"<MilvusIndex collection={self.collection!r} dim={self.dim}>"
