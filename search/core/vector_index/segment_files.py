"""The files of a segmented index version: its manifest, delta segments, the sorted keys
of a base segment, and a base segment opened with its vectors mapped from the file.

A version is a small JSON **manifest** naming immutable segment files, oldest first:

* one **base** segment: an ordinary index file of the backend (``VectorIndex.save``),
  large, rewritten only by a merge, with its sorted keys beside it (``.keys``), so a
  writer can tell which keys it holds without loading it;
* **delta** segments: the rows one sync added or replaced (exact float32 vectors) and the
  keys it removed from the older segments (tombstones), small; a large one (folded by a
  merge) of an approximate backend also gets an HNSW graph of its rows (``index_file``), so
  searching it does not scan every row.

Every file is written atomically (``base.atomic_write``: temp file, fsync, rename) and
named in the manifest with its sha256, so a version is complete or absent, never torn
without it being noticed.

Delta file layout (all little endian)::

    b"VECDELTA" | u32 header length | JSON header | zero padding to a multiple of 8
    | keys int64[rows] | tombstones int64[t], sorted | vectors float32[rows × dim]

Keys file layout: ``b"VECKEYS1" | u32 header length | JSON header | padding | int64[rows]``,
sorted. Keys and tombstones come before the vectors, so a writer reads them without
touching the vectors.

**Mapped base segments.** ``open_base(mapped=True)`` gives an index whose FAISS storage
(the float32 vectors of ``faiss-flat``, the vectors and graph of ``faiss-hnsw``, the
inverted lists, quantizer and id maps of ``faiss-ivfpq``) points into a read-only mapping
of the file instead of a copy: the pages are the page cache's, shared by every process
that maps the file, read from disk as searches touch them, and dropped with the mapping.
Other backends are loaded as usual. (The mappers build the backends' objects from their
payload layout, which their own loaders define; ``tests/search/core/test_segments.py``
checks that each answers as the loaded one.) The checksum is then verified by reading the file, not
through the mapping, so verifying does not make the whole file resident in the process.
A mapped index is read-only: it is for serving, never for a merge.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from search.core.vector_index import base
from search.core.vector_index.base import ChecksumMismatch, VectorIndex, VectorIndexError, as_ids, as_vectors
from search.core.vector_index.registry import get_backend, load_index

__all__ = [
    "DeltaFile",
    "MANIFEST_FORMAT",
    "Manifest",
    "SegmentRef",
    "open_base",
    "read_delta",
    "read_keys",
    "read_manifest",
    "verify_file",
    "write_delta",
    "write_keys",
    "write_manifest",
]

MANIFEST_FORMAT = "vector-index-segments/1"
DELTA_MAGIC = b"VECDELTA"
KEYS_MAGIC = b"VECKEYS1"
_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 16
KINDS = ("base", "delta")


@dataclass(frozen=True)
class SegmentRef:
    """One segment file as a manifest names it."""

    kind: str  # "base" or "delta"
    file: str  # file name, in the folder of the manifest
    sha256: str
    bytes: int
    rows: int  # rows stored in the file, live or not
    live: int  # of those, the rows no newer segment replaces or removes
    tombstones: int = 0  # delta: keys it removes from the older segments
    keys_file: str = ""  # base: its sorted keys
    keys_sha256: str = ""
    built_rows: int = 0  # base: rows it was built from scratch with (what its structure learnt from)
    table: bool = False  # base of a table-backed backend: the file names live storage
    index_file: str = ""  # delta: an index of its rows (a graph, for approximate backends)
    index_sha256: str = ""

    def files(self) -> list[str]:
        return [self.file] + [name for name in (self.keys_file, self.index_file) if name]


@dataclass(frozen=True)
class Manifest:
    """An index version: its segments, oldest first (the base, then deltas), the number of
    live rows, and ``source``: where the writer is in its source of rows (opaque here)."""

    backend: str
    dim: int
    params: dict
    count: int
    segments: tuple[SegmentRef, ...]
    source: dict = field(default_factory=dict)

    @property
    def base(self) -> SegmentRef:
        return self.segments[0]

    @property
    def deltas(self) -> tuple[SegmentRef, ...]:
        return self.segments[1:]

    def files(self) -> list[str]:
        """Every segment file the version needs (not the manifest itself)."""
        return [name for ref in self.segments for name in ref.files()]

    def with_changes(self, **changes) -> "Manifest":
        return replace(self, **changes)

    def to_bytes(self) -> bytes:
        body = {
            "format": MANIFEST_FORMAT,
            "backend": self.backend,
            "dim": self.dim,
            "params": self.params,
            "count": self.count,
            "segments": [asdict(ref) for ref in self.segments],
            "source": self.source,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> "Manifest":
        try:
            body = json.loads(bytes(data).decode("utf-8"))
            if body.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {body.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            segments = tuple(SegmentRef(**ref) for ref in body["segments"])
            manifest = cls(backend=str(body["backend"]), dim=int(body["dim"]), params=dict(body["params"]),
                           count=int(body["count"]), segments=segments, source=dict(body.get("source") or {}))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VectorIndexError(f"{where} is not a segment manifest: {exc}") from exc
        if not segments or segments[0].kind != "base" or any(ref.kind != "delta" for ref in segments[1:]):
            raise VectorIndexError(f"{where} must name one base segment followed by deltas")
        if manifest.count < 0 or manifest.count != sum(ref.live for ref in segments):
            raise VectorIndexError(f"{where}: its count does not add up over its segments")
        return manifest


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> str:
    """Write ``manifest`` atomically; its sha256."""
    data = manifest.to_bytes()
    return base.atomic_write(path, lambda fh: fh.write(data))


def read_manifest(path: str | os.PathLike, checksum: str | None = None) -> Manifest:
    data = _read_small(path, checksum)
    return Manifest.from_bytes(data, where=os.fspath(path))


def _read_small(path, checksum) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise VectorIndexError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
    if checksum is not None:
        _check_digest(path, _sha256(data), checksum)
    return data


def _sha256(data) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _check_digest(path, actual: str, expected: str) -> None:
    if actual != str(expected).strip().lower():
        raise ChecksumMismatch(f"{os.fspath(path)!r} has sha256 {actual}, expected {expected}")


def verify_file(path: str | os.PathLike, checksum: str) -> None:
    """ChecksumMismatch (or VectorIndexError when unreadable) unless the file's sha256 is
    ``checksum``. Reads the file in chunks: its pages pass through the page cache, they do
    not become part of this process."""
    try:
        actual = base.sha256_file(path, chunk_size=8 << 20)
    except OSError as exc:
        raise VectorIndexError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
    _check_digest(path, actual, checksum)


# --------------------------------------------------------------------------
# Framed files: delta segments and key lists
# --------------------------------------------------------------------------


def _frame(magic: bytes, header: dict) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head = magic + _LEN.pack(len(body)) + body
    return head + b"\0" * (-len(head) % 8)


# Segment files never change once written, so a process checks each one once: a sync reads
# the keys of every segment, and hashing a large base's keys each time would cost time in
# proportion to the collection. A file rewritten in place (a tear) has another size or time.
_VERIFIED: set[tuple] = set()
_VERIFIED_MAX = 4096


def _map(path, checksum):
    """(header, mapped bytes, offset of the data) of a framed file, its magic checked by the caller."""
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if stat.st_size else b""
    except (OSError, ValueError) as exc:
        raise VectorIndexError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
    if checksum is not None:
        seen = (os.fspath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, str(checksum))
        if seen not in _VERIFIED:
            _check_digest(path, _sha256(data), checksum)
            if len(_VERIFIED) >= _VERIFIED_MAX:
                _VERIFIED.clear()
            _VERIFIED.add(seen)
    prefix = 8 + _LEN.size
    if len(data) < prefix:
        raise VectorIndexError(f"{os.fspath(path)!r} is too short to be a segment file")
    (length,) = _LEN.unpack_from(data, 8)
    if length > _MAX_HEADER or prefix + length > len(data):
        raise VectorIndexError(f"{os.fspath(path)!r} has a corrupt header")
    try:
        header = json.loads(bytes(data[prefix : prefix + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VectorIndexError(f"{os.fspath(path)!r} has a corrupt header") from exc
    start = prefix + length
    return bytes(data[:8]), header, data, start + (-start % 8)


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    keys = as_ids(keys)
    if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
        keys = np.unique(keys)
    return keys


def write_delta(path: str | os.PathLike, dim: int, keys, vectors, tombstones=()) -> str:
    """A delta segment of rows (``keys`` unique, ``vectors`` (rows, dim)) and ``tombstones``
    (keys it removes from older segments); its sha256."""
    keys = as_ids(keys)
    vectors = as_vectors(vectors, dim) if len(keys) else np.empty((0, dim), dtype=np.float32)
    if len(keys) != len(vectors) or len(np.unique(keys)) != len(keys):
        raise VectorIndexError("a delta needs one vector per key and unique keys")
    tombstones = _sorted_unique(np.asarray(tombstones, dtype=np.int64))
    head = _frame(DELTA_MAGIC, {"format": 1, "dim": int(dim), "rows": int(len(keys)),
                                "tombstones": int(len(tombstones))})

    def write(fh) -> None:
        fh.write(head)
        fh.write(keys.astype("<i8", copy=False))
        fh.write(tombstones.astype("<i8", copy=False))
        fh.write(np.ascontiguousarray(vectors, dtype="<f4"))

    return base.atomic_write(path, write)


@dataclass
class DeltaFile:
    """A delta segment as read: ``keys`` in row order, ``tombstones`` sorted, ``vectors``
    (a read-only view of the mapped file; None when read without them)."""

    dim: int
    keys: np.ndarray
    tombstones: np.ndarray
    vectors: np.ndarray | None

    @property
    def rows(self) -> int:
        return len(self.keys)


def read_delta(path: str | os.PathLike, checksum: str | None = None, *, vectors: bool = True) -> DeltaFile:
    magic, header, data, offset = _map(path, checksum)
    if magic != DELTA_MAGIC or header.get("format") != 1:
        raise VectorIndexError(f"{os.fspath(path)!r} is not a delta segment")
    try:
        dim, rows, dead = int(header["dim"]), int(header["rows"]), int(header["tombstones"])
        if offset + 8 * (rows + dead) + 4 * rows * dim != len(data):
            raise ValueError("its length does not match its header")
        keys = np.frombuffer(data, dtype="<i8", count=rows, offset=offset).astype(np.int64)
        tombstones = np.frombuffer(data, dtype="<i8", count=dead, offset=offset + 8 * rows).astype(np.int64)
        found = None
        if vectors:
            found = np.frombuffer(data, dtype="<f4", count=rows * dim, offset=offset + 8 * (rows + dead))
            found = found.reshape(rows, dim)
    except (KeyError, TypeError, ValueError) as exc:
        raise VectorIndexError(f"corrupt delta segment {os.fspath(path)!r}: {exc}") from exc
    return DeltaFile(dim, keys, tombstones, found)


def write_keys(path: str | os.PathLike, keys) -> str:
    """The sorted, unique ``keys`` of a base segment; its sha256."""
    keys = _sorted_unique(np.asarray(keys, dtype=np.int64))
    head = _frame(KEYS_MAGIC, {"format": 1, "rows": int(len(keys))})

    def write(fh) -> None:
        fh.write(head)
        fh.write(keys.astype("<i8", copy=False))

    return base.atomic_write(path, write)


def read_keys(path: str | os.PathLike, checksum: str | None = None) -> np.ndarray:
    """The sorted keys, a read-only view of the mapped file (lookups touch a few pages)."""
    magic, header, data, offset = _map(path, checksum)
    if magic != KEYS_MAGIC or header.get("format") != 1:
        raise VectorIndexError(f"{os.fspath(path)!r} is not a keys file")
    rows = int(header.get("rows", -1))
    if rows < 0 or offset + 8 * rows != len(data):
        raise VectorIndexError(f"corrupt keys file {os.fspath(path)!r}")
    return np.frombuffer(data, dtype="<i8", count=rows, offset=offset) if rows else np.empty(0, np.int64)


# --------------------------------------------------------------------------
# Base segments
# --------------------------------------------------------------------------


def open_base(path: str | os.PathLike, checksum: str | None = None, *, mapped: bool = False) -> VectorIndex:
    """The index of a base segment file. ``mapped``: its FAISS storage mapped from the file
    where the backend allows it (module docstring); read-only then."""
    if not mapped:
        return load_index(path, checksum=checksum)
    if checksum is not None:
        verify_file(path, checksum)
    header, payload = base.read_index_file(path)
    mapper = _MAPPERS.get(header["backend"])
    if mapper is None:
        return get_backend(header["backend"])._from_file_parts(header, payload)
    return mapper(header, payload)


def _mapped_faiss(payload, offset: int = 0, size: int | None = None):
    """A FAISS index read from ``payload`` (a view of a mapped file) without copying its
    storage: ``ZeroCopyIOReader`` with ``IO_FLAG_MMAP_IFC`` points the vectors (and HNSW's
    links) at the mapping."""
    import faiss

    size = len(payload) - offset if size is None else size
    view = np.frombuffer(payload, dtype=np.uint8, count=size, offset=offset)
    reader = faiss.ZeroCopyIOReader(faiss.swig_ptr(view), size)
    try:
        return faiss.read_index(reader, faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError as exc:
        raise VectorIndexError(f"corrupt FAISS payload: {exc}") from exc


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array``, or an aligned copy when the file put it at an odd offset: numpy searches an
    unaligned array through a copy of the whole of it, on every call."""
    return np.require(array, requirements="A")


def _map_flat(header: dict, payload) -> VectorIndex:
    import faiss

    from search.core.vector_index.faiss_flat import FaissFlatIndex

    index = _mapped_faiss(payload)
    if not isinstance(index, faiss.IndexIDMap2) or not isinstance(faiss.downcast_index(index.index),
                                                                   faiss.IndexFlatIP):
        raise VectorIndexError("payload is not a faiss-flat index")
    if index.d != header["dim"] or index.ntotal != header["count"]:
        raise VectorIndexError("payload does not match the file header")
    obj = FaissFlatIndex(header["dim"], **header["params"])
    obj._index = index
    obj._mapped_payload = payload  # the mapping lives as long as the index
    return obj


def _map_hnsw(header: dict, payload) -> VectorIndex:
    import faiss

    from search.core.vector_index.faiss_hnsw import _PARTS, FaissHNSWIndex

    try:
        graph_len, n_labels, bitmap_len = _PARTS.unpack_from(payload, 0)
        offset = _PARTS.size
        if offset + graph_len + 8 * n_labels + bitmap_len != len(payload):
            raise ValueError("payload length does not match its parts")
        labels = _aligned(np.frombuffer(payload, dtype="<i8", count=n_labels, offset=offset + graph_len))
        bits = np.frombuffer(payload, dtype=np.uint8, count=bitmap_len, offset=offset + graph_len + 8 * n_labels)
        deleted = np.unpackbits(bits, count=n_labels, bitorder="little").astype(bool)
    except (struct.error, ValueError) as exc:
        raise VectorIndexError(f"corrupt faiss-hnsw payload: {exc}") from exc
    graph = _mapped_faiss(payload, offset, graph_len)
    if not isinstance(graph, faiss.IndexHNSWFlat) or graph.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise VectorIndexError("payload is not a faiss-hnsw index")
    if graph.d != header["dim"] or graph.ntotal != n_labels:
        raise VectorIndexError("payload does not match the file header")
    obj = FaissHNSWIndex(header["dim"], **header["params"])
    obj._index = graph
    obj._labels = labels
    obj._deleted = deleted
    obj._n_deleted = int(deleted.sum())
    obj._mapped_payload = payload
    if obj.count() != header["count"]:
        raise VectorIndexError("payload does not match the file header")
    return obj


def _map_ivfpq(header: dict, payload) -> VectorIndex:
    """IVF-PQ's parts as its own loader reads them, but every part a view of the mapping: the
    inverted lists and quantizer through FAISS, the id maps and list numbers as arrays (its
    loader copies those; it maps the re-ranking codes already)."""
    import faiss

    from search.core.vector_index.faiss_ivfpq import _PARTS, PAYLOAD_VERSION, FaissIVFPQIndex

    dim = header["dim"]
    obj = FaissIVFPQIndex(dim, **header["params"])
    try:
        version, index_len, codec_len, rows, code_size, n_buffered, n_ids = _PARTS.unpack_from(payload, 0)
        if version != PAYLOAD_VERSION:
            raise ValueError(f"payload format {version!r}, expected {PAYLOAD_VERSION!r}")
        offset = _PARTS.size
        expected = (offset + index_len + codec_len + rows * (code_size + 4) + n_buffered * (8 + 4 * dim)
                    + 8 * n_ids + (8 * n_ids if rows else 0))
        if expected != len(payload):
            raise ValueError("payload length does not match its parts")
    except (struct.error, ValueError) as exc:
        raise VectorIndexError(f"corrupt faiss-ivfpq payload: {exc}") from exc

    def take(nbytes, dtype="<u1"):
        nonlocal offset
        part = np.frombuffer(payload, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=offset)
        offset += nbytes
        return part

    index = _mapped_faiss(payload, offset, index_len) if index_len else None
    offset += index_len
    codec = _mapped_faiss(payload, offset, codec_len) if codec_len else None
    offset += codec_len
    codes = take(rows * code_size).reshape(rows, code_size)
    lists = _aligned(take(4 * rows, "<i4"))
    buffer_ids = _aligned(take(8 * n_buffered, "<i8"))
    buffer_vectors = _aligned(take(4 * dim * n_buffered, "<f4").reshape(-1, dim))
    sorted_ids = _aligned(take(8 * n_ids, "<i8"))
    sorted_rows = _aligned(take(8 * n_ids, "<i8")) if rows else np.empty(0, np.int64)
    stored = 0
    if index is not None:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if not isinstance(ivf, faiss.IndexIVFPQ) or index.d != dim:
            raise VectorIndexError("payload is not a faiss-ivfpq index")
        stored = index.ntotal
    if stored + n_buffered != n_ids or n_ids != header["count"] or (index is not None and n_buffered):
        raise VectorIndexError("payload does not match the file header")
    obj._index, obj._codec = index, codec
    obj._codes, obj._lists, obj._sorted_rows = codes, lists, sorted_rows
    obj._buffer_ids, obj._buffer_vectors = buffer_ids, buffer_vectors
    obj._sorted_ids = sorted_ids
    obj._mapped_payload = payload
    return obj


_MAPPERS = {"faiss-flat": _map_flat, "faiss-hnsw": _map_hnsw, "faiss-ivfpq": _map_ivfpq}
