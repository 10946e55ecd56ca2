"""`manage.py train` trains with the sigmoid loss and registers a checkpoint the search path loads."""

import json

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from embeddings.core.siglip import SiglipEncoder
from embeddings.models import EmbeddingModel

pytestmark = pytest.mark.django_db

TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from embeddings.core import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("shapes"), n_train=64, n_val=8, n_test=8, image_size=32)


def test_training_from_scratch_registers_a_loadable_model(shapes, tmp_path, clean_state):
    out = tmp_path / "ckpt"
    call_command("train", "--data", str(shapes), "--out", str(out), "--from-scratch", "--model-json", json.dumps(TINY),
                 "--epochs", "1", "--batch-size", "32", "--lr", "1e-3", "--name", "shapes-small", "--activate")
    model = EmbeddingModel.objects.get(name="shapes-small")
    assert model.is_active and model.kind == EmbeddingModel.Kind.TRAINED
    assert model.source == str(out.resolve()) and model.dimension == 32
    vectors = SiglipEncoder(model.source).load().encode_texts(["a small red circle"])
    assert vectors.shape == (1, 32) and np.isclose(np.linalg.norm(vectors), 1.0, atol=1e-5)


def test_bad_model_json_is_a_clear_error(shapes, tmp_path):
    with pytest.raises(CommandError, match="--model-json"):
        call_command("train", "--data", str(shapes), "--out", str(tmp_path / "x"), "--from-scratch",
                     "--model-json", "{oops")
