"""The demo command: demo model active, unseen test pictures imported through ingestion, indexed."""

import pytest
from django.core.management import call_command

from embeddings.models import Embedding, EmbeddingModel
from search.models import Caption, ImageAsset, IndexBuild

pytestmark = pytest.mark.django_db


@pytest.fixture
def small_demo(monkeypatch, tiny_checkpoint, settings, tmp_path, clean_state):
    from embeddings import services
    from embeddings.core import synthetic
    from evaluation.management.commands import demo

    settings.MEDIA_ROOT, settings.INDEX_DIR = tmp_path / "media", tmp_path / "indices"
    settings.STATE_DIR = tmp_path
    monkeypatch.setattr(services, "DEMO_MODEL_DIR", tiny_checkpoint)
    monkeypatch.setattr(synthetic, "DEMO_DATA", dict(synthetic.DEMO_DATA, n_val=4, n_test=12))
    return demo


def test_demo_activates_the_demo_model_and_indexes_its_test_pictures(small_demo):
    call_command("demo", "--in-process")
    model = EmbeddingModel.active()
    assert model.kind == EmbeddingModel.Kind.DEMO and model.name == "offline-demo"
    assets = ImageAsset.objects.filter(collection=small_demo.DEMO_COLLECTION)
    assert assets.count() == 12
    assert Caption.objects.filter(asset__in=assets).count() == 12 * 5
    assert Embedding.objects.filter(model=model, asset__in=assets).count() == 12
    image_build = IndexBuild.objects.filter(model=model, modality="image", status="ready").latest("version")
    assert image_build.vector_count == 12


def test_running_the_demo_again_changes_nothing(small_demo):
    call_command("demo", "--in-process")
    before = (ImageAsset.objects.count(), Caption.objects.count(), Embedding.objects.count())
    call_command("demo", "--in-process")
    assert (ImageAsset.objects.count(), Caption.objects.count(), Embedding.objects.count()) == before


def test_if_active_does_nothing_unless_the_demo_model_is_active(small_demo, tiny_model):
    call_command("demo", "--if-active")
    assert not ImageAsset.objects.exists()
