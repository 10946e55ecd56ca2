"""Synthetic embeddings for the vector index benchmark, generated instead of stored.

``ClusteredSphere`` imitates image embeddings: a mixture of Gaussian clusters of
uneven sizes on the unit sphere, in an anisotropic space (the variance of the
directions decays like ``1 / (i + 10)`` in a random basis, so a few hundred
directions carry most of it). Rows are generated in chunks, so corpus, training
sample and exact top-k can be recomputed without holding the corpus in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHUNK = 50_000


class ClusteredSphere:
    """A reproducible mixture of anisotropic Gaussian clusters on the unit sphere.

    Row ``i`` of the corpus is always the same vector for a given seed,
    whatever the chunking, so corpus, training sample and ground truth can be
    regenerated instead of stored.
    """

    def __init__(self, dim: int, clusters: int, spread: float, seed: int):
        self.dim, self.clusters, self.spread, self.seed = dim, clusters, spread, seed
        rng = np.random.default_rng([seed, 0])
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        variance = 1.0 / (np.arange(dim) + 10.0)
        scale = np.sqrt(variance / variance.sum())
        self._mix = (basis * scale[None, :]).T.astype(np.float32)  # (dim, dim): h @ mix
        centres = rng.standard_normal((clusters, dim)).astype(np.float32) @ self._mix
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.weights = rng.dirichlet(np.full(clusters, 2.0))

    def _draw(self, n: int, stream: int, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, index])
        members = rng.choice(self.clusters, size=n, p=self.weights)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) @ self._mix
        x = self.centres[members] + np.float32(self.spread) * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Corpus rows [start, stop); ``start`` must be a multiple of CHUNK."""
        if start % CHUNK:
            raise ValueError("chunks start at multiples of CHUNK")
        parts = []
        for first in range(start, stop, CHUNK):
            parts.append(self._draw(CHUNK, 1, first // CHUNK)[: min(CHUNK, stop - first)])
        return np.concatenate(parts) if parts else np.empty((0, self.dim), np.float32)

    def queries(self, n: int) -> np.ndarray:
        return self._draw(n, 2, 0)


def vector_chunks(n: int, size: int = CHUNK):
    """(start, stop) of consecutive ranges of ``size`` rows covering ``n``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def exact_top_k(data: ClusteredSphere, n: int, queries: np.ndarray, k: int, progress=None) -> np.ndarray:
    """Exact inner-product top-k ids over the whole corpus, chunk by chunk."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start, stop in vector_chunks(n):
        scores = queries @ data.chunk(start, stop).T
        kk = min(k, stop - start)
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
        cand_ids = np.concatenate([best_ids, part + start], axis=1)
        order = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(cand_scores, order, axis=1)
        best_ids = np.take_along_axis(cand_ids, order, axis=1)
        if progress is not None:
            progress.update(stop - start)
    return best_ids


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (``VmHWM``: its peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
