"""The text-query embedding cache (search.serving) and its use by text search."""

from __future__ import annotations

import os
import queue

import numpy as np
import pytest

from embeddings.services import encoder_for
from search import queries, serving
from search.core.lru import LRU
from search.serving import HIT_LOCAL, HIT_SHARED, MISS, QueryEmbeddingCache, cache_key


@pytest.fixture
def encoder(tiny_model):
    return encoder_for(tiny_model)


@pytest.fixture(autouse=True)
def empty_local_cache():
    serving.query_cache.clear()
    yield
    serving.query_cache.clear()


def count_encodes(monkeypatch, encoder) -> list:
    calls = []
    original = type(encoder).encode_token_ids

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(encoder), "encode_token_ids", counting)
    return calls


def test_miss_then_local_hit_then_shared_hit(tiny_model, encoder, monkeypatch):
    calls = count_encodes(monkeypatch, encoder)
    first = QueryEmbeddingCache()
    vector, where = first.text_embedding(tiny_model, encoder, "a red square")
    assert where == MISS and len(calls) == 1
    np.testing.assert_allclose(vector, encoder.encode_texts(["a red square"])[0], atol=1e-6)
    calls.clear()
    again, where = first.text_embedding(tiny_model, encoder, "a red square")
    assert where == HIT_LOCAL and calls == []
    np.testing.assert_array_equal(again, vector)
    serving.write_behind.flush()  # the shared level is written in the background
    # Another process (an empty local level) finds it in Redis.
    other, where = QueryEmbeddingCache().text_embedding(tiny_model, encoder, "a red square")
    assert where == HIT_SHARED and calls == []
    np.testing.assert_array_equal(other, vector)
    assert not other.flags.writeable  # a cached vector cannot be changed by a caller


def test_the_shared_level_is_off_for_an_encoder_on_cuda_unless_asked_for(tiny_checkpoint, settings):
    from embeddings.core.siglip import SiglipEncoder

    cpu, cuda = (SiglipEncoder(str(tiny_checkpoint), device=device) for device in ("cpu", "cuda"))
    assert serving.shared_level(cpu) and not serving.shared_level(cuda)
    settings.SEARCH_QUERY_CACHE_SHARED = "on"
    assert serving.shared_level(cuda)
    settings.SEARCH_QUERY_CACHE_SHARED = "off"
    assert not serving.shared_level(cpu)


def test_without_the_shared_level_nothing_goes_to_redis(tiny_model, encoder, settings, monkeypatch):
    from django.core.cache import cache

    settings.SEARCH_QUERY_CACHE_SHARED = "off"
    calls = count_encodes(monkeypatch, encoder)
    key = cache_key(tiny_model, encoder, encoder.token_ids(["a quiet harbour"]))
    cache.delete(key)
    assert QueryEmbeddingCache().text_embedding(tiny_model, encoder, "a quiet harbour")[1] == MISS
    serving.write_behind.flush()
    assert cache.get(key) is None
    # Another process encodes it again.
    assert QueryEmbeddingCache().text_embedding(tiny_model, encoder, "a quiet harbour")[1] == MISS
    assert len(calls) == 2


def test_the_key_is_the_text_as_the_tokenizer_sees_it(tiny_model, encoder):
    key = lambda text: cache_key(tiny_model, encoder, encoder.token_ids([text]))  # noqa: E731
    assert key("a red square") == key("  A red   square! ")
    assert key("a red square") != key("a blue square")
    assert key("a red square").startswith(f"{serving.KEY_PREFIX}:{tiny_model.pk}:")


def test_the_key_depends_on_model_and_backend(tiny_model, encoder):
    from embeddings.models import EmbeddingModel

    ids = encoder.token_ids(["a red square"])
    other_model = EmbeddingModel(pk=tiny_model.pk + 1000, source=tiny_model.source)
    assert cache_key(tiny_model, encoder, ids) != cache_key(other_model, encoder, ids)

    class OtherBackend:
        backend = "torch"

    assert cache_key(tiny_model, encoder, ids) != cache_key(tiny_model, OtherBackend(), ids)


def test_the_local_level_is_bounded_and_least_recently_used_goes_first(tiny_model, encoder, monkeypatch):
    small = QueryEmbeddingCache(size=2)
    for text in ("one dog", "two dogs", "three dogs"):
        small.text_embedding(tiny_model, encoder, text)
    assert len(small) == 2
    monkeypatch.setattr(QueryEmbeddingCache, "_get_shared", staticmethod(lambda key: None))
    assert small.text_embedding(tiny_model, encoder, "three dogs")[1] == HIT_LOCAL
    assert small.text_embedding(tiny_model, encoder, "one dog")[1] == MISS  # evicted
    assert len(small) == 2


def test_size_zero_turns_the_local_level_off(tiny_model, encoder, settings):
    settings.SEARCH_QUERY_CACHE_SIZE = 0
    cache = QueryEmbeddingCache()
    cache.text_embedding(tiny_model, encoder, "a red square")
    assert len(cache) == 0
    serving.write_behind.flush()
    assert cache.text_embedding(tiny_model, encoder, "a red square")[1] == HIT_SHARED


def test_a_broken_shared_cache_does_not_break_search(tiny_model, encoder, monkeypatch):
    from django.core.cache import cache

    def fail(*args, **kwargs):
        raise ConnectionError("valkey is down")

    monkeypatch.setattr(cache, "get", fail)
    monkeypatch.setattr(cache, "set", fail)
    local = QueryEmbeddingCache()
    vector, where = local.text_embedding(tiny_model, encoder, "a green triangle")
    assert where == MISS and vector.shape == (encoder.dim,)
    assert local.text_embedding(tiny_model, encoder, "a green triangle")[1] == HIT_LOCAL


def test_a_wrong_sized_shared_entry_is_ignored(tiny_model, encoder):
    from django.core.cache import cache

    key = cache_key(tiny_model, encoder, encoder.token_ids(["a blue circle"]))
    cache.set(key, b"\x00" * 12)
    vector, where = QueryEmbeddingCache().text_embedding(tiny_model, encoder, "a blue circle")
    assert where == MISS and vector.shape == (encoder.dim,)


def test_search_text_encodes_a_repeated_query_once(tiny_model, encoder, monkeypatch):
    calls = count_encodes(monkeypatch, encoder)
    first = queries.search_text("a man riding a surfboard", k=5)
    second = queries.search_text("A man riding a surfboard.", k=5)
    assert len(calls) == 1
    assert first.timings["query_cache"] == MISS
    assert second.timings["query_cache"] == HIT_LOCAL
    assert second.timings["encode_ms"] < 50


def test_search_api_reports_server_timing(tiny_model, api_client):
    response = api_client.post("/api/search/text/", {"query": "two dogs in the snow", "k": 3}, format="json")
    assert response.status_code == 200
    header = response["Server-Timing"]
    for name in ("encode;dur=", "search;dur=", "serialise;dur=", "view;dur="):
        assert name in header
    assert 'cache;desc="miss"' in header
    again = api_client.post("/api/search/text/", {"query": "two dogs in the snow", "k": 3}, format="json")
    assert 'cache;desc="local"' in again["Server-Timing"]


def test_lru_keeps_the_most_recently_used_within_its_size():
    cache = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)
    off = LRU(lambda: 0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


def test_shared_writes_land_in_the_background_and_a_full_queue_drops_them(clean_state):
    from django.core.cache import cache

    writes = serving.WriteBehind(capacity=1)
    writes.set("write-behind-test", b"stored", 60)
    writes.flush()
    assert cache.get("write-behind-test") == b"stored"
    # A queue that cannot take more drops the write instead of holding up the search.
    stuck = serving.WriteBehind(capacity=1)
    stuck._pid, stuck._queue = os.getpid(), queue.Queue(maxsize=1)  # started, no thread draining it
    stuck.set("write-behind-a", b"1", 60)
    stuck.set("write-behind-b", b"2", 60)  # dropped, without waiting
    assert stuck._queue.qsize() == 1
