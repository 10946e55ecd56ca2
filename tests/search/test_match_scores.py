"""Scores that can say "no match": SigLIP's sigmoid head turns a text↔image cosine into a match
probability; a threshold keeps the good ones, and a search where nothing passes says so."""

import math

import numpy as np
import pytest
import torch
from transformers import SiglipModel

from embeddings.models import EmbeddingModel
from search import asset_vectors, index_sync, queries
from search.curation import ingest_image
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def gallery(tiny_model, settings, tmp_path):
    settings.MEDIA_ROOT, settings.INDEX_DIR = tmp_path / "media", tmp_path / "indices"
    assets = []
    for i, (colour, captions) in enumerate([((220, 20, 20), ["a red square"]), ((20, 20, 220), ["a blue square"]),
                                            ((20, 200, 20), ["a green field"]), ((240, 240, 20), ["yellow"])]):
        asset = ingest_image(image_bytes(colour, pattern=i), captions).asset
        asset_vectors.embed_asset(asset.pk, tiny_model)
        assets.append(asset)
    index_sync.sync_indices(tiny_model)
    return assets


def calibrate(model, scale, bias):
    EmbeddingModel.objects.filter(pk=model.pk).update(logit_scale=scale, logit_bias=bias)


def test_registering_a_model_records_its_sigmoid_head(tiny_model, tiny_checkpoint):
    checkpoint = SiglipModel.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    assert tiny_model.logit_scale == pytest.approx(float(checkpoint.logit_scale.exp()))
    assert tiny_model.logit_bias == pytest.approx(float(checkpoint.logit_bias))
    cosine = 0.3
    logit = float(checkpoint.logit_scale.exp()) * cosine + float(checkpoint.logit_bias)
    assert tiny_model.match_probability(cosine) == pytest.approx(1 / (1 + math.exp(-logit)))


def test_each_text_hit_carries_its_match_probability(gallery, tiny_model, api_client, settings):
    calibrate(tiny_model, 10.0, 0.0)
    body = api_client.post("/api/search/text/", {"query": "a red square", "k": 4}, format="json").json()
    assert len(body["results"]) == 4
    for hit in body["results"]:
        assert hit["probability"] == pytest.approx(1 / (1 + np.exp(-10.0 * hit["score"])), abs=1e-6)
        assert hit["match"] == (hit["probability"] >= settings.SEARCH_MATCH_THRESHOLD)
    assert body["no_good_match"] == (not any(hit["match"] for hit in body["results"]))


def test_min_score_keeps_only_the_hits_that_reach_it(gallery, tiny_model, api_client):
    calibrate(tiny_model, 10.0, 0.0)
    everything = queries.search_text("a red square", k=4).images
    probabilities = sorted(hit.probability for hit in everything)
    middle = (probabilities[1] + probabilities[2]) / 2  # two above, two below
    body = api_client.post("/api/search/text/", {"query": "a red square", "k": 4, "min_score": middle},
                           format="json").json()
    assert [hit["probability"] >= middle for hit in body["results"]] == [True, True]
    assert body["no_good_match"] is False and body["reason"] == ""


def test_when_nothing_reaches_the_threshold_the_nearest_come_back_marked_as_no_match(gallery, tiny_model, api_client):
    calibrate(tiny_model, 10.0, -50.0)  # every probability is tiny
    body = api_client.post("/api/search/text/", {"query": "🔴", "k": 3, "min_score": 0.5}, format="json").json()
    assert len(body["results"]) == 3 and all(hit["match"] is False for hit in body["results"])
    assert body["no_good_match"] is True and "No good match" in body["reason"]
    page = api_client.get("/", {"q": "🔴", "min_score": "0.5"})
    assert page.status_code == 200 and "No good match" in page.content.decode()


def test_similar_images_have_no_probability_but_their_captions_do(gallery, tiny_model, api_client):
    calibrate(tiny_model, 10.0, 0.0)
    body = api_client.post("/api/search/image/", {"asset_id": gallery[0].pk, "k": 3}, format="json").json()
    assert body["images"] and all(hit["probability"] is None and hit["match"] is None for hit in body["images"])
    assert body["captions"] and all(0.0 <= hit["probability"] <= 1.0 for hit in body["captions"])


@pytest.mark.parametrize("min_score", [-0.1, 1.5, "much"])
def test_a_min_score_outside_zero_to_one_is_refused_with_a_reason(gallery, api_client, client, min_score):
    response = api_client.post("/api/search/text/", {"query": "a red square", "min_score": min_score}, format="json")
    assert response.status_code == 400 and "min_score" in response.json()
    page = client.get("/", {"q": "a red square", "min_score": min_score})
    assert page.status_code == 400 and 'class="error" role="alert"' in page.content.decode()
    with pytest.raises(queries.InvalidQuery, match="between 0 and 1"):
        queries.search_text("a red square", min_score=min_score)


def test_a_model_registered_before_its_head_was_recorded_is_calibrated_on_start(tiny_model):
    from django.core.management import call_command

    EmbeddingModel.objects.filter(pk=tiny_model.pk).update(logit_scale=None, logit_bias=None)
    call_command("ensure_model")
    tiny_model.refresh_from_db()
    assert tiny_model.calibrated
