"""Vectors in PostgreSQL: a pgvector table with an HNSW index.

The rows live in the project's own database, in a table of their own::

    CREATE TABLE <table> (id bigint PRIMARY KEY, embedding vector(<dim>) NOT NULL);
    CREATE INDEX <table>_hnsw ON <table> USING hnsw (embedding vector_ip_ops)
        WITH (m = 16, ef_construction = 64);

so they can be written in the same transaction as the rows they belong to,
backed up with the database, and read by every web process without copying
files around. A search is one SQL statement per query::

    SET hnsw.ef_search = 40;
    SELECT id, embedding <#> $1 FROM <table> ORDER BY embedding <#> $1 LIMIT k;

(``<#>`` is the negative inner product; scores are returned as the inner
product, or ``1 - cosine distance`` with ``distance="cosine"``).

**Filtered searches.** A ``Subset``'s condition goes into the WHERE of that
same statement: its ``sql`` as written (placeholders ``%s``, values in
``sql_params``), or ``id = ANY(%s)`` with its ids. PostgreSQL then picks the
plan: for a selective condition usually the matching rows and an exact sort,
otherwise the HNSW scan with the condition as a filter. That scan runs as an
iterative scan in relaxed order (pgvector >= 0.8: the graph is walked further
until ``k`` rows pass the filter, or ``hnsw.max_scan_tuples`` rows were seen),
in a transaction (or savepoint) of its own so the setting goes with it. As
relaxed order lets a better row come a little after worse ones, the statement
asks for ``RELAXED_FETCH_FACTOR × k`` rows, re-sorted by score here, and the
best ``k`` are kept. A query that still gets fewer than ``k`` rows is asked again
with an exact ordering over the matching rows, so every matching row can be
found. Before pgvector 0.8 every filtered search orders exactly.

**Files.** A pgvector index is not one file per version: ``save`` writes a
small manifest in the common file format (header + JSON naming the table),
and ``load`` reopens the table it names. Every version of an index therefore
shows the live rows of the table (``snapshot_files = False``): a removal is
visible to every loaded version at once, and an older manifest is no way back
to older rows.

**Connections.** Every operation borrows a psycopg 3 connection, found in
this order:

1. the callable given to ``set_connection_provider``, called with the index's
   ``alias`` parameter (default ``"default"``); it returns a connection, which is
   never closed here. The portal gives its database connection of that alias
   (``search.index_sync.database_connection``), so operations join the caller's
   transaction: inside ``transaction.atomic()`` an ``add`` commits or rolls back
   with the rest of the block. Each operation runs in a savepoint (or its own
   transaction in autocommit mode);
2. ``$VECTOR_INDEX_PG_DSN``: one autocommit connection per thread.

The ``vector`` extension is created when missing (``CREATE EXTENSION IF NOT
EXISTS vector`` needs a role allowed to create it; the pgvector/pgvector
image and the embedded PostgreSQL both ship it).

**Bulk loads.** Adding at least ``bulk_build_min`` rows to an empty table
drops the HNSW index, copies the rows in (binary ``COPY``) and builds the
index once at the end, with ``maintenance_work_mem`` and
``max_parallel_maintenance_workers`` raised for that transaction: much
faster than growing the graph row by row. Smaller batches are upserted
(``COPY`` into a temporary table, then ``INSERT ... ON CONFLICT``).

Parameters: ``table`` (default: a new random name; pass one, or use
``params_for_scope``), ``schema`` (default: the search path), ``m`` (16),
``ef_construction`` (64), ``ef_search`` (40, search parameter),
``distance`` ("ip" or "cosine"), ``bulk_build_min`` (10000),
``maintenance_work_mem`` ("1GB"), ``build_workers`` (2), ``alias``
("default").
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import struct
import threading
import weakref
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

__all__ = ["PgVectorIndex", "DSN_ENV_VAR", "set_connection_provider"]

DSN_ENV_VAR = "VECTOR_INDEX_PG_DSN"
DEFAULTS = {
    "table": None,
    "schema": None,
    "m": 16,
    "ef_construction": 64,
    "ef_search": 40,
    "distance": "ip",
    "bulk_build_min": 10_000,
    "maintenance_work_mem": "1GB",
    "build_workers": 2,
    "alias": "default",
}
DISTANCES = {
    # operator class, operator, score from the operator's result
    "ip": ("vector_ip_ops", "<#>", lambda d: -d),
    "cosine": ("vector_cosine_ops", "<=>", lambda d: 1.0 - d),
}
MAX_EF_SEARCH = 1000  # pgvector's limit; larger k falls back to an exact scan
# A filtered search over the graph asks for this many times k rows and keeps the best k:
# relaxed order lets better rows come a little after worse ones (at 200k rows and 10 %
# kept, recall@10 0.88 with k rows, 0.96 with 4 k).
RELAXED_FETCH_FACTOR = 4
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,54}$")
_MEMORY = re.compile(r"^\d+\s*(kB|MB|GB|TB)$")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_COPY_CHUNK = 20_000

_provider: Callable | None = None
_own = threading.local()


def set_connection_provider(provider: Callable | None) -> None:
    """Use ``provider(alias)`` (a psycopg 3 connection, borrowed) for every
    pgvector index in this process; ``None`` leaves ``$VECTOR_INDEX_PG_DSN``."""
    global _provider
    _provider = provider



def _get_connection(alias: str):
    if _provider is not None:
        return _provider(alias)
    dsn = os.environ.get(DSN_ENV_VAR)
    if dsn:
        conn = getattr(_own, "conn", None)
        if conn is None or conn.closed or getattr(_own, "dsn", None) != dsn:
            import psycopg

            conn = psycopg.connect(dsn, autocommit=True)
            _own.conn, _own.dsn = conn, dsn
        return conn
    raise VectorIndexError(
        f"the pgvector backend has no database connection: set ${DSN_ENV_VAR} or call set_connection_provider()"
    )


_registered: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # connection -> vector type oid
_session_ef: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # ef_search set per session
_iterative: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # iterative scans available


def _has_iterative_scan(conn) -> bool:
    """Whether the server's pgvector (0.8 and later) walks the graph further for filters."""
    found = _iterative.get(conn)
    if found is None:
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        version = tuple(int(part) for part in re.findall(r"\d+", row[0])[:2]) if row else (0, 0)
        found = _iterative[conn] = version >= (0, 8)
    return found


def _register_types(conn) -> None:
    """Teach the connection the ``vector`` type (again if the extension was
    re-created meanwhile, e.g. in a rolled-back test transaction)."""
    oid = conn.execute("SELECT to_regtype('vector')::oid").fetchone()[0]
    if oid is None or _registered.get(conn) == oid:
        return
    from pgvector.psycopg import register_vector

    register_vector(conn)
    _registered[conn] = oid


@contextlib.contextmanager
def _atomic(conn):
    """A transaction of our own in autocommit mode, else a savepoint inside
    the caller's transaction (never a commit of the caller's work)."""
    from psycopg.pq import TransactionStatus

    if not conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        conn.execute("SELECT 1")  # opens the caller's transaction; ours nests in it
    with conn.transaction():
        yield


def _in_transaction(conn) -> bool:
    from psycopg.pq import TransactionStatus

    return conn.info.transaction_status != TransactionStatus.IDLE


def _copy_payload(ids: np.ndarray, vectors: np.ndarray):
    """Rows as PostgreSQL binary COPY data (id int8, embedding vector), in chunks."""
    dim = vectors.shape[1]
    row = np.dtype(
        [("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("vec_len", ">i4"),
         ("dim", ">u2"), ("unused", ">u2"), ("vec", ">f4", (dim,))]
    )
    for start in range(0, len(ids), _COPY_CHUNK):
        stop = min(start + _COPY_CHUNK, len(ids))
        rows = np.empty(stop - start, dtype=row)
        rows["fields"] = 2
        rows["id_len"] = 8
        rows["id"] = ids[start:stop]
        rows["vec_len"] = 4 + 4 * dim
        rows["dim"] = dim
        rows["unused"] = 0
        rows["vec"] = vectors[start:stop]
        yield rows.tobytes()


def _scope_table(scope: str) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", str(scope).lower()).strip("_")
    return f"vecidx_{name}"[:55] if name else f"vecidx_{secrets.token_hex(8)}"


class PgVectorIndex(StorageBackedIndex):
    """Rows in a PostgreSQL table, searched through a pgvector HNSW index."""

    backend = "pgvector"
    exact = False
    storage_noun = "table"
    sql_subsets = True
    search_param_names = frozenset({"ef_search"})

    def __init__(self, dim: int, **params):
        super().__init__(dim, **params)
        merged = {**DEFAULTS, **self.params}
        if merged["table"] is None:
            merged["table"] = f"vecidx_{secrets.token_hex(8)}"
        self._check_params(merged)
        self.params = merged
        if self.dim > 2000:
            raise VectorIndexError("pgvector's HNSW index takes at most 2000 dimensions")
        self._ready = weakref.WeakSet()  # connections on which the table is known to exist

    def _check_params(self, params: dict) -> None:
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise VectorIndexError(
                f"unknown {self.backend!r} parameters {unknown}; known: {sorted(DEFAULTS)}"
            )
        for name in ("table", "schema"):
            value = params[name]
            if value is not None and not (isinstance(value, str) and _IDENT.match(value)):
                raise VectorIndexError(f"{name} must be a plain SQL identifier, got {value!r}")
        for name, low, high in (
            ("m", 2, 100),
            ("ef_construction", 4, 1000),
            ("ef_search", 1, MAX_EF_SEARCH),
            ("bulk_build_min", 1, 1 << 40),
            ("build_workers", 0, 64),
        ):
            value = params[name]
            if not _is_int(value) or not low <= value <= high:
                raise VectorIndexError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if params["distance"] not in DISTANCES:
            raise VectorIndexError(f"distance must be one of {sorted(DISTANCES)}, got {params['distance']!r}")
        if not (isinstance(params["maintenance_work_mem"], str) and _MEMORY.match(params["maintenance_work_mem"])):
            raise VectorIndexError(
                f"maintenance_work_mem must look like '512MB' or '2GB', got {params['maintenance_work_mem']!r}"
            )
        if not isinstance(params["alias"], str) or not params["alias"]:
            raise VectorIndexError(f"alias must be a database alias, got {params['alias']!r}")

    @classmethod
    def params_for_scope(cls, params: dict | None, scope: str) -> dict:
        params = dict(params or {})
        if not params.get("table"):
            params["table"] = _scope_table(scope)
        return params

    # -- SQL helpers ---------------------------------------------------------------

    def _sql_names(self):
        from psycopg import sql

        table = self.params["table"]
        schema = self.params["schema"]
        qualified = sql.Identifier(schema, table) if schema else sql.Identifier(table)
        regclass = f'"{schema}"."{table}"' if schema else f'"{table}"'
        return qualified, sql.Identifier(f"{table}_hnsw"), regclass

    def _connection(self):
        conn = _get_connection(self.params["alias"])
        if conn.closed:
            raise VectorIndexError("the pgvector backend was given a closed connection")
        return conn

    def _exists(self, conn) -> bool:
        if conn in self._ready:
            return True
        _, _, regclass = self._sql_names()
        found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [regclass]).fetchone()[0]
        if found:
            self._check_dimension(conn)
            _register_types(conn)
            self._ready.add(conn)
        return bool(found)

    def _check_dimension(self, conn) -> None:
        _, _, regclass = self._sql_names()
        row = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = 'embedding'",
            [regclass],
        ).fetchone()
        if row is None or row[0] != f"vector({self.dim})":
            found = row[0] if row else "no embedding column"
            raise VectorIndexError(
                f"table {self.params['table']!r} holds {found}, not vector({self.dim})"
            )

    def _create_index_sql(self):
        from psycopg import sql

        table, index, _ = self._sql_names()
        opclass = DISTANCES[self.params["distance"]][0]
        return sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding {}) "
            "WITH (m = {}, ef_construction = {})"
        ).format(
            index, table, sql.SQL(opclass),
            sql.Literal(int(self.params["m"])), sql.Literal(int(self.params["ef_construction"])),
        )

    def _ensure(self, conn) -> None:
        """Create the extension, table and index when missing (in a transaction)."""
        if self._exists(conn):
            return
        from psycopg import sql

        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        table, _, _ = self._sql_names()
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (id bigint PRIMARY KEY, embedding vector({}) NOT NULL)").format(
                table, sql.Literal(self.dim)
            )
        )
        conn.execute(self._create_index_sql())
        self._check_dimension(conn)
        _register_types(conn)
        self._ready.add(conn)

    def _copy_into(self, conn, target, ids, vectors) -> None:
        from psycopg import sql

        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} (id, embedding) FROM STDIN (FORMAT BINARY)").format(target)) as copy:
                copy.write(_COPY_HEADER)
                for chunk in _copy_payload(ids, vectors):
                    copy.write(chunk)
                copy.write(_COPY_TRAILER)

    def _set_local(self, conn, name: str, value) -> None:
        conn.execute("SELECT set_config(%s, %s, true)", [name, str(value)])

    # -- data ------------------------------------------------------------------------

    def add(self, ids, vectors) -> None:
        ids, vectors = upsert_batch(ids, vectors, self.dim)
        if len(ids) == 0:
            return
        conn = self._connection()
        try:
            self._add(conn, ids, vectors)
        except BaseException:
            self._ready.discard(conn)  # a rolled-back savepoint may have taken the table along
            raise

    def _add(self, conn, ids: np.ndarray, vectors: np.ndarray) -> None:
        from psycopg import sql

        table, index, _ = self._sql_names()
        with _atomic(conn):
            self._ensure(conn)
            empty = conn.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(table)).fetchone()[0]
            if empty and len(ids) >= self.params["bulk_build_min"]:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(
                    sql.Identifier(self.params["schema"], f"{self.params['table']}_hnsw")
                    if self.params["schema"] else index
                ))
                self._copy_into(conn, table, ids, vectors)
                self._set_local(conn, "maintenance_work_mem", self.params["maintenance_work_mem"])
                self._set_local(conn, "max_parallel_maintenance_workers", self.params["build_workers"])
                conn.execute(self._create_index_sql())
                return
            stage = sql.Identifier(f"vecidx_stage_{self.dim}")
            conn.execute(
                sql.SQL(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS {} (id bigint, embedding vector({})) "
                    "ON COMMIT DELETE ROWS"
                ).format(stage, sql.Literal(self.dim))
            )
            conn.execute(sql.SQL("TRUNCATE {}").format(stage))
            self._copy_into(conn, stage, ids, vectors)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, embedding) SELECT id, embedding FROM {} "
                    "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding"
                ).format(table, stage)
            )
            conn.execute(sql.SQL("TRUNCATE {}").format(stage))

    def remove(self, ids) -> int:
        ids = np.unique(as_ids(ids))
        if not len(ids):
            return 0
        from psycopg import sql

        conn = self._connection()
        table, _, _ = self._sql_names()
        with _atomic(conn):
            if not self._exists(conn):
                return 0
            cur = conn.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(table), [ids.tolist()])
            return int(cur.rowcount)

    def drop(self) -> None:
        """Drop the table (and its index); the index is empty afterwards."""
        from psycopg import sql

        conn = self._connection()
        table, _, _ = self._sql_names()
        with _atomic(conn):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        self._ready = weakref.WeakSet()

    # -- search ----------------------------------------------------------------------

    def _set_search_settings(self, conn, ef: int) -> None:
        """``hnsw.ef_search`` and an iterative scan: rows that are deleted but not
        yet vacuumed still occupy the candidate list, and the scan goes on
        until ``k`` live rows are found (pgvector >= 0.8)."""
        statement = (
            "SELECT set_config('hnsw.ef_search', %s, {local}), "
            "set_config('hnsw.iterative_scan', 'strict_order', {local})"
        )
        if _in_transaction(conn):  # local to the transaction: undone with it
            conn.execute(statement.format(local="true"), [str(ef)])
        elif _session_ef.get(conn) != ef:
            conn.execute(statement.format(local="false"), [str(ef)])
            _session_ef[conn] = ef

    def search(self, queries, k: int, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = as_vectors(queries, self.dim, allow_single=True)
        k = as_k(k)
        subset = as_subset(subset)
        out_ids, out_scores = empty_results(len(queries), k)
        if not len(queries) or (subset is not None and subset.sql is None and not len(subset.ids)):
            return out_ids, out_scores
        from psycopg import sql

        conn = self._connection()
        if not self._exists(conn):
            return out_ids, out_scores
        if subset is not None:
            self._search_subset(conn, queries, k, subset, out_ids, out_scores)
            return out_ids, out_scores
        table, _, _ = self._sql_names()
        operator = DISTANCES[self.params["distance"]][1]
        if k <= MAX_EF_SEARCH:
            self._set_search_settings(conn, max(int(self.params["ef_search"]), k))
            order = sql.SQL("embedding {} %(q)s").format(sql.SQL(operator))
        else:  # beyond what one HNSW scan returns: an exact scan (the "+ 0" hides the index)
            order = sql.SQL("(embedding {} %(q)s) + 0").format(sql.SQL(operator))
        query = sql.SQL("SELECT id, embedding {} %(q)s FROM {} ORDER BY {} LIMIT %(k)s").format(
            sql.SQL(operator), table, order
        )
        self._fetch(conn, query, queries, lambda vector: {"q": vector, "k": k}, out_ids, out_scores)
        return out_ids, out_scores

    def _fetch(self, conn, query, queries, params, out_ids, out_scores, rows=None, resort=False) -> np.ndarray:
        """Run ``query`` for each of ``queries`` (those numbered ``rows``; all by
        default) with ``params(vector)``, writing what it finds into the outputs;
        returns how many rows each query found."""
        import psycopg
        from pgvector import Vector  # adapted by its class (numpy arrays are by name, once)

        to_score = DISTANCES[self.params["distance"]][2]
        rows = range(len(queries)) if rows is None else rows
        counts = np.zeros(len(queries), dtype=np.int64)
        # A server-side binding cursor whatever the connection's default (Django
        # binds on the client side): the query vector travels in binary.
        with psycopg.Cursor(conn) as cur:
            for row in rows:
                cur.execute(query, params(Vector(queries[row])))
                found = cur.fetchall()
                if found:
                    ids, dist = (np.asarray(column) for column in zip(*found))
                    if resort:
                        order = np.argsort(dist, kind="stable")[: out_ids.shape[1]]
                        ids, dist = ids[order], dist[order]
                    out_ids[row, : len(ids)] = ids
                    out_scores[row, : len(ids)] = to_score(dist.astype(np.float64))
                    counts[row] = len(ids)
        return counts

    def _search_subset(self, conn, queries, k: int, subset: Subset, out_ids, out_scores) -> None:
        """The subset's condition in the WHERE of the ordering statement (see the module docstring)."""
        from psycopg import sql

        table, _, _ = self._sql_names()
        operator = sql.SQL(DISTANCES[self.params["distance"]][1])
        if subset.sql is not None:
            condition, values = sql.SQL(subset.sql), list(subset.sql_params)
        else:
            condition, values = sql.SQL("id = ANY(%s)"), [subset.ids.tolist()]

        def statement(exact: bool):
            order = sql.SQL("(embedding {} %s) + 0" if exact else "embedding {} %s").format(operator)
            return sql.SQL("SELECT id, embedding {} %s FROM {} WHERE ({}) ORDER BY {} LIMIT %s").format(
                operator, table, condition, order
            )

        def params(vector, limit=k):
            return [vector, *values, vector, limit]

        exact = k > MAX_EF_SEARCH or not _has_iterative_scan(conn)
        with _atomic(conn):
            if exact:
                self._fetch(conn, statement(True), queries, params, out_ids, out_scores)
                return
            self._set_local(conn, "hnsw.ef_search", max(int(self.params["ef_search"]), k))
            self._set_local(conn, "hnsw.iterative_scan", "relaxed_order")
            found = self._fetch(conn, statement(False), queries, lambda v: params(v, RELAXED_FETCH_FACTOR * k),
                                out_ids, out_scores, resort=True)
            short = np.flatnonzero(found < k)
            if len(short):  # the scan gave up before k rows passed the filter
                self._fetch(conn, statement(True), queries, params, out_ids, out_scores, rows=short)

    def count(self) -> int:
        from psycopg import sql

        conn = self._connection()
        if not self._exists(conn):
            return 0
        table, _, _ = self._sql_names()
        return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0])

    def ids(self) -> np.ndarray:
        from psycopg import sql

        conn = self._connection()
        if not self._exists(conn):
            return np.empty(0, dtype=np.int64)
        table, _, _ = self._sql_names()
        data = bytearray()
        with conn.cursor() as cur:
            with cur.copy(
                sql.SQL("COPY (SELECT id FROM {} ORDER BY id) TO STDOUT (FORMAT BINARY)").format(table)
            ) as copy:
                for block in copy:
                    data += block
        body = memoryview(data)[len(_COPY_HEADER) : len(data) - len(_COPY_TRAILER)]
        rows = np.frombuffer(body, dtype=[("fields", ">i2"), ("len", ">i4"), ("id", ">i8")])
        return rows["id"].astype(np.int64)

    # -- persistence -------------------------------------------------------------------

    def _manifest(self) -> dict:
        return {"schema": self.params["schema"], "table": self.params["table"], "dim": self.dim}

    def _storage_exists(self) -> bool:
        return self._exists(self._connection())

