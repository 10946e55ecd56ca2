"""The vector index contract, its typed errors, and the file format shared by
every backend.

A saved index is ONE file::

    MAGIC (8 bytes) | header length (uint32, little endian) | JSON header | payload

The JSON header names the backend, the dimension, the backend parameters and
the number of stored vectors, so an index can be reopened without being told
which backend wrote it (see ``registry.load_index``). The payload is whatever
the backend produces in ``_serialize_payload``.

Files are written atomically (temp file in the same directory, fsync,
``os.replace``, fsync of the directory) and identified by the sha256 of their
bytes, which ``save`` returns and ``load`` can verify.

This module imports no Django and no vector library; backends import theirs.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import hmac
import json
import mmap
import os
import secrets
import struct
from typing import Any, BinaryIO, Callable, ClassVar

import numpy as np

__all__ = [
    "ChecksumMismatch",
    "StorageBackedIndex",
    "FILE_FORMAT_VERSION",
    "MAGIC",
    "Subset",
    "VectorIndex",
    "VectorIndexError",
    "atomic_write",
    "read_index_file",
    "sha256_file",
]

MAGIC = b"VECINDEX"
FILE_FORMAT_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_MAX_HEADER_BYTES = 1 << 20


class VectorIndexError(Exception):
    """Bad input to an index, or an index file that cannot be read."""


class ChecksumMismatch(VectorIndexError):
    """An index file's sha256 differs from the expected one."""


# --------------------------------------------------------------------------
# Files: atomic write and sha256
# --------------------------------------------------------------------------


class _HashingWriter:
    """File-like wrapper that feeds every written byte into a sha256."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._hash = hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data)
        if view.nbytes == 0:
            return 0
        view = view.cast("B")
        self._hash.update(view)
        self._raw.write(view)
        return view.nbytes

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable. Best effort: some platforms and
    # filesystems cannot open or fsync a directory, and by now the new file is
    # already in place, so a failure here must not report the save as failed.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> str:
    """Write a file atomically and return the sha256 hex of its contents.

    ``write`` receives a binary file-like object (only ``write`` is
    available). The bytes go to a temp file in the destination directory,
    which is flushed, fsynced and then renamed onto ``path``; the directory is
    fsynced afterwards. If anything fails, the temp file is removed, the
    exception propagates, and any existing file at ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(
        directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp"
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp_path, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _HashingWriter(raw)
            write(writer)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)
    return writer.hexdigest()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _encode_header(header: dict) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + _HEADER_LEN.pack(len(body)) + body


def read_index_file(
    path: str | os.PathLike, checksum: str | None = None
) -> tuple[dict, memoryview]:
    """Read an index file; return its header and a view of its payload.

    Verifies the sha256 when ``checksum`` is given (``ChecksumMismatch``) and
    raises ``VectorIndexError`` for missing, unreadable or malformed files.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            # Mapped, not read: a multi-gigabyte index is then held once (by the
            # backend that decodes it), not twice; the mapping goes with the view.
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as exc:
        raise VectorIndexError(f"cannot read index file {os.fspath(path)!r}: {exc}") from exc

    if checksum is not None:
        actual = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(actual, str(checksum).strip().lower()):
            raise ChecksumMismatch(
                f"index file {os.fspath(path)!r} has sha256 {actual}, expected {checksum}"
            )

    prefix = len(MAGIC) + _HEADER_LEN.size
    if len(data) < prefix or data[: len(MAGIC)] != MAGIC:
        raise VectorIndexError(f"{os.fspath(path)!r} is not a vector index file")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    if header_len > _MAX_HEADER_BYTES or prefix + header_len > len(data):
        raise VectorIndexError(f"index file {os.fspath(path)!r} has a corrupt header")
    try:
        header = json.loads(data[prefix : prefix + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VectorIndexError(f"index file {os.fspath(path)!r} has a corrupt header") from exc

    if (
        not isinstance(header, dict)
        or header.get("format") != FILE_FORMAT_VERSION
        or not isinstance(header.get("backend"), str)
        or not _is_int(header.get("dim"))
        or not isinstance(header.get("params"), dict)
        or not _is_int(header.get("count"))
    ):
        raise VectorIndexError(
            f"index file {os.fspath(path)!r} has an unsupported or incomplete header"
        )
    return header, memoryview(data)[prefix + header_len :]


# --------------------------------------------------------------------------
# Input validation shared by backends
# --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_ids(ids: Any) -> np.ndarray:
    """Coerce ids to a contiguous 1-D int64 array of non-negative values.

    -1 is the "no result" marker in search output, so negative ids are refused.
    """
    try:
        arr = np.asarray(ids)
    except Exception as exc:  # ragged lists and the like
        raise VectorIndexError(f"ids are not an array: {exc}") from exc
    if arr.ndim != 1:
        raise VectorIndexError(f"ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise VectorIndexError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise VectorIndexError("ids must fit in int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.min() < 0:
        raise VectorIndexError("ids must be non-negative")
    return arr


def as_vectors(vectors: Any, dim: int, *, allow_single: bool = False) -> np.ndarray:
    """Coerce vectors to a contiguous finite float32 array of shape (N, dim).

    With ``allow_single`` a 1-D vector of length ``dim`` becomes (1, dim).
    """
    try:
        arr = np.asarray(vectors)
    except Exception as exc:
        raise VectorIndexError(f"vectors are not an array: {exc}") from exc
    if arr.dtype.kind not in "fiu":
        raise VectorIndexError(f"vectors must be real numbers, got dtype {arr.dtype}")
    if allow_single and arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise VectorIndexError(f"vectors must have shape (N, {dim}), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise VectorIndexError("vectors contain NaN or infinite values")
    return arr


def upsert_batch(ids: Any, vectors: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated ids and vectors for an add; an id repeated in the batch keeps its last vector."""
    ids = as_ids(ids)
    vectors = as_vectors(vectors, dim)
    if len(ids) != len(vectors):
        raise VectorIndexError(f"got {len(ids)} ids for {len(vectors)} vectors")
    if len(np.unique(ids)) != len(ids):
        reversed_first = np.unique(ids[::-1], return_index=True)[1]
        keep = np.sort(len(ids) - 1 - reversed_first)
        ids, vectors = np.ascontiguousarray(ids[keep]), np.ascontiguousarray(vectors[keep])
    return ids, vectors


def as_k(k: Any) -> int:
    if not _is_int(k) or k < 1:
        raise VectorIndexError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def empty_results(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search output with every slot empty: id -1, score -inf."""
    return (
        np.full((n_queries, k), -1, dtype=np.int64),
        np.full((n_queries, k), -np.inf, dtype=np.float32),
    )


def in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask of ``ids`` present in the sorted array ``sorted_ids``."""
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    pos = np.searchsorted(sorted_ids, ids)
    pos[pos == len(sorted_ids)] = 0
    return sorted_ids[pos] == ids


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------


class Subset:
    """The rows a search may return: a filter applied inside the vector search,
    so a subset keeping one row in a thousand still yields ``k`` hits.

    ``Subset(ids)``: any int array-like of ids, kept as ``.ids``, a sorted,
    unique, contiguous int64 array (ids not in the index are simply never
    found). ``Subset(sql=..., sql_params=...)``: an SQL boolean condition over
    the row id column ``id`` (``"id IN (SELECT id FROM tags WHERE tag = %s)"``),
    for backends whose rows live in a table (pgvector), which then filter in
    the same statement as the vector ordering; ``.ids`` is None. Both may be
    given: table-backed backends use ``sql``, the others ``ids``. The SQL text is
    put into the statement as written, so it must come from code, never from a
    request; values go into ``sql_params``.
    """

    __slots__ = ("ids", "sql", "sql_params")

    def __init__(self, ids: Any = None, *, sql: str | None = None, sql_params: Any = ()):
        if ids is None and sql is None:
            raise VectorIndexError("a Subset needs ids, an SQL condition, or both")
        if sql is not None and not (isinstance(sql, str) and sql.strip()):
            raise VectorIndexError(f"a Subset's sql must be a non-empty string, got {sql!r}")
        self.ids: np.ndarray | None = None if ids is None else _sorted_unique(as_ids(ids))
        self.sql: str | None = sql
        self.sql_params: tuple = tuple(sql_params)

    def __bool__(self) -> bool:
        # A filter keeping nothing is still a filter: ``if subset:`` must not read an
        # empty subset as no subset (which would return every row).
        return True

    def __len__(self) -> int:
        if self.ids is None:
            raise TypeError("a Subset given only as SQL has no size known in Python")
        return len(self.ids)

    def __repr__(self) -> str:
        parts = [] if self.ids is None else [f"{len(self.ids)} ids"]
        if self.sql is not None:
            parts.append(f"sql={self.sql!r}")
        return f"<Subset {', '.join(parts)}>"

    def require_ids(self, backend: str) -> np.ndarray:
        """``.ids``, or VectorIndexError for a backend that cannot run SQL."""
        if self.ids is None:
            raise VectorIndexError(
                f"the {backend!r} backend filters by ids: give the Subset ids, not only an SQL condition"
            )
        return self.ids


def _sorted_unique(ids: np.ndarray) -> np.ndarray:
    # Filters usually arrive sorted already (from a sorted column): checking is
    # far cheaper than sorting a million ids again.
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids
    return np.unique(ids)


def as_subset(subset: Any) -> Subset | None:
    if subset is None or isinstance(subset, Subset):
        return subset
    raise VectorIndexError(f"subset must be a Subset or None, got {type(subset).__name__}")


# --------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------


class VectorIndex(abc.ABC):
    """A set of (int64 id, float32 vector) rows searchable by similarity.

    Backends implement ``add``, ``remove``, ``search``, ``count``, ``ids`` and
    the two payload hooks; saving, loading, checksums and the file header
    live here. Searches may run concurrently with each other; mutations must
    not run concurrently with anything else on the same instance.
    """

    backend: ClassVar[str]
    #: True when ``save`` writes the whole state, so a saved version never
    #: changes afterwards. False for backends whose file only names storage
    #: that lives elsewhere (``pgvector``: a table in PostgreSQL); loading such
    #: a file gives the live rows, not the rows at saving time.
    snapshot_files: ClassVar[bool] = True
    #: False for approximate backends (HNSW graphs, IVF-PQ, pgvector HNSW):
    #: their results may miss some of the exact top-k, and scores may be
    #: approximations of the inner product.
    exact: ClassVar[bool] = True
    #: True for backends that run a ``Subset``'s SQL condition in the same
    #: statement as the vector ordering (``pgvector``); callers that can say
    #: a filter either way give these the SQL and the others the ids.
    sql_subsets: ClassVar[bool] = False
    #: Names of the parameters that only affect searching and may be changed
    #: on a built index with ``set_search_params``.
    search_param_names: ClassVar[frozenset] = frozenset()

    def __init__(self, dim: int, **params: Any):
        if not _is_int(dim) or dim < 1:
            raise VectorIndexError(f"dim must be a positive integer, got {dim!r}")
        try:
            json.dumps(params, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise VectorIndexError(f"index parameters must be JSON-serialisable: {exc}") from exc
        self.dim: int = int(dim)
        self.params: dict = dict(params)

    # -- data ---------------------------------------------------------------

    @abc.abstractmethod
    def add(self, ids, vectors) -> None:
        """Insert or replace rows: ids int64 (N,), vectors float32 (N, dim)."""

    @abc.abstractmethod
    def remove(self, ids) -> int:
        """Remove rows by id; unknown ids are ignored. Returns how many went."""

    @abc.abstractmethod
    def search(self, queries, k: int, subset: Subset | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for each query, best first.

        Returns (ids int64 (Q, k), scores float32 (Q, k)); slots beyond the
        number of stored rows hold id -1 and score -inf. A 1-D query is
        treated as (1, dim).

        With ``subset`` only its rows are candidates, and the filter is applied
        inside the search, not to a short list afterwards: as long as ``k`` of
        its rows are stored, ``k`` come back, however few rows it keeps. An
        empty subset gives empty results. Backends that cannot run SQL raise
        VectorIndexError for a subset without ids.
        """

    @abc.abstractmethod
    def count(self) -> int:
        """Number of stored rows."""

    @abc.abstractmethod
    def ids(self) -> np.ndarray:
        """All stored ids, int64, sorted ascending."""

    def __len__(self) -> int:
        return self.count()

    # -- optional hooks -------------------------------------------------------

    @property
    def is_trained(self) -> bool:
        """False while a backend that needs training (IVF-PQ) has not been
        trained yet. Untrained indexes still accept rows and answer searches."""
        return True

    def train(self, vectors) -> None:
        """Fit whatever the backend learns from data (coarse centroids, product
        quantizer codebooks) on ``vectors`` (N, dim). A no-op for backends
        that need no training."""
        as_vectors(vectors, self.dim)

    def set_search_params(self, **params: Any) -> None:
        """Change search-time parameters (``ef_search``, ``nprobe``...) of this
        instance; they are stored in ``params`` and saved with the index."""
        unknown = sorted(set(params) - set(self.search_param_names))
        if unknown:
            known = ", ".join(sorted(self.search_param_names)) or "none"
            raise VectorIndexError(
                f"{unknown} are not search parameters of the {self.backend!r} backend "
                f"(search parameters: {known})"
            )
        merged = {**self.params, **params}
        self._check_params(merged)
        self.params = merged

    def _check_params(self, params: dict) -> None:
        """Raise VectorIndexError if ``params`` are not valid for this backend."""

    @classmethod
    def params_for_scope(cls, params: dict | None, scope: str) -> dict:
        """Parameters for the index of one scope (e.g. ``"m3_image"``: model 3,
        image modality) from deployment-wide ``params``.

        File-based backends use ``params`` unchanged. Backends that keep their
        rows in shared storage derive a storage name from ``scope`` (pgvector:
        one table per scope) unless ``params`` name one.
        """
        return dict(params or {})

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} backend={self.backend!r} "
            f"dim={self.dim} count={self.count()}>"
        )

    # -- persistence hooks for backends ---------------------------------------

    @abc.abstractmethod
    def _serialize_payload(self):
        """The backend's state as the file payload: a bytes-like object, or a
        list of parts written one after another, each bytes-like or a callable
        ``part(fh)`` that writes itself (large indexes stream into the file
        instead of being copied into memory first)."""

    @classmethod
    @abc.abstractmethod
    def _deserialize_payload(
        cls, payload: memoryview, *, dim: int, params: dict, count: int
    ) -> "VectorIndex":
        """Rebuild an index from a payload; raise VectorIndexError if corrupt."""

    # -- persistence ----------------------------------------------------------

    def save(self, path: str | os.PathLike) -> str:
        """Write the index to ``path`` atomically; return the file's sha256 hex.

        Write failures propagate as raised (an ``OSError`` for a full disk,
        for instance); an existing file at ``path`` is then left untouched.
        """
        header = _encode_header(
            {
                "format": FILE_FORMAT_VERSION,
                "backend": self.backend,
                "dim": self.dim,
                "params": self.params,
                "count": self.count(),
            }
        )

        def write(fh) -> None:
            fh.write(header)
            payload = self._serialize_payload()
            if isinstance(payload, (bytes, bytearray, memoryview, np.ndarray)):
                fh.write(payload)
            else:  # a sequence of parts, written one after another
                for part in payload:
                    if callable(part):
                        part(fh)  # streams itself into the file
                    else:
                        fh.write(part)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, checksum: str | None = None) -> "VectorIndex":
        """Open a saved index, verifying its sha256 when ``checksum`` is given.

        Called on ``VectorIndex`` itself, the backend is taken from the file;
        called on a backend class, the file must have been written by it.
        """
        if cls is VectorIndex:
            from search.core.vector_index.registry import load_index

            return load_index(path, checksum=checksum)
        header, payload = read_index_file(path, checksum)
        if header["backend"] != cls.backend:
            raise VectorIndexError(
                f"index file {os.fspath(path)!r} holds a {header['backend']!r} index, "
                f"not {cls.backend!r}"
            )
        return cls._from_file_parts(header, payload)

    @classmethod
    def _from_file_parts(cls, header: dict, payload: memoryview) -> "VectorIndex":
        index = cls._deserialize_payload(
            payload, dim=header["dim"], params=dict(header["params"]), count=header["count"]
        )
        if index.dim != header["dim"] or index.count() != header["count"]:
            raise VectorIndexError("index payload does not match its header")
        return index


class StorageBackedIndex(VectorIndex):
    """A backend whose rows live in a server (a PostgreSQL table, a Milvus collection): its
    file is a small manifest naming that storage, and loading it gives the live rows.

    Subclasses say what names their storage (``_manifest``) and how to tell it still exists
    (``_storage_exists``)."""

    snapshot_files = False

    @abc.abstractmethod
    def _manifest(self) -> dict:
        """What names this index's storage (with the dimension), as JSON-able values."""

    @abc.abstractmethod
    def _storage_exists(self) -> bool:
        """Whether the storage the manifest names is there."""

    #: What the storage is called in messages ("table", "collection").
    storage_noun: ClassVar[str] = "storage"

    def _serialize_payload(self):
        return json.dumps(self._manifest(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def _deserialize_payload(cls, payload, *, dim: int, params: dict, count: int):
        try:
            manifest = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise VectorIndexError(f"corrupt {cls.backend!r} manifest: {exc}") from exc
        index = cls(dim, **params)
        if manifest != index._manifest():
            raise VectorIndexError(f"{cls.backend!r} manifest does not match the file header")
        return index

    @classmethod
    def _from_file_parts(cls, header: dict, payload: memoryview) -> "VectorIndex":
        # The storage is live: its row count may differ from the one at saving time.
        index = cls._deserialize_payload(payload, dim=header["dim"], params=dict(header["params"]),
                                         count=header["count"])
        if not index._storage_exists():
            raise VectorIndexError(f"the {cls.storage_noun} named by this index file does not exist: "
                                   f"{index._manifest()}")
        return index
