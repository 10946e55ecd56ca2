"""Backend registry: a backend name (a setting string) -> the dotted path of
its class. A backend's module is imported the first time its name is asked
for and the class is cached afterwards, so merely importing this package never
imports FAISS or any other vector library.
"""

from __future__ import annotations

import importlib
import os
import threading

from search.core.vector_index.base import VectorIndex, VectorIndexError, read_index_file

__all__ = ["BACKENDS", "create_index", "get_backend", "load_index", "register_backend"]

BACKENDS: dict[str, str] = {
    "faiss-flat": "search.core.vector_index.faiss_flat.FaissFlatIndex",
    "faiss-hnsw": "search.core.vector_index.faiss_hnsw.FaissHNSWIndex",
    "faiss-ivfpq": "search.core.vector_index.faiss_ivfpq.FaissIVFPQIndex",
    "pgvector": "search.core.vector_index.pgvector.PgVectorIndex",
    "milvus": "search.core.vector_index.milvus.MilvusIndex",
}

_classes: dict[str, type[VectorIndex]] = {}
_lock = threading.Lock()


def register_backend(name: str, dotted_path: str) -> None:
    """Make ``name`` resolve to the class at ``dotted_path`` ("pkg.module.Class").

    Re-registering a name replaces it. The class is imported on first use and
    its ``backend`` attribute must equal ``name``.
    """
    if not isinstance(name, str) or not name:
        raise VectorIndexError(f"backend name must be a non-empty string, got {name!r}")
    module, _, attr = str(dotted_path).rpartition(".")
    if not module or not attr:
        raise VectorIndexError(
            f"backend path must look like 'package.module.Class', got {dotted_path!r}"
        )
    with _lock:
        BACKENDS[name] = dotted_path
        _classes.pop(name, None)


def get_backend(name: str) -> type[VectorIndex]:
    """The index class registered under ``name``, imported on first use."""
    cls = _classes.get(name) if isinstance(name, str) else None
    if cls is not None:
        return cls
    with _lock:
        if isinstance(name, str) and name in _classes:
            return _classes[name]
        dotted_path = BACKENDS.get(name) if isinstance(name, str) else None
        if dotted_path is None:
            known = ", ".join(sorted(BACKENDS)) or "(none)"
            raise VectorIndexError(
                f"unknown vector index backend {name!r}; known backends: {known}"
            )
        module_name, _, attr = dotted_path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise VectorIndexError(
                f"vector index backend {name!r} cannot be imported from {dotted_path!r}: {exc}"
            ) from exc
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, VectorIndex)):
            raise VectorIndexError(f"{dotted_path!r} is not a VectorIndex subclass")
        if getattr(cls, "backend", None) != name:
            raise VectorIndexError(
                f"{dotted_path!r} declares backend {getattr(cls, 'backend', None)!r}, "
                f"but is registered as {name!r}"
            )
        _classes[name] = cls
        return cls


def create_index(name: str, dim: int, **params) -> VectorIndex:
    """A new, empty index of backend ``name``."""
    return get_backend(name)(dim, **params)


def load_index(path: str | os.PathLike, checksum: str | None = None) -> VectorIndex:
    """Open any saved index; the backend is read from the file itself.

    Verifies the sha256 when ``checksum`` is given (``ChecksumMismatch``);
    missing or corrupt files raise ``VectorIndexError``.
    """
    header, payload = read_index_file(path, checksum)
    return get_backend(header["backend"])._from_file_parts(header, payload)
