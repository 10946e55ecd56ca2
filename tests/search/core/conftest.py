import os

import pytest
from django.conf import settings

from search.core.vector_index import create_index
from tests.search.core.vectors import DIM, N, sparse_ids, unit_vectors


@pytest.fixture
def corpus():
    """500 unit vectors under large, sparse ids."""
    return sparse_ids(N), unit_vectors(N, seed=1)


@pytest.fixture
def milvus_server():
    """Skips the test without a Milvus server to run against: the Milvus Lite server the local
    services start under ``bin/test`` (its URI in ``MILVUS_URI``), or any other named there."""
    if not (os.environ.get("MILVUS_URI") or (settings.configured and settings.MILVUS_URI)):
        pytest.skip("the milvus backend needs a Milvus server: run under bin/test or set MILVUS_URI")


@pytest.fixture
def milvus_index(milvus_server):
    """milvus_index(dim=DIM, **params) -> a new milvus index; its collection is dropped after
    the test (a collection is no part of a test transaction)."""
    made = []

    def factory(dim=DIM, **params):
        index = create_index("milvus", dim, **params)
        made.append(index)
        return index

    yield factory
    for index in made:
        index.drop()
