import pytest

from tests.search.core.vectors import N, sparse_ids, unit_vectors


@pytest.fixture
def corpus():
    """500 unit vectors under large, sparse ids."""
    return sparse_ids(N), unit_vectors(N, seed=1)
