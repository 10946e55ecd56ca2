"""Pluggable vector indexes (plain Python, no Django).

    from search.core.vector_index import create_index, load_index

    index = create_index("faiss-flat", dim=768)
    index.add(ids, unit_vectors)            # upsert by id
    ids, scores = index.search(query, k=10)
    ids, scores = index.search(query, k=10, subset=Subset(allowed_ids))  # filtered inside the search
    sha = index.save("/data/index/v42.vidx")
    index = load_index("/data/index/v42.vidx", checksum=sha)

Backends are registered by name in ``registry.BACKENDS`` and imported lazily.
"""

from search.core.vector_index.base import (
    ChecksumMismatch,
    Subset,
    VectorIndex,
    VectorIndexError,
    atomic_write,
    sha256_file,
)
from search.core.vector_index.registry import (
    BACKENDS,
    create_index,
    get_backend,
    load_index,
    register_backend,
)

__all__ = [
    "BACKENDS",
    "ChecksumMismatch",
    "Subset",
    "VectorIndex",
    "VectorIndexError",
    "atomic_write",
    "create_index",
    "get_backend",
    "load_index",
    "register_backend",
    "sha256_file",
]
