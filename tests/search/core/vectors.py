"""Vector helpers shared by the index-backend tests: unit vectors, sparse ids, exact answers."""

import numpy as np

DIM = 32
N = 500


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sparse_ids(n: int) -> np.ndarray:
    # Large, non-contiguous external ids.
    return 10_000_019 + 7_919 * np.arange(n, dtype=np.int64) ** 2


def brute_force(ids, vectors, queries, k):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def recall(got, want) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got.tolist(), want.tolist())]))
