"""The bulk embedding pipeline against the per-asset path, on the tiny checkpoint."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from django.core.files.base import ContentFile

from embeddings.models import Embedding
from search.asset_vectors import embed_asset
from search.bulk_embedding import embed_assets_bulk
from search.models import Caption, ImageAsset, IndexBuild
from tests.helpers import image_bytes

COLOURS = [(220, 20, 20), (20, 20, 220), (20, 180, 20), (200, 200, 20), (120, 40, 160), (10, 10, 10)]


def make_asset(data: bytes, captions=(), fmt="PNG") -> ImageAsset:
    digest = hashlib.sha256(data).hexdigest()
    asset = ImageAsset(sha256=digest, width=64, height=48, format=fmt, collection="pipeline-test")
    asset.file.save(f"{digest}.{fmt.lower()}", ContentFile(data), save=False)
    asset.save()
    for text in captions:
        Caption.objects.create(asset=asset, text=text)
    return asset


@pytest.fixture
def assets(tiny_model):
    made = []
    for i, colour in enumerate(COLOURS):
        fmt = "JPEG" if i % 2 else "PNG"
        made.append(make_asset(image_bytes(colour, pattern=i % 3, fmt=fmt), [f"caption {i}", f"other {i}"]))
    return made


def vectors_of(model, assets) -> dict:
    rows = Embedding.objects.filter(model=model, asset__in=assets).values_list("asset_id", "vector")
    return {asset_id: np.frombuffer(bytes(v), dtype="<f4") for asset_id, v in rows}


def caption_vectors_of(model, assets) -> dict:
    rows = Embedding.objects.filter(model=model, caption__asset__in=assets).values_list("caption__text", "vector")
    return {text: np.frombuffer(bytes(v), dtype="<f4") for text, v in rows}


def per_asset_vectors(model, assets):
    for asset in assets:
        embed_asset(asset.pk, model)
    images, captions = vectors_of(model, assets), caption_vectors_of(model, assets)
    Embedding.objects.filter(model=model).delete()
    ImageAsset.objects.filter(pk__in=[a.pk for a in assets]).update(status=ImageAsset.Status.PENDING)
    return images, captions


@pytest.mark.django_db
def test_bulk_vectors_are_bit_identical_to_the_per_asset_path_at_batch_size_one(tiny_model, assets):
    want_images, want_captions = per_asset_vectors(tiny_model, assets)

    result = embed_assets_bulk([a.pk for a in assets], tiny_model, batch_size=1, workers=0, index="none")

    assert result.images == len(assets) and result.captions == 2 * len(assets) and not result.failed
    got_images, got_captions = vectors_of(tiny_model, assets), caption_vectors_of(tiny_model, assets)
    assert got_images.keys() == want_images.keys()
    for asset_id, vector in want_images.items():
        np.testing.assert_array_equal(got_images[asset_id], vector)
    assert got_captions.keys() == want_captions.keys()
    for text, vector in want_captions.items():
        np.testing.assert_allclose(got_captions[text], vector, rtol=0, atol=1e-6)
    assert set(ImageAsset.objects.filter(pk__in=[a.pk for a in assets]).values_list("status", flat=True)) == {
        "embedded"
    }


@pytest.mark.django_db
def test_batched_and_parallel_decoding_give_the_same_vectors(tiny_model, assets):
    want_images, _ = per_asset_vectors(tiny_model, assets)

    result = embed_assets_bulk([a.pk for a in assets], tiny_model, batch_size=4, workers=2, index="none")

    assert result.images == len(assets) and result.workers == 2
    got = vectors_of(tiny_model, assets)
    for asset_id, vector in want_images.items():
        # Same pixels, same model: batching changes float32 sums by a rounding step at most.
        np.testing.assert_allclose(got[asset_id], vector, rtol=0, atol=1e-6)
    rates = result.images_per_second()
    assert rates["end_to_end"] > 0 and rates["model"] > 0 and rates["decode"] > 0


@pytest.mark.django_db
def test_bulk_run_skips_what_is_done_marks_bad_images_failed_and_is_idempotent(tiny_model, assets):
    broken = make_asset(b"\xff\xd8\xff\xe0 this is not really a jpeg", fmt="JPEG")
    embed_asset(assets[0].pk, tiny_model)  # one already embedded the per-asset way
    ids = [a.pk for a in assets] + [broken.pk, 987654321]  # and an id that does not exist

    first = embed_assets_bulk(ids, tiny_model, batch_size=3, workers=1, index="none")

    assert first.images == len(assets) - 1
    assert first.skipped == 2  # the embedded one and the missing id
    assert list(first.failed) == [broken.pk]
    broken.refresh_from_db()
    assert broken.status == "failed" and "cannot decode" in broken.error
    assert Embedding.objects.filter(model=tiny_model, asset__isnull=False).count() == len(assets)
    assert Embedding.objects.filter(model=tiny_model, caption__isnull=False).count() == 2 * len(assets)

    again = embed_assets_bulk(ids, tiny_model, batch_size=3, workers=0, index="none")
    assert again.images == 0 and again.captions == 0
    assert Embedding.objects.filter(model=tiny_model).count() == 3 * len(assets)


@pytest.mark.django_db
def test_one_index_sync_at_the_end_indexes_every_vector(tiny_model, assets):
    result = embed_assets_bulk([a.pk for a in assets], tiny_model, batch_size=4, workers=0, index="sync")

    assert result.seconds["index"] > 0
    image_build = IndexBuild.objects.get(model=tiny_model, modality="image", status="ready")
    caption_build = IndexBuild.objects.get(model=tiny_model, modality="caption", status="ready")
    assert image_build.vector_count == len(assets)
    assert caption_build.vector_count == 2 * len(assets)


@pytest.mark.django_db
def test_bench_ingest_command_reports_every_stage_stores_the_run_and_cleans_up(tiny_model, tiny_checkpoint, tmp_path):
    import io

    from django.core.management import CommandError, call_command

    from embeddings.models import EmbeddingModel
    from evaluation.models import BenchmarkRun

    out = io.StringIO()
    output = tmp_path / "ingest.json"
    call_command("bench_ingest", n=6, checkpoint=str(tiny_checkpoint), batch_size=4, workers=1,
                 model_alone=4, output=str(output), stdout=out)
    text = out.getvalue()
    for stage in ("read", "decode", "model", "store", "index", "end to end", "model alone"):
        assert stage in text, text
    assert "6 images, 0 failed" in text
    assert not ImageAsset.objects.filter(collection="bench-ingest").exists()
    assert not EmbeddingModel.objects.filter(name="bench-siglip-base-random").exists()
    # the figures are kept: in the benchmark history and as JSON
    run = BenchmarkRun.objects.get(kind=BenchmarkRun.Kind.INGESTION)
    figures = json.loads(output.read_text())
    assert run.images_per_second == pytest.approx(figures["images_per_second"]["end_to_end"], abs=0.01)
    assert run.images_per_second > 0
    assert run.gallery_images == figures["images"] == 6
    assert set(figures["busy_seconds"]) >= {"read", "decode", "model", "store", "index"}
    assert run.machine["cpu_count"] >= 1
    # a run measured elsewhere: its JSON joins this history
    call_command("record_benchmark", str(output), stdout=out)
    copied = BenchmarkRun.objects.exclude(pk=run.pk).get(kind=BenchmarkRun.Kind.INGESTION)
    assert copied.images_per_second == run.images_per_second and copied.extra == figures
    assert copied.model_name == run.model_name == "bench-siglip-base-random"
    bad = tmp_path / "bad.json"
    bad.write_text('{"what": 1}')
    with pytest.raises(CommandError, match="not the output of bench_queries, bench_ingest, bench_index or bench_live_index"):
        call_command("record_benchmark", str(bad))
    bad.write_text("{broken")
    with pytest.raises(CommandError, match="cannot read it as JSON"):
        call_command("record_benchmark", str(bad))


def test_reduced_scale_jpeg_decoding_stays_close_to_the_exact_pixels():
    import io

    from PIL import Image

    from embeddings.core.batches import resized_uint8
    from embeddings.core.siglip import ImagePreprocessor
    from tests.helpers import image_bytes as png_bytes

    preprocessor = ImagePreprocessor()  # 224 x 224: a 640 x 480 JPEG is decoded at 320 x 240
    rng = np.random.default_rng(0)
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(field, "RGB").resize((640, 480), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()

    exact = resized_uint8(preprocessor, jpeg)
    draft = resized_uint8(preprocessor, jpeg, draft=True)
    assert draft.shape == exact.shape == (3, 224, 224) and draft.dtype == np.uint8
    difference = np.abs(draft.astype(int) - exact.astype(int))
    assert 0 < difference.mean() < 3, difference.mean()
    # not a JPEG: nothing to draft, the exact pixels
    png = png_bytes((10, 200, 30), size=(80, 60))
    assert np.array_equal(resized_uint8(preprocessor, png, draft=True), resized_uint8(preprocessor, png))


@pytest.mark.django_db
def test_copied_vectors_land_once_and_a_stored_vector_is_kept(tiny_model, assets):
    from django.db import transaction

    from search.bulk_embedding import insert_vectors

    first = np.arange(tiny_model.dimension, dtype="<f4")
    second = -first
    caption = assets[0].captions.first()
    with transaction.atomic():
        insert_vectors(tiny_model, "asset", [(assets[0].pk, first.tobytes()), (assets[1].pk, first.tobytes())])
        insert_vectors(tiny_model, "caption", [(caption.pk, first.tobytes())])
    with transaction.atomic():  # again, other values: what is stored stays
        insert_vectors(tiny_model, "asset", [(assets[0].pk, second.tobytes()), (assets[2].pk, second.tobytes())])
    stored = vectors_of(tiny_model, assets[:3])
    assert set(stored) == {assets[0].pk, assets[1].pk, assets[2].pk}
    assert np.array_equal(stored[assets[0].pk], first) and np.array_equal(stored[assets[2].pk], second)
    assert Embedding.objects.filter(model=tiny_model, caption=caption).count() == 1
    with pytest.raises(ValueError):
        insert_vectors(tiny_model, "nothing", [(1, first.tobytes())])
