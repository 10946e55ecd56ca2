"""Embedding services: which model is active, and embedding assets with it."""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction

from .models import Embedding, EmbeddingModel
from .siglip import ModelNotAvailable, SiglipEncoder, get_encoder

log = logging.getLogger(__name__)


class NoActiveModel(RuntimeError):
    def __init__(self):
        super().__init__(
            "No embedding model is active. Run `python manage.py ensure_model` "
            "(the run command does it), or activate one in the admin."
        )


def active_model() -> EmbeddingModel:
    model = EmbeddingModel.active()
    if model is None:
        raise NoActiveModel()
    return model


def encoder_for(model: EmbeddingModel) -> SiglipEncoder:
    """The loaded encoder of a model, cached per process, running the towers
    with ``settings.SIGLIP_INFERENCE`` (ONNX exports kept under the state folder)."""
    return get_encoder(model.source, device=settings.SIGLIP_DEVICE, backend=settings.SIGLIP_INFERENCE,
                       onnx_cache_dir=Path(settings.STATE_DIR) / "onnx").load()


def register_model(source: str, *, name: str | None = None, kind: str = EmbeddingModel.Kind.PRETRAINED,
                   activate: bool = True) -> EmbeddingModel:
    """Load a checkpoint once to learn its shape, then record (and activate) it."""
    source = str(Path(source).resolve()) if Path(source).is_dir() else source
    encoder = get_encoder(source, device=settings.SIGLIP_DEVICE).load()
    model, _ = EmbeddingModel.objects.update_or_create(
        name=name or source,
        defaults={"source": source, "kind": kind, "dimension": encoder.dim, "image_size": encoder.image_size},
    )
    if activate:
        model.activate()
    return model


def embed_asset(asset_id: int, model: EmbeddingModel | None = None) -> int:
    """Embed an image and its captions that have no vector yet; returns how many were stored.

    Idempotent: running it twice stores nothing the second time.
    """
    from search.indexing import schedule_index_sync
    from search.ingest import inspect_image
    from search.models import Caption, ImageAsset

    model = model or active_model()
    try:
        asset = ImageAsset.objects.get(pk=asset_id)
    except ImageAsset.DoesNotExist:
        return 0  # deleted before its turn came
    encoder = encoder_for(model)
    rows = []
    if not Embedding.objects.filter(model=model, asset=asset).exists():
        with asset.file.open("rb") as handle:
            data = handle.read()
        # The same caps as at upload (size, pixels from the header, format, complete data), so a
        # file that changed on disk or came in another way cannot take the worker down.
        inspect_image(data)
        vector = encoder.encode_images([data])[0]
        rows.append(Embedding(model=model, asset=asset, vector=Embedding.pack(vector)))
    captions = list(
        Caption.objects.filter(asset=asset).exclude(embeddings__model=model).order_by("id")
    )
    if captions:
        vectors = encoder.encode_texts([c.text for c in captions])
        rows += [Embedding(model=model, caption=c, vector=Embedding.pack(v)) for c, v in zip(captions, vectors)]
    with transaction.atomic():
        # Rows of an asset deleted meanwhile would violate their foreign keys: skip them.
        if not ImageAsset.objects.select_for_update().filter(pk=asset_id).exists():
            return 0
        live_captions = set(Caption.objects.filter(asset_id=asset_id).values_list("id", flat=True))
        rows = [r for r in rows if r.caption_id is None or r.caption_id in live_captions]
        Embedding.objects.bulk_create(rows, ignore_conflicts=True)
        # Captions added while this ran keep the asset pending: their own task (or the
        # reconciler) embeds them and marks it embedded then.
        complete = Embedding.objects.filter(model=model, asset_id=asset_id).exists() and not (
            Caption.objects.filter(asset_id=asset_id).exclude(embeddings__model=model).exists()
        )
        if complete:
            ImageAsset.objects.filter(pk=asset_id).update(status=ImageAsset.Status.EMBEDDED, error="")
        schedule_index_sync(model.pk)
    return len(rows)


def assets_missing_vectors(model: EmbeddingModel):
    """Assets whose image or any caption has no vector for the model (a queryset)."""
    from django.db.models import Exists, OuterRef

    from search.models import Caption, ImageAsset

    image_done = Embedding.objects.filter(model=model, asset=OuterRef("pk"))
    caption_missing = Caption.objects.filter(asset=OuterRef("pk")).exclude(
        Exists(Embedding.objects.filter(model=model, caption=OuterRef("pk")))
    )
    return ImageAsset.objects.filter(~Exists(image_done) | Exists(caption_missing))


def mark_failed(asset_id: int, reason: str) -> None:
    from search.models import ImageAsset

    ImageAsset.objects.filter(pk=asset_id).update(status=ImageAsset.Status.FAILED, error=reason[:2000])


__all__ = [
    "ModelNotAvailable",
    "NoActiveModel",
    "active_model",
    "embed_asset",
    "encoder_for",
    "mark_failed",
    "register_model",
]
